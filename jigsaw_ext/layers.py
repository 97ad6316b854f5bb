"""Block-sharded layers: local matmul + mappings from jigsaw_ext.collectives.

Every activation between layers is block-sharded: its token axis over DOMAIN, its feature axis over
TP. A `BlockLinear` maps the last dimension of such a block. The contracted axis is split over one
mesh axis (`contract`): each rank multiplies the block it holds, producing partial sums for every
output feature, and a reduce-scatter over `contract` leaves each rank exactly its output block, in
the layout the next layer needs. Channel mixing contracts over TP; token mixing (applied to the
transposed block) contracts over DOMAIN. The weight rows are spread over the other model axis
(`storage`), so each rank stores ~1/(DOMAIN*TP) of every matrix, and are gathered on use
(`replicate=True` keeps them replicated over `storage` instead: no weight traffic, more memory).

A `BlockMLP` (fc2 . GELU . fc1, the mixer's token- and channel-mixing MLPs) chooses per layer how
it meets its data (`STRATEGIES`): move the weights (Jigsaw's gather) or keep them stationary and move
the activations (Megatron's tensor + sequence parallelism along each axis). `mlp_traffic` is the
cost model `auto` uses; the job can force a strategy per layer kind (mesh.strategy).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .collectives import (autocast_dtype, close_bucket, copy_to, gather_blocks, gathered_linear,
                          linear_reduce_scatter, open_bucket, reduce_scatter, scatter_blocks, sum_partials)
from .layernorm import split_layer_norm
from .layout import Layout, Split, even_split
from .mesh import STRATEGIES, Mesh

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


def shared_param(layout: Layout, mesh: Mesh, init: tuple, device=None, dtype=None) -> nn.Parameter:
    """A small parameter (bias, LayerNorm affine) replicated over one model axis and used through
    `copy_to` over that axis: `bucket_small_gradients` sums its gradient with all the others in one
    collective per axis per backward."""
    p = make_param(layout, mesh, init, device, dtype)
    axes = replicated_axes(layout)
    p.shared_over = axes[0] if len(axes) == 1 else None
    return p


def bucket_small_gradients(module: nn.Module, mesh: Mesh) -> None:
    """Around every forward of `module`, route the `copy_to` of its shared parameters through one
    bucket per mesh axis (jigsaw_ext.collectives.open_bucket): the gradients of all LayerNorm affines
    and biases are then summed in ONE fp32 all-reduce per axis per backward (when the last of them is
    complete), not one all-reduce per parameter per use. Parameters that DeepSpeed ZeRO-3 partitions
    (their data exists only inside their own module's forward) keep the per-use reduction."""
    def shared():
        for p in module.parameters():
            axis = getattr(p, "shared_over", None)
            if axis is not None and p.requires_grad and not hasattr(p, "ds_id"):
                yield p, mesh.group(axis)

    module.register_forward_pre_hook(lambda mod, args: open_bucket(shared()))
    module.register_forward_hook(lambda mod, args, out: close_bucket())


def clear_gathered_weights(module: nn.Module) -> None:
    """Drop the weights kept since their last gather (mesh.keep_gathered_weights): call after every
    optimizer step (train.py does), so the next forward gathers the updated blocks."""
    for m in module.modules():
        for keep in getattr(m, "_kept", ()):
            if keep is not None:
                keep.clear()


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
        self.bias = shared_param(Layout((out,), (out_split,)), mesh, ("uniform", bound), device, dtype) \
            if bias else None
        # mesh.keep_gathered_weights: each gathered weight kept until clear_gathered_weights (per step)
        keep = mesh.keep_gathered_weights and not self.replicate and mesh.size(self.storage) > 1
        self._kept = [{} if keep else None for _ in in_splits]

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        storage, contract = self.mesh.group(self.storage), self.mesh.group(self.contract)
        if contract is not None and (storage is None or self.replicate):
            # no weight to gather: the products go straight into the reduce-scatter's buffer
            out = linear_reduce_scatter(xs, list(self.weights), contract, self.out_split.sizes,
                                        replicas=storage if self.replicate else None)
        else:
            partial = None
            for x, w, keep in zip(xs, self.weights, self._kept, strict=True):
                y = gathered_linear(x, w, storage, self.row_sizes, gather=not self.replicate, keep=keep)
                partial = y if partial is None else partial + y
            out = reduce_scatter(partial, contract, self.out_split.sizes, dim=-1)
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
        self.counts = [sum(s.sizes[r] for s in splits) for r in range(mesh.size(self.axis))]
        self.weights = nn.ParameterList(
            [shared_param(Layout((s.total,), (s,)), mesh, ("const", 1.0), device, dtype) for s in splits])
        self.biases = nn.ParameterList(
            [shared_param(Layout((s.total,), (s,)), mesh, ("const", 0.0), device, dtype) for s in splits])

    def forward(self, *xs: torch.Tensor):
        replicas = self.mesh.group(other_axis(self.axis))
        ws = [copy_to(w, replicas) for w in self.weights]
        bs = [copy_to(b, replicas) for b in self.biases]
        group = self.mesh.group(self.axis)
        if group is None and len(xs) == 1:  # feature axis not split: the fused kernel is exact
            return F.layer_norm(xs[0], (self.n,), ws[0], bs[0], self.eps)
        out_dtype = torch.float32 if autocast_dtype(xs[0].device) is not None else xs[0].dtype
        out = split_layer_norm(xs, ws, bs, group, self.counts, self.eps, out_dtype)
        return out[0] if len(out) == 1 else tuple(out)


# ------------------------------------------------------------------------------------------------
# An MLP of two block linears, with a per-layer strategy
# ------------------------------------------------------------------------------------------------
def mlp_traffic(strategy: str, rows: int, features: int, hidden: int, storage: int, contract: int,
                replicate: bool = False) -> float:
    """Elements one rank sends (ring volumes, as jigsaw_ext.commstats counts them) in one forward +
    backward of a BlockMLP on `rows` rows (micro-batch x rows per sample) of `features` features,
    hidden size `hidden`, storage / contract axes of these sizes.

    gather:     per weight matrix (hidden x features / contract): all-gather over storage forward and
                again backward, reduce-scatter of its gradient (all-reduce with replicate=True);
                activations: reduce-scatter over contract of each product, all-gather backward.
    stationary: all-gather of the rows over storage, all-reduce over contract of the hidden partial
                sums, reduce-scatter over storage of the output; the same three backward."""
    s, c, R, I, H = storage, contract, rows, features, hidden
    fs, fc = (s - 1) / s, (c - 1) / c
    if strategy == "gather":
        weights = 2 * (2 * fs * H * I / c) if replicate else 2 * 3 * fs * H * I / c
        return weights + 2 * fc * R * H / s + 2 * fc * R * I / s
    if strategy == "stationary":
        return 4 * fs * R * I / c + 4 * fc * R * H / s
    raise ValueError(f"unknown strategy {strategy!r}; allowed: {', '.join(STRATEGIES)}")


def mlp_extra_memory(strategy: str, rows: int, features: int, hidden: int, storage: int, contract: int) -> float:
    """Elements saved for backward beyond the gather strategy's (which keeps only this rank's block:
    its input rows and its hidden block): the stationary strategy keeps the gathered rows and the
    hidden activations of all rows."""
    if strategy == "gather":
        return 0.0
    s, c, R, I, H = storage, contract, rows, features, hidden
    return (R * I / c + 2 * R * H / s) - (R * I / (s * c) + 2 * R * H / (s * c))


def choose_strategy(mesh: Mesh, kind: str, rows: int, features: int, hidden: int, contract: str) -> str:
    """The job's strategy for this layer kind (mesh.strategy; key '*': every kind not listed), or
    with 'auto' the one that sends the
    fewest bytes (`mlp_traffic`; ties keep the weights gathered: the fully sharded layout) among those
    whose extra activation memory fits mesh.strategy_memory_mb."""
    requested = mesh.strategy.get(kind, mesh.strategy.get("*", "auto"))
    if requested != "auto":
        return requested
    shape = dict(rows=rows, features=features, hidden=hidden, storage=mesh.size(other_axis(contract)),
                 contract=mesh.size(contract))
    replicate = other_axis(contract) in mesh.replicate_weights_over
    costs = {"gather": mlp_traffic("gather", replicate=replicate, **shape),
             "stationary": mlp_traffic("stationary", **shape)}
    if mesh.strategy_memory_mb is not None and \
            mlp_extra_memory("stationary", **shape) * 4 > mesh.strategy_memory_mb * 2 ** 20:
        costs.pop("stationary")
    return min(costs, key=lambda k: (costs[k], k != "gather"))


def check_strategy_keys(model: nn.Module, mesh: Mesh) -> None:
    """A mesh.strategy key that names no layer kind of the model is an error (a typo would otherwise
    silently leave that layer on 'auto')."""
    kinds = set(resolved_strategies(model))
    unknown = sorted(set(mesh.strategy) - kinds - {"*"})
    if unknown:
        raise ValueError(f"mesh.strategy: unknown layer kind(s) {', '.join(unknown)}; this model has "
                         f"{', '.join(sorted(kinds)) or 'no strategy layers'} (or '*' for every kind)")


def resolved_strategies(model: nn.Module) -> dict[str, str]:
    """{layer kind: strategy} of the BlockMLPs of a built model (one entry per kind; kinds whose
    layers differ map to 'mixed')."""
    out: dict[str, str] = {}
    for m in model.modules():
        if isinstance(m, BlockMLP):
            out[m.kind] = m.strategy if out.get(m.kind, m.strategy) == m.strategy else "mixed"
    return out


class _Affine(nn.Module):
    """One linear map of a stationary BlockMLP: its weight and bias blocks, used only through this
    module's own calls (DeepSpeed ZeRO-3 materialises a module's parameters around its forward)."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None):
        super().__init__()
        self.weights = nn.ParameterList([weight])
        self.bias = bias

    def forward(self, x: torch.Tensor, bias_group=None, matmul: bool = True) -> torch.Tensor:
        """x @ W^T (matmul=True), or x + bias (the bias replicated over `bias_group`)."""
        if matmul:
            return F.linear(x, self.weights[0])
        return x if self.bias is None else x + copy_to(self.bias, bias_group)


class BlockMLP(nn.Module):
    """fc2(GELU(fc1(x))) over the last dimension of a block-sharded x whose features are split over
    `contract` (in_split) and whose rows (dimension `row_dim`: tokens for channel mixing, features
    for token mixing) are split over the other model axis, `storage` (row_split).

    strategy "gather" (Jigsaw): two BlockLinears contracting over `contract`; each weight is stored
        once per model group, its row blocks gathered over `storage` on use; partial sums are
        reduce-scattered over `contract`, so the hidden activation stays block-sharded.
    strategy "stationary": weights never move, activations do (Megatron's tensor + sequence
        parallelism, along each axis): the rows are all-gathered over `storage`; fc1 multiplies
        this rank's (hidden/storage x features/contract) weight block, the hidden partial sums are
        all-reduced over `contract`; GELU; fc2 multiplies its (features/contract x hidden/storage)
        block and the output partial sums are reduce-scattered over `storage`, back to x's layout.
        Weight gradients need no communication at all.
    Both compute the same function with the same logical parameters (fc1.weights.0, fc1.bias,
    fc2.weights.0, fc2.bias), stored in different blocks; checkpoints are layout-free."""

    def __init__(self, mesh: Mesh, kind: str, in_split: Split, hidden: int, row_split: Split, row_dim: int,
                 contract: str, fc2_bias: bool = True, micro_batch: int = 1, device=None, dtype=None):
        super().__init__()
        self.mesh, self.kind, self.contract, self.storage = mesh, kind, contract, other_axis(contract)
        if row_split.axis != self.storage or in_split.axis != contract:
            raise ValueError(f"{kind}: rows must be split over '{self.storage}' and features over '{contract}'")
        self.row_split, self.row_dim = row_split, row_dim
        self.strategy = choose_strategy(mesh, kind, micro_batch * row_split.total, in_split.total, hidden, contract)
        kw = dict(device=device, dtype=dtype)
        if self.strategy == "gather":
            hidden_split = Split(contract, even_split(hidden, mesh.size(contract)))
            self.fc1 = BlockLinear(mesh, [in_split], hidden_split, contract=contract, **kw)
            self.fc2 = BlockLinear(mesh, [hidden_split], in_split, contract=contract, bias=fc2_bias, **kw)
            return
        hidden_split = Split(self.storage, even_split(hidden, mesh.size(self.storage)))
        b1, b2 = 1.0 / math.sqrt(in_split.total), 1.0 / math.sqrt(hidden)
        self.fc1 = _Affine(make_param(Layout((hidden, in_split.total), (hidden_split, in_split)), mesh,
                                      ("uniform", b1), **kw),
                           shared_param(Layout((hidden,), (hidden_split,)), mesh, ("uniform", b1), **kw))
        self.fc2 = _Affine(make_param(Layout((in_split.total, hidden), (in_split, hidden_split)), mesh,
                                      ("uniform", b2), **kw),
                           shared_param(Layout((in_split.total,), (in_split,)), mesh, ("uniform", b2), **kw)
                           if fc2_bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.strategy == "gather":
            return self.fc2(F.gelu(self.fc1(x)))
        storage, contract = self.mesh.group(self.storage), self.mesh.group(self.contract)
        # every row is independent: the rows stay in the all-gather's rank-major order (its buffer)
        # through both products and are reduce-scattered from that same layout: no copy in between
        rows = self.row_split.sizes
        x_rows = gather_blocks(x, storage, rows, dim=self.row_dim)
        h = F.gelu(self.fc1(sum_partials(self.fc1(x_rows), contract), contract, matmul=False))
        shape = (*x.shape[:-1], self.fc2.weights[0].shape[0])
        y = scatter_blocks(self.fc2(h), storage, rows, shape)
        return self.fc2(y, storage, matmul=False)
