# shellcheck shell=bash
# Shared by the GPU launchers (gpu_single_node.sh, slurm_deepspeed.sbatch, slurm_torchrun.sbatch):
# sourced, never executed. Every function either succeeds or exits with code 2 and one line naming
# what is missing, before any process is started. Environment variables: launchers/README.md.

wm_die() {
    echo "error: $*" >&2
    exit 2
}

# cd to the repository root, activate its .venv if no environment is active, put the root on
# PYTHONPATH (train.py imports jigsaw_ext and weathermixer from there).
wm_enter_repo() {
    local root=$1
    [ -f "$root/train.py" ] || wm_die "$root is not the repository root (no train.py); submit from the root or set WM_REPO"
    cd "$root" || wm_die "cannot cd to $root"
    if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then
        # shellcheck disable=SC1091
        . .venv/bin/activate
    fi
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
}

# GPUs per node: GPUS_PER_NODE, else SLURM's view of the allocation, else nvidia-smi.
wm_gpus_per_node() {
    local n=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
    if [ -z "$n" ] && [ -n "${SLURM_GPUS_PER_NODE:-}" ]; then
        n=${SLURM_GPUS_PER_NODE##*:}   # "8", "h100:8" or "gpu:h100:8"
    fi
    if [ -z "$n" ] && command -v nvidia-smi >/dev/null 2>&1; then
        n=$(nvidia-smi -L | grep -c '^GPU')
    fi
    case "$n" in
        '' | *[!0-9]* | 0) wm_die "cannot tell the GPUs per node (got '${n}'): set GPUS_PER_NODE" ;;
    esac
    echo "$n"
}

# Environment of every training process; $1 = processes on this node. Only unset variables are
# filled in, so anything exported before the launcher wins.
wm_setup_env() {
    local procs=$1 cores
    cores=${SLURM_CPUS_ON_NODE:-$(nproc)}
    # intra-op threads per process: the node's cores shared by its processes (torch would otherwise
    # start one thread per core in every process and oversubscribe the node)
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cores / procs > 0 ? cores / procs : 1 ))}
    # a failed or timed-out NCCL collective tears the process down (1 = TearDown), so one dead rank
    # ends the job after weathermixer.train.dist_timeout_s instead of leaving the others blocked
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    export PYTHONUNBUFFERED=1
}

# DeepSpeed's pdsh launcher starts the remote processes over ssh with only the NCCL*, PYTHON*,
# UCX*, MV2* and MLFLOW* variables; the others named here travel in the file DS_ENV_FILE names.
wm_write_ds_env() {
    local file=$1 var
    case "$file" in /*) ;; *) file="$PWD/$file" ;; esac
    mkdir -p "$(dirname "$file")" && : > "$file" || wm_die "cannot write $file"
    for var in OMP_NUM_THREADS TORCH_NCCL_ASYNC_ERROR_HANDLING TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC \
               CUDA_DEVICE_MAX_CONNECTIONS GOOGLE_APPLICATION_CREDENTIALS WM_JOB_RECORD; do
        if [ -n "${!var:-}" ]; then
            echo "$var=${!var}" >> "$file"
        fi
    done
    export DS_ENV_FILE=$file   # read by the deepspeed runner (an absolute path replaces its default name)
}

# DeepSpeed hostfile from the SLURM allocation: one "HOST slots=SLOTS" line per node. Exports
# MASTER_ADDR (the first node: rank 0 and the rendezvous live there) and NNODES.
wm_write_hostfile() {
    local file=$1 slots=$2 nodelist hosts
    nodelist=${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}
    [ -n "$nodelist" ] || wm_die "SLURM_JOB_NODELIST is not set: run inside a SLURM allocation (sbatch/salloc)"
    case "$slots" in
        '' | *[!0-9]* | 0) wm_die "slots per node must be a positive integer, got '$slots'" ;;
    esac
    hosts=$(scontrol show hostnames "$nodelist") || wm_die "'scontrol show hostnames $nodelist' failed"
    [ -n "$hosts" ] || wm_die "'scontrol show hostnames $nodelist' printed no host"
    mkdir -p "$(dirname "$file")" || wm_die "cannot create the directory of $file"
    : > "$file" || wm_die "cannot write $file"
    local host
    for host in $hosts; do
        echo "$host slots=$slots" >> "$file"
    done
    NNODES=$(wc -l < "$file")
    NNODES=$(( NNODES ))   # wc pads with spaces on some systems
    if [ -n "${SLURM_NNODES:-}" ] && [ "$SLURM_NNODES" != "$NNODES" ]; then
        wm_die "SLURM_NNODES=$SLURM_NNODES but $nodelist expands to $NNODES host(s)"
    fi
    MASTER_ADDR=$(head -n 1 "$file" | cut -d ' ' -f 1)
    export MASTER_ADDR NNODES
}

# A port per job, so two jobs sharing a node do not collide: MASTER_PORT, else 20000 + job id mod 20000.
wm_master_port() {
    echo "${MASTER_PORT:-$(( 20000 + ${SLURM_JOB_ID:-9500} % 20000 ))}"
}

# Run the job ("$@": the deepspeed / torchrun / srun command) and, if it fails, print one last line
# naming the rank (and host) that failed or died first, from the registry and exit records the ranks
# keep in the run folder (python -m weathermixer.train.rankwatch report). The ranks find the registry
# through WM_JOB_RECORD (a file; a temporary one unless set). SIGTERM/SIGINT/SIGHUP to this script go
# to the job. Returns the job's exit status.
wm_run_reported() {
    local child rc own=0
    if [ -z "${WM_JOB_RECORD:-}" ]; then
        WM_JOB_RECORD=$(mktemp "${TMPDIR:-/tmp}/weathermixer-job.XXXXXX") || wm_die "mktemp failed"
        own=1
    fi
    rm -f "$WM_JOB_RECORD"   # a record left by an earlier job must not speak for this one
    export WM_JOB_RECORD
    "$@" &
    child=$!
    # shellcheck disable=SC2064
    trap "kill -TERM $child 2>/dev/null" TERM INT HUP
    rc=0
    wait "$child" || rc=$?
    while kill -0 "$child" 2>/dev/null; do   # a trapped signal interrupted the wait: wait for the job
        rc=0
        wait "$child" || rc=$?
    done
    trap - TERM INT HUP
    if [ "$rc" != 0 ]; then
        "${PYTHON:-python}" -m weathermixer.train.rankwatch report "$WM_JOB_RECORD" "$rc" || true
    fi
    if [ "$own" = 1 ]; then
        rm -f "$WM_JOB_RECORD"
    fi
    return "$rc"
}
