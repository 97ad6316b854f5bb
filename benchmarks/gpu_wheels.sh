#!/usr/bin/env bash
# Wheels for a GPU machine without network (Python 3.12, x86_64 Linux, torch preinstalled), into .whl/
# (git-ignored; carry it to the GPU machine with the working tree). Run on a machine with network:
#
#     bash benchmarks/gpu_wheels.sh             # then on the GPU: bash benchmarks/gpu_check.sh
#
# Versions: those tested here (Python 3.11), except megatron-core (0.17+ is the line for Python 3.12). deepspeed is
# published as a source archive: it is built into a pure-Python wheel here (its ops compile at run time).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p .whl
"$PY" -m pip download --quiet --dest .whl --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_28_x86_64 \
    "megatron-core>=0.17,<0.20" "pydantic==2.14.4" "pydantic-core==2.50.5" "annotated-types==0.8.0" \
    "typing-inspection==0.4.5" "typing-extensions==4.16.0" "einops==0.8.2" "pandas==3.1.1" \
    "python-dateutil==4.0.0" "tzdata==2026.6" "xarray==2026.9.0" "zarr==3.1.6" "numcodecs==0.16.6" \
    "donfig==0.8.1.post1" "google-crc32c==1.9.0" "packaging==26.4" "tqdm==4.70.1" "hjson==3.1.0" \
    "ninja==1.13.2" "psutil==7.2.2" "py-cpuinfo==9.0.0" "msgpack==1.2.4" "pyyaml==6.0.4" "safetensors==0.8.0" \
    "numpy==2.4.6"
"$PY" -m pip wheel --quiet --no-deps --wheel-dir .whl "deepspeed==0.19.8"
du -sh .whl
