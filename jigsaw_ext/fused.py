"""Optional fused GPU kernels: NVIDIA apex, used when a user built it, else torch's own.

apex is not on the package registry (the PyPI package named `apex` is an unrelated web toolkit), so
it is looked up once, at first use, and never required. `kernels()` names what is in use (the
trainer logs it at start-up); `layer_norm` is the LayerNorm of every unsplit feature axis.
"""

from __future__ import annotations

import importlib
from functools import cache

import torch
import torch.nn.functional as F


@cache
def apex_layer_norm():
    """apex's fused_layer_norm_affine(input, weight, bias, normalized_shape, eps), or None."""
    try:
        module = importlib.import_module("apex.normalization.fused_layer_norm")
        return module.fused_layer_norm_affine
    except (ImportError, AttributeError, OSError):  # absent, or built without its CUDA extension
        return None


@cache
def apex_fused_adam():
    """apex.optimizers.FusedAdam, or None."""
    try:
        return importlib.import_module("apex.optimizers").FusedAdam
    except (ImportError, AttributeError, OSError):
        return None


def kernels() -> dict[str, str]:
    """What this process uses for its fused operations."""
    return {
        "layer_norm": "apex FusedLayerNorm" if apex_layer_norm() else "torch F.layer_norm",
        "apex_fused_adam": "available" if apex_fused_adam() else "not installed",
    }


def layer_norm(x: torch.Tensor, n: int, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last `n` features: apex's fused kernel for CUDA tensors when apex is
    installed, else (and on the CPU, and under torch.compile, which fuses its own) F.layer_norm."""
    fused = apex_layer_norm()
    if fused is not None and x.is_cuda and not torch.compiler.is_compiling():
        return fused(x, weight, bias, (n,), eps)
    return F.layer_norm(x, (n,), weight, bias, eps)
