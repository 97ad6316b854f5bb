#!/usr/bin/env bash
# The GPU measurement in one command (<= 8 minutes on one H100/H200, no network):
#
#     bash benchmarks/gpu_check.sh                 # writes $OUT/results_gpu.json (+ _trace.json)
#     bash benchmarks/gpu_check.sh --smoke         # the same on the CPU at tiny shapes
#
# OUT defaults to benchmarks/. Packages the machine lacks (the GPU machines bring torch, not
# deepspeed or megatron-core) are installed from wheels in .whl/ (made beforehand, on a machine with
# network, by benchmarks/gpu_wheels.sh) into a private folder on PYTHONPATH: never over the machine's
# own torch. Extra arguments go to benchmarks/bench_gpu.py (e.g. --micro-batch 2, --set KEY=VALUE).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-benchmarks}
SITE=${GPU_CHECK_SITE:-/tmp/gpu_check_site}
# distributions the project imports at run time (torch excluded: the machine's own build is used)
NEEDED="deepspeed megatron-core pydantic pydantic-core annotated-types typing-inspection typing-extensions einops
numpy pandas python-dateutil tzdata xarray zarr numcodecs donfig google-crc32c packaging tqdm hjson ninja psutil
py-cpuinfo msgpack pyyaml safetensors"
missing=$("$PY" - $NEEDED <<'PYEOF'
import sys
from importlib.metadata import PackageNotFoundError, version
for name in sys.argv[1:]:
    try:
        version(name)
    except PackageNotFoundError:
        print(name)
PYEOF
)
if [ -n "$missing" ]; then
    echo "gpu_check: not installed: $(echo $missing | tr '\n' ' ')" >&2
    if [ -d .whl ]; then
        "$PY" -m pip install --quiet --no-index --no-deps --find-links .whl --target "$SITE" $missing
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "gpu_check: no .whl/ folder (bash benchmarks/gpu_wheels.sh makes it); the parts that need them" \
             "will record the import error" >&2
    fi
fi
mkdir -p "$OUT_DIR"
exec timeout 470 "$PY" benchmarks/bench_gpu.py --out "$OUT_DIR/results_gpu.json" "$@"
