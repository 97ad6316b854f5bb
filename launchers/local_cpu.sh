#!/usr/bin/env bash
# Quickstart on this machine's CPU: deepspeed launcher, gloo, 4 processes = DOMAIN 2 x TP 2.
#
#   launchers/local_cpu.sh                          # the quickstart (deepspeed_configs/quickstart_cpu.json)
#   launchers/local_cpu.sh --steps 50               # extra arguments go to train.py
#   NPROC=2 launchers/local_cpu.sh --domain 2 --tp 1
#   CONFIG=my.json MASTER_PORT=29600 launchers/local_cpu.sh
#
# A hung collective fails after weathermixer.train.dist_timeout_s (default 300 s) on every rank.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then
    # shellcheck disable=SC1091
    . .venv/bin/activate
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export DS_ACCELERATOR=cpu   # no GPU probing (and no warning about it) in every process
# shellcheck source=launchers/common.sh
. launchers/common.sh
# on failure the last line names the rank that died or failed first (wm_run_reported)
wm_run_reported deepspeed --num_gpus "${NPROC:-4}" --master_port "${MASTER_PORT:-29500}" \
    train.py --deepspeed_config "${CONFIG:-deepspeed_configs/quickstart_cpu.json}" "$@"
