"""This machine's compute rates, measured on a model's own operators.

A hardware profile prices products at a GEMM rate and every other operator at a memory rate. On a
shared machine both drift (on the 2-core CPU machine the same matmul ran at 108-194 GFLOP/s within a
day), so a check of the planner against a measured step needs the rates of the same minutes. Here they
come from the operators of one traced step: each operator the trace prices is run again on real tensors
of its shapes, dtypes and strides (random values; integer tensors zero, so any index is valid), one at a
time, and timed (median of `reps` after `warmup` runs). The products' FLOPs over their time give the
GEMM rate, the other operators' bytes (read + written, as `StepTrace.other_bytes` counts them) over
their time the elementwise rate. What this leaves out is what the planner is then checked on: the
layout's sharding, its collectives, their overlap, ranks sharing cores, DeepSpeed's step.

    from jigsaw_ext.plan.calibrate import measured_rates, with_rates
    rates = measured_rates(planner, micro_batch=8)
    hw = with_rates(load_hardware("cpu-gloo-2core"), rates)
"""

from __future__ import annotations

import statistics
import time

import torch
from torch.utils._pytree import tree_map

from ..mesh import MeshConfig
from .hardware import Hardware
from .trace import TracedOp, fake_mesh, trace_step


def traced_ops(planner, micro_batch: int, domain: int = 1, tp: int = 1) -> list[TracedOp]:
    """The priced operators of one micro-step of `planner`'s model (rank 0 of a domain x tp group),
    traced at `micro_batch` directly (not extrapolated)."""
    cfg = MeshConfig(domain=domain, tp=tp, strategy=planner.strategy, chunk_mb=planner.chunk_mb)
    mesh = fake_mesh(cfg, 0)
    dtype = getattr(torch, planner.dtype)
    model = planner.model.build(mesh, dtype, micro_batch)
    ops: list[TracedOp] = []
    trace_step(model, lambda m: planner.model.step(m, mesh, micro_batch, dtype), ops)
    return ops


def _real(t: torch.Tensor) -> torch.Tensor:
    """A CPU tensor with t's size, stride, offset and dtype (values: normal floats, zero integers)."""
    extent = t.storage_offset() + 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride(), strict=True))
    base = torch.empty(extent if t.numel() else 0, dtype=t.dtype)
    if base.is_floating_point() or base.is_complex():
        base.normal_()
    else:
        base.zero_()
    return (
        base.as_strided(t.shape, t.stride(), t.storage_offset()) if t.numel() else torch.empty(t.shape, dtype=t.dtype)
    )


def _materialize(op: TracedOp) -> tuple[tuple, dict]:
    memo: dict[int, torch.Tensor] = {}  # the same meta tensor twice -> the same real tensor

    def real(x):
        if isinstance(x, torch.Tensor):
            if id(x) not in memo:
                memo[id(x)] = _real(x)
            return memo[id(x)]
        if isinstance(x, torch.device):
            return torch.device("cpu")
        return x

    return tree_map(real, op.args), tree_map(real, op.kwargs)


def replay(ops: list[TracedOp], reps: int = 5, warmup: int = 2) -> dict:
    """Seconds of the products and of the other operators, each operator timed on its own; operators
    that cannot run on made-up values are counted in `skipped` (their bytes and FLOPs apart)."""
    seconds = {"matmul": 0.0, "elementwise": 0.0}
    flops = nbytes = 0
    skipped: list[TracedOp] = []
    with torch.no_grad():
        for op in ops:
            try:
                args, kwargs = _materialize(op)
                for _ in range(warmup):
                    op.func(*args, **kwargs)  # type: ignore[operator]
                times = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    op.func(*args, **kwargs)  # type: ignore[operator]
                    times.append(time.perf_counter() - t0)
            except (RuntimeError, ValueError, TypeError, IndexError, NotImplementedError):
                skipped.append(op)
                continue
            seconds["matmul" if op.flops else "elementwise"] += statistics.median(times)
            flops, nbytes = flops + op.flops, nbytes + op.bytes
    return {
        "matmul_s": seconds["matmul"],
        "matmul_flops": flops,
        "elementwise_s": seconds["elementwise"],
        "elementwise_bytes": nbytes,
        "skipped": {
            "ops": len(skipped),
            "flops": sum(op.flops for op in skipped),
            "bytes": sum(op.bytes for op in skipped),
            "names": sorted({str(op.func) for op in skipped}),
        },
    }


def measured_rates(planner, micro_batch: int, reps: int = 5, threads: int = 1) -> dict:
    """{"gemm_GFLOPs", "elementwise_GBps", ...}: the rates of one replayed micro-step of the planner's
    model on one rank (1 x 1 x 1), with `threads` torch threads."""
    ops = traced_ops(planner, micro_batch)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        r = replay(ops, reps)
    finally:
        torch.set_num_threads(before)
    return {
        "gemm_GFLOPs": round(r["matmul_flops"] / r["matmul_s"] / 1e9, 2) if r["matmul_s"] else None,
        "elementwise_GBps": round(r["elementwise_bytes"] / r["elementwise_s"] / 1e9, 3) if r["elementwise_s"] else None,
        "matmul_s": round(r["matmul_s"], 5),
        "elementwise_s": round(r["elementwise_s"], 5),
        "operators": len(ops),
        "skipped": r["skipped"],
    }


def with_rates(hw: Hardware, rates: dict, mode: str = "fp32") -> Hardware:
    """`hw` pricing every product of `mode` at rates["gemm_GFLOPs"] and every other operator (and the
    optimizer's passes) at rates["elementwise_GBps"]."""
    update: dict = {"memory_GBps": rates["elementwise_GBps"], "elementwise_efficiency": 1.0}
    update["peak_tflops"] = {**hw.peak_tflops, mode: rates["gemm_GFLOPs"] / 1e3}
    update["gemm"] = [p for p in hw.gemm if p.mode != mode]
    update["gemm_efficiency"] = 1.0
    if hw.chip is not None:
        update["chip"] = None
    return hw.updated(update)
