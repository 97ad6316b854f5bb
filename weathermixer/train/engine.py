"""What the DeepSpeed engine is built from: AdamW parameter groups by name, the learning-rate
schedule, ZeRO-3 registration of the layers' ParameterList weights, threads per process, and the
peak-memory and peak-FLOP/s figures the logs report."""

from __future__ import annotations

import fnmatch
import math
import os
import resource

import torch

from jigsaw_ext.plan.chips import chip_of, chip_peak, math_mode  # the one table of chip peaks

from ..runtime import bind_cores, set_threads


def chip_peak_tflops(device_name: str, dtype: torch.dtype, tf32: bool) -> float | None:
    """The dense peak of the named chip for this dtype and math mode; None for an unknown chip."""
    chip = chip_of(device_name)
    return None if chip is None else chip_peak(chip, math_mode(dtype, tf32))


def lr_lambda(cfg):
    """Linear warm-up to 1, then cosine decay to min_lr_ratio at the last step."""

    def f(step: int) -> float:  # step = optimizer steps taken so far
        if step < cfg.warmup:
            return (step + 1) / (cfg.warmup + 1)
        progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def _matches(name: str, rule) -> bool:
    return any(fnmatch.fnmatchcase(name, pat) for pat in rule.match)


def param_groups(model: torch.nn.Module, rules, lr: float) -> list[dict]:
    """AdamW groups by name: the first rule a parameter matches decides its lr scale and weight decay.
    Group membership depends on names only, so it is the same on every rank."""
    groups = [
        {
            "params": [],
            "names": [],
            "name": f"rule{i}:{'|'.join(r.match)}",
            "lr": lr * r.lr_scale,
            **({"weight_decay": r.weight_decay} if r.weight_decay is not None else {}),
        }
        for i, r in enumerate(rules)
    ]
    default = {"params": [], "names": [], "name": "default", "lr": lr}
    for name, p in model.named_parameters():
        g = next((g for g, r in zip(groups, rules, strict=True) if _matches(name, r)), default)
        g["params"].append(p)
        g["names"].append(name)
    return [{k: v for k, v in g.items() if k != "names"} for g in [default] + groups if g["params"]]


def register_list_parameters(model: torch.nn.Module) -> None:
    """ZeRO-3 gathers a module's own parameters around its forward; the layers keep theirs in
    ParameterLists (a submodule whose forward never runs), so hand them to the owning layer."""
    from deepspeed.runtime.zero import register_external_parameter

    for module in model.modules():
        for child in module.children():
            if isinstance(child, torch.nn.ParameterList):
                for p in child:
                    register_external_parameter(module, p)


def current_memory_bytes(device: torch.device) -> int:
    """Memory in use now: allocated device memory on GPU; on CPU the process's anonymous resident
    memory (RssAnon: its heap, not the shared libraries and files it maps). A leak shows as a rising
    curve of this, while the peak only ever rises."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return peak_memory_bytes(device)  # not Linux


def _libc():
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC = lib if hasattr(lib, "malloc_trim") and hasattr(lib, "mallopt") else False
        except OSError:  # not glibc
            _LIBC = False
    return _LIBC


_LIBC = None
M_ARENA_MAX, M_MMAP_THRESHOLD, M_TRIM_THRESHOLD = -8, -3, -1  # glibc's mallopt parameter numbers


def limit_malloc_arenas(arenas: int = 2) -> None:
    """At most `arenas` glibc heaps (unless MALLOC_ARENA_MAX is set). Each validation pass reads
    through a new prefetch thread; with glibc's default (8 per core) every new thread could get a
    fresh heap whose freed blocks stay resident: a long run grew ~10 MB per validation
    (benchmarks/bench_memory.py), with 2 arenas it stays flat. Affects threads started later."""
    lib = _libc()
    if lib and "MALLOC_ARENA_MAX" not in os.environ:
        lib.mallopt(M_ARENA_MAX, arenas)


def keep_freed_blocks(enabled: bool = True, mmap_threshold: int = 32 * 2**20, trim_threshold: int = 2**31 - 1) -> bool:
    """CPU runs: serve allocations up to 32 MiB (activations, gathered weights, collective buffers)
    from glibc's heap and keep freed heap memory instead of handing it back after every free (unless
    MALLOC_MMAP_THRESHOLD_ or MALLOC_TRIM_THRESHOLD_ is set). PyTorch's CPU allocator is malloc, and by
    default each such tensor is a fresh mmap whose pages the kernel zeroes and faults in again on
    every step (on 2 ranks x 1 thread, quickstart job with model.hidden=1024: 5 % of a step in page
    faults). release_free_memory still trims the heap after validation and checkpoints. enabled: False
    on GPU runs. True if set."""
    lib = _libc()
    if not enabled or not lib or {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"} & set(os.environ):
        return False
    return bool(lib.mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(lib.mallopt(M_TRIM_THRESHOLD, trim_threshold))


def resolve_tf32(setting: bool | None, cuda: bool) -> bool:
    """Whether fp32 matmuls run in TF32: train.tf32 (null = on for compute capability 8.0 and
    newer); never on CPU."""
    if not cuda:
        return False
    if setting is not None:
        return setting
    return torch.cuda.get_device_capability()[0] >= 8


def apply_tf32(setting: bool | None, cuda: bool) -> bool:
    """Set torch's TF32 switches for matmuls and cuDNN from train.tf32; returns the mode in force."""
    on = resolve_tf32(setting, cuda)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = on
        torch.backends.cudnn.allow_tf32 = on
    return on


def setup_host(cuda: bool, bind: bool = True) -> list[int] | None:
    """The process settings a training rank starts with: its cores (CPU), its threads, glibc's heaps
    and their freed blocks (CPU). Returns the cores bound to (bind_cores)."""
    bound = bind_cores(enabled=bind and not cuda)
    set_threads()
    limit_malloc_arenas()
    keep_freed_blocks(enabled=not cuda)
    return bound


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc malloc_trim), after validation and
    checkpoints, which allocate and free many buffers."""
    lib = _libc()
    if lib:
        lib.malloc_trim(0)


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # resident set, Linux: KiB
