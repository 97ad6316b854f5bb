"""Let megatron-core's tensor-parallel layers run on a CPU-only torch build: the one shim.

megatron-core allocates buffers on `torch.cuda.current_device()` (sequence parallelism, its global
memory buffer, gather_output=True) and keeps RNG states through torch.cuda's generator API
(`model_parallel_cuda_manual_seed`, `get_cuda_rng_tracker().fork()`, `tensor_parallel.checkpoint`).
On a build without CUDA all of these raise "Torch not compiled with CUDA enabled" (see
docs/stack.md). `install()` points them at the CPU equivalents: current_device -> the CPU device,
the CUDA RNG state -> the CPU generator. It changes nothing when CUDA is available.

`import_megatron_core()` imports megatron-core without the ~4 s its import spends in torch.compile:
its fused kernels are decorated with torch.compile at import (megatron.core.jit.jit_fuser), and the
first such call imports torch's inductor, in every process (each rank of each job); here they are
compiled on their first call instead, as torch.compile would do anyway.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable
from typing import Any

import torch

_installed = False


def _cpu_device(*_args, **_kwargs) -> torch.device:
    return torch.device("cpu")


def _get_rng_state(*_args, **_kwargs) -> torch.Tensor:
    return torch.get_rng_state()


def _set_rng_state(new_state: torch.Tensor, *_args, **_kwargs) -> None:
    torch.set_rng_state(new_state)


def _manual_seed(seed: int) -> None:
    # not torch.manual_seed: it calls torch.cuda.manual_seed_all, i.e. this function
    torch.default_generator.manual_seed(int(seed))


@contextlib.contextmanager
def _compile_on_first_call():
    """torch.compile(fn, ...) for plain functions returns a wrapper that compiles on its first call."""
    real = torch.compile

    def deferred(model=None, **kwargs):
        if model is None:  # @torch.compile(**kwargs)
            return lambda fn: deferred(fn, **kwargs)
        if isinstance(model, torch.nn.Module):
            return real(model, **kwargs)
        compiled = None

        @functools.wraps(model)
        def call(*args, **kw):
            nonlocal compiled
            if compiled is None:
                compiled = real(model, **kwargs)
            return compiled(*args, **kw)

        return call

    torch.compile = deferred
    try:
        yield
    finally:
        torch.compile = real


def import_megatron_core() -> None:
    """Import megatron.core (its package and tensor_parallel) once per process, its import-time
    torch.compile calls deferred to their first call (see the module docstring)."""
    if "megatron.core.tensor_parallel" in sys.modules:
        return
    with _compile_on_first_call():
        import megatron.core.tensor_parallel  # noqa: F401 - imported for its side effect: the cached modules


def install() -> bool:
    """Redirect the torch.cuda calls megatron-core makes to CPU equivalents if CUDA is absent.

    Idempotent; returns True if the shim is active."""
    global _installed
    if _installed:
        return True
    if torch.cuda.is_available():
        return False
    cpu: dict[str, Callable[..., Any]] = {
        "current_device": _cpu_device,
        "get_rng_state": _get_rng_state,
        "set_rng_state": _set_rng_state,
        "get_rng_state_all": lambda: [torch.get_rng_state()],
        "set_rng_state_all": lambda states: torch.set_rng_state(states[0]),
        "manual_seed": _manual_seed,
        "manual_seed_all": _manual_seed,
    }
    for name, fn in cpu.items():
        setattr(torch.cuda, name, fn)
        if hasattr(torch.cuda.random, name):  # megatron also calls torch.cuda.random.get_rng_state
            setattr(torch.cuda.random, name, fn)

    # megatron's own setter goes through torch.cuda.default_generators and torch.cuda._lazy_call,
    # which on a CPU build silently queues the call forever: replace it too
    import_megatron_core()
    from megatron.core.tensor_parallel import random as mpu_random

    mpu_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    mpu_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    _installed = True
    return True
