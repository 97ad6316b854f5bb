"""Block-sharded layers: local matmul + mappings from jigsaw_ext.collectives.

Every activation between layers is block-sharded: its token axis over DOMAIN, its feature axis over
TP. A `BlockLinear` maps the last dimension of such a block. The contracted axis is split over one
mesh axis (`contract`): each rank multiplies the block it holds, producing partial sums for every
output feature, and a reduce-scatter over `contract` leaves each rank exactly its output block, in
the layout the next layer needs. Channel mixing contracts over TP; token mixing (applied to the
transposed block) contracts over DOMAIN. The weight rows are spread over the other model axis
(`storage`), so each rank stores ~1/(DOMAIN*TP) of every matrix, and are gathered on use
(`replicate=True` keeps them replicated over `storage` instead: no weight traffic, more memory).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .collectives import autocast_dtype, copy_to, gathered_linear, reduce_scatter, split_layer_norm
from .layout import Layout, Split, even_split
from .mesh import Mesh

MODEL_AXES = ("domain", "tp")


def other_axis(axis: str) -> str:
    return {"domain": "tp", "tp": "domain"}[axis]


def make_param(layout: Layout, mesh: Mesh, init: tuple, device=None, dtype=None) -> nn.Parameter:
    """A parameter holding this rank's block of a logical tensor.

    `layout` says how the logical tensor is split; `init` how its logical values are drawn
    (jigsaw_ext.init), so every mesh ends up with the same logical model."""
    p = nn.Parameter(torch.empty(layout.local_shape(mesh.coords), device=device, dtype=dtype))
    p.block_layout = layout
    p.block_init = init
    # DeepSpeed's gradient norm counts a parameter on every rank where `model_parallel` is set and
    # otherwise only on model-parallel rank 0: flag exactly one replica of each block (coordinate 0
    # on the axes it is replicated over), so the norm over the model group counts every element once
    p.model_parallel = all(mesh.coord(axis) == 0 for axis in replicated_axes(layout))
    return p


def replicated_axes(layout: Layout) -> tuple[str, ...]:
    """Model axes over which a parameter with this layout is replicated."""
    return tuple(a for a in MODEL_AXES if a not in layout.split_axes)


class BlockLinear(nn.Module):
    """y = sum_s x_s @ W_s^T + b over the last dimension of block-sharded inputs.

    in_splits: for each input segment, how its features are split over `contract`.
    out_split: how the output features are split over `contract` after the reduce-scatter.
    Several input segments implement a linear map of a concatenation ([LN(x) || z0]) without
    materialising it: the logical weight is the concatenation of the segment weights.
    """

    def __init__(self, mesh: Mesh, in_splits: Sequence[Split], out_split: Split, contract: str,
                 bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.mesh, self.contract, self.storage = mesh, contract, other_axis(contract)
        self.out_split = out_split
        self.replicate = self.storage in mesh.replicate_weights_over
        out = out_split.total
        self.row_sizes = even_split(out, mesh.size(self.storage))
        fan_in = sum(s.total for s in in_splits)
        bound = 1.0 / math.sqrt(fan_in)
        rows = None if self.replicate else Split(self.storage, self.row_sizes)
        self.weights = nn.ParameterList([
            make_param(Layout((out, s.total), (rows, s)), mesh, ("uniform", bound), device, dtype)
            for s in in_splits])
        self.bias = make_param(Layout((out,), (out_split,)), mesh, ("uniform", bound), device, dtype) \
            if bias else None

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        storage = self.mesh.group(self.storage)
        partial = None
        for x, w in zip(xs, self.weights, strict=True):
            y = gathered_linear(x, w, storage, self.row_sizes, gather=not self.replicate)
            partial = y if partial is None else partial + y
        out = reduce_scatter(partial, self.mesh.group(self.contract), self.out_split.sizes, dim=-1)
        if self.bias is not None:
            out = out + copy_to(self.bias, storage)
        return out


class DistLayerNorm(nn.Module):
    """Exact LayerNorm over a feature axis split over `axis`: mean and variance are taken over the
    full (concatenated) feature axis, combined across ranks, so every mesh computes the same
    function. Several segments normalise a concatenation without materialising it."""

    def __init__(self, mesh: Mesh, splits: Sequence[Split], eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.mesh, self.eps = mesh, eps
        self.axis = splits[0].axis
        self.n = sum(s.total for s in splits)
        self.weights = nn.ParameterList(
            [make_param(Layout((s.total,), (s,)), mesh, ("const", 1.0), device, dtype) for s in splits])
        self.biases = nn.ParameterList(
            [make_param(Layout((s.total,), (s,)), mesh, ("const", 0.0), device, dtype) for s in splits])

    def forward(self, *xs: torch.Tensor):
        replicas = self.mesh.group(other_axis(self.axis))
        ws = [copy_to(w, replicas) for w in self.weights]
        bs = [copy_to(b, replicas) for b in self.biases]
        group = self.mesh.group(self.axis)
        if group is None and len(xs) == 1:  # feature axis not split: the fused kernel is exact
            return F.layer_norm(xs[0], (self.n,), ws[0], bs[0], self.eps)
        out_dtype = torch.float32 if autocast_dtype(xs[0].device) is not None else xs[0].dtype
        out = split_layer_norm(xs, ws, bs, group, self.n, self.eps, out_dtype)
        return out[0] if len(out) == 1 else tuple(out)
