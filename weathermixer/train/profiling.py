"""One training step under torch.profiler (log.profile_step): where the step's time goes.

Writes <log.dir>/profile/trace_rank<r>.json (chrome trace) and breakdown_rank<r>.json: the step's wall
time, the time in each category (GEMM, elementwise, copies, optimizer, communication), the device's
idle time (wall minus the union of its busy intervals) and the top kernels. On a GPU the categories
are the CUDA kernels and memory copies; on the CPU they are the aten operators' own (self) times.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from jigsaw_ext.files import atomic_write_text

CATEGORIES = ("gemm", "communication", "optimizer", "copies", "elementwise")
# lower-case substrings of a kernel / operator name, first match wins (in CATEGORIES order)
PATTERNS = {
    "gemm": (
        "gemm",
        "cutlass",
        "xmma",
        "nvjet",
        "cublas",
        "wgmma",
        "aten::mm",
        "aten::addmm",
        "aten::bmm",
        "aten::baddbmm",
        "aten::matmul",
    ),
    "communication": ("nccl", "gloo", "c10d", "all_reduce", "allreduce", "all_gather", "reduce_scatter"),
    "optimizer": ("adam", "multi_tensor", "foreach", "optimizer", "l2norm", "clip_grad"),
    "copies": (
        "memcpy",
        "memset",
        "copy",
        "aten::to",
        "aten::cat",
        "catarray",
        "constant_pad",
        "aten::pad",
        "transpose",
        "aten::contiguous",
    ),
}


def _in_optimizer(event) -> bool:
    """Whether an operator ran inside an optimizer's step (torch.optim records 'Optimizer.step#...')."""
    parent = getattr(event, "cpu_parent", None)
    while parent is not None:
        if parent.name.startswith("Optimizer.step"):
            return True
        parent = parent.cpu_parent
    return False


def category(name: str, in_optimizer: bool = False) -> str:
    if in_optimizer:
        return "optimizer"
    low = name.lower()
    for cat in CATEGORIES[:-1]:
        if any(p in low for p in PATTERNS[cat]):
            return cat
    return "elementwise"


def _union_seconds(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total / 1e6  # profiler times are microseconds


def _device_events(events, cuda: bool) -> list:
    """Kernels and copies on the GPU; on the CPU the aten operators (their self time)."""
    from torch.autograd import DeviceType

    if cuda:
        return [e for e in events if e.device_type == DeviceType.CUDA]
    return [e for e in events if e.device_type == DeviceType.CPU and e.name.startswith("aten::")]


def breakdown(events, wall_s: float, cuda: bool, top: int = 15) -> dict:
    """Seconds per category, idle time and the top kernels of a profiled step's events."""
    evs = _device_events(events, cuda)
    own = (
        (lambda e: e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total)
        if cuda
        else (lambda e: e.self_cpu_time_total)
    )
    per_cat = dict.fromkeys(CATEGORIES, 0.0)
    per_name: dict[str, list] = {}
    for e in evs:
        t, cat = own(e) / 1e6, category(e.name, _in_optimizer(e))
        per_cat[cat] += t
        slot = per_name.setdefault(e.name, [0.0, 0, cat])
        slot[0] += t
        slot[1] += 1
    if cuda:
        busy = _union_seconds([(e.time_range.start, e.time_range.end) for e in evs])
    else:  # operators nest and overlap on threads: the sum of self times, capped at the wall time
        busy = min(sum(per_cat.values()), wall_s)
    kernels = sorted(per_name.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "wall_s": wall_s,
        "measure": "CUDA kernels" if cuda else "aten operators' self CPU time",
        "seconds": per_cat,
        "busy_s": busy,
        "idle_s": max(wall_s - busy, 0.0),
        "share_of_wall": {k: v / wall_s for k, v in per_cat.items()} if wall_s > 0 else {},
        "top": [{"name": n[:160], "seconds": s, "calls": c, "category": cat} for n, (s, c, cat) in kernels],
    }


@contextmanager
def profiled_step(enabled: bool, out_dir: str | Path, rank: int, device: torch.device, log=print):
    """Run the body under torch.profiler when `enabled`; write the trace and the breakdown. A failure
    to analyse or write the profile is logged and does not stop training."""
    if not enabled:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize(device)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        yield
        if cuda:
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - t0
    try:
        out = Path(out_dir) / "profile"
        out.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(out / f"trace_rank{rank}.json"))
        doc = breakdown(prof.events(), wall, cuda)
        atomic_write_text(out / f"breakdown_rank{rank}.json", json.dumps(doc, indent=1))
        if rank == 0:
            log(f"profile of one step ({wall:.3f} s): {out}")
    except Exception as err:  # noqa: BLE001 - the profile is a diagnostic; training goes on
        log(f"profile not written ({type(err).__name__}: {err})")
