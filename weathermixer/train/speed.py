"""The single-device speed options the trainer applies (train.compile_blocks, train.sync_debug,
log.profile_step) and the start-up line naming the fused kernels in use.

Regional compilation (as torchtitan does): each mixer block is compiled on its own, so one graph
serves every block of the same shapes and a change to the model outside the blocks never
recompiles them; the layers' collectives trace as functional collectives (tests/integration/test_compile.py).
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager

import torch

from jigsaw_ext.fused import kernels

from .profiling import profiled_step


def compile_blocks(model: torch.nn.Module, backend: str = "inductor") -> int:
    """Compile each of model.blocks in place (nn.Module.compile); returns how many."""
    for block in model.blocks:
        block.compile(backend=backend)
    return len(model.blocks)


def optimizer_name(ds: dict) -> str:
    opt = ds.get("optimizer") or {}
    params = opt.get("params") or {}
    if not opt:
        return "none configured"
    fused = " fused" if params.get("fused") else ""
    impl = "torch" if params.get("torch_adam") else "DeepSpeed"
    return f"{impl}{fused} {opt.get('type', '?')}"


def kernels_line(ds: dict, compiled: int, backend: str) -> str:
    """One start-up line: what runs the LayerNorms, the optimizer, and whether the blocks compile."""
    k = kernels()
    return (
        f"kernels: LayerNorm {k['layer_norm']}; optimizer {optimizer_name(ds)} (apex FusedAdam "
        f"{k['apex_fused_adam']}); mixer blocks "
        + (f"compiled ({compiled}, {backend})" if compiled else "eager (train.compile_blocks=false)")
    )


@contextmanager
def sync_debug(mode: str | None, device: torch.device):
    """torch.cuda.set_sync_debug_mode(mode) for the body (GPU only); the previous mode after."""
    if not mode or device.type != "cuda":
        yield
        return
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


@contextmanager
def step_context(job, step: int, first_step: int, device: torch.device, rank: int, log=print):
    """What wraps one training step: the sync check (not on the run's first step, which allocates and
    initialises lazily) and the profiler on log.profile_step."""
    with ExitStack() as stack:
        if step > first_step:
            stack.enter_context(sync_debug(job.train.sync_debug, device))
        stack.enter_context(profiled_step(job.log.profile_step == step, job.log.dir, rank, device, log))
        yield
