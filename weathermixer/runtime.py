"""Process facts every rank starts with, shared by training and inference: the launcher's local rank
and count, the threads per process and the cores each rank is bound to."""

from __future__ import annotations

import os

import torch


def _local_ranks() -> tuple[int, int]:
    """(this process's rank on its node, ranks on the node) from the launcher's variables (torchrun,
    deepspeed); (0, 1) when launched alone."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
    return int(os.environ.get("LOCAL_RANK") or 0), local


def set_threads() -> None:
    if "OMP_NUM_THREADS" in os.environ:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, cores // _local_ranks()[1]))


def bind_cores(enabled: bool = True) -> list[int] | None:
    """CPU runs with several ranks on a node: each rank's threads (and those it starts later: gloo's,
    the loader's) on its own contiguous slice of the cores this process may use, as DeepSpeed's
    launcher does with --bind_cores_to_rank. Unbound, the scheduler moves a rank's compute thread
    onto the core where the other rank computes whenever a communication or loader thread wakes,
    and both ranks wait for the one it slowed at their next collective. Skipped (None) when there is
    one local rank, when the ranks' threads (OMP_NUM_THREADS, default cores / ranks) would not fit
    on the cores without sharing (more ranks than cores, or a launcher that bound each rank to its
    own cores already: then this process sees fewer cores than ranks x threads), or where the OS
    has no affinity call. Returns the cores bound to."""
    local_rank, local = _local_ranks()
    if not enabled or local < 2 or not hasattr(os, "sched_setaffinity"):
        return None
    cores = sorted(os.sched_getaffinity(0))
    omp = os.environ.get("OMP_NUM_THREADS", "")
    threads = (int(omp) if omp.strip().isdigit() else 0) or len(cores) // local
    if threads < 1 or threads * local > len(cores) or local_rank >= local:
        return None
    per = len(cores) // local
    mine = cores[local_rank * per : (local_rank + 1) * per]
    for task in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else [0]:
        try:
            os.sched_setaffinity(int(task), mine)
        except OSError:  # a thread that ended meanwhile
            pass
    return mine
