#!/usr/bin/env bash
# One node, N GPUs, DeepSpeed launcher (NCCL). N must equal mesh.dp x mesh.domain x mesh.tp.
#
#   launchers/gpu_single_node.sh                                  # era5_0.25deg_1b.json on all GPUs (8)
#   CONFIG=deepspeed_configs/era5_5.625deg.json NGPUS=4 launchers/gpu_single_node.sh --dp 4
#   CONFIG=deepspeed_configs/era5_1.40625deg.json launchers/gpu_single_node.sh --steps 1000 --output-dir runs/try1
#
# NGPUS (default: every GPU of the node), CONFIG, MASTER_PORT (default 29500); the other variables
# that matter (NCCL_*, OMP_NUM_THREADS, CUDA_DEVICE_MAX_CONNECTIONS) are listed in launchers/README.md.
# Arguments go to train.py (--steps, --dp/--domain/--tp, --output-dir, --data-path, --resume, --set K=V).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=launchers/common.sh
. "$ROOT/launchers/common.sh"
wm_enter_repo "$ROOT"

CONFIG=${CONFIG:-deepspeed_configs/era5_0.25deg_1b.json}
[ -f "$CONFIG" ] || wm_die "CONFIG=$CONFIG: no such file"
NGPUS=${NGPUS:-$(wm_gpus_per_node)}
wm_setup_env "$NGPUS"

# on failure the last line names the rank that died or failed first (wm_run_reported)
wm_run_reported deepspeed --num_gpus "$NGPUS" --master_port "${MASTER_PORT:-29500}" \
    train.py --deepspeed_config "$CONFIG" "$@"
