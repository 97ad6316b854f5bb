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
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import aligned
from .chunked import chunked_gathered_linear, gathered_weight, linear_reduce_scatter, row_chunks, weight_chunks
from .collectives import (
    all_gather,
    autocast_dtype,
    close_bucket,
    copy_to,
    gather_blocks,
    gathered_linear,
    open_bucket,
    reduce_scatter,
    scatter_blocks,
    start_weight_gather,
    sum_partials,
)
from .fused import layer_norm as fused_layer_norm
from .layernorm import blocks_layer_norm, split_layer_norm
from .layout import Layout, Split, even_split
from .mesh import Mesh
from .strategy import (
    choose_strategy,
    fuses_norm,
    mlp_traffic,  # noqa: F401
    other_axis,
)

MODEL_AXES = ("domain", "tp")


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
    """A small parameter (bias, LayerNorm affine) replicated over one model axis (or both: then over
    the 'model' group, unless one of them has size 1) and used through `copy_to` over that group
    (`p.shared_over`): `bucket_small_gradients` sums its gradient with all the others in one
    collective per group per backward."""
    p = make_param(layout, mesh, init, device, dtype)
    axes = [a for a in replicated_axes(layout) if mesh.size(a) > 1] or list(replicated_axes(layout))[:1]
    p.shared_over = axes[0] if len(axes) == 1 else "model" if len(axes) == 2 else None
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
    """Drop the weights kept since their last gather (mesh.keep_gathered_weights) and any prefetched
    gather not yet used (mesh.prefetch_weights): call after every optimizer step (train.py does), so
    the next forward gathers the updated blocks."""
    for m in module.modules():
        for keep in getattr(m, "_kept", ()):
            if keep is not None:
                keep.clear()
        if isinstance(m, BlockLinear):
            m.drop_prefetched()


def link_weight_prefetch(model: nn.Module) -> int:
    """mesh.prefetch_weights: chain the model's BlockLinears whose weights are gathered whole on use
    (strategy 'gather', weights neither replicated, kept nor chunked), in the order the model
    registers them, which must be the order its forward runs them (WeatherMixer: embedding, each
    block's token then channel MLP, fc1 then fc2, the recovery head). Each then starts the gather of
    the next one's weights before computing its own products. A prefetch is good for the forward that
    issued it only: the model's forward drops what is left (so no gather survives an optimizer step).
    Returns the number of layers chained."""
    chain = [m for m in model.modules() if isinstance(m, BlockLinear) and m.prefetchable]
    for a, b in zip(chain, chain[1:]):
        a.__dict__["_next_gathered"] = b  # not a submodule
    for m in chain:
        m.__dict__["_chained"] = True
    if chain:

        def drop(mod, args):
            for m in chain:
                m.drop_prefetched()

        model.register_forward_pre_hook(drop)
    return len(chain)


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

    def __init__(
        self,
        mesh: Mesh,
        in_splits: Sequence[Split],
        out_split: Split,
        contract: str,
        bias: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.mesh, self.contract, self.storage = mesh, contract, other_axis(contract)
        self.out_split = out_split
        self.replicate = self.storage in mesh.replicate_weights_over
        out = out_split.total
        self.row_sizes = even_split(out, mesh.size(self.storage))
        fan_in = sum(s.total for s in in_splits)
        bound = 1.0 / math.sqrt(fan_in)
        rows = None if self.replicate else Split(self.storage, self.row_sizes)
        self.weights = nn.ParameterList(
            [make_param(Layout((out, s.total), (rows, s)), mesh, ("uniform", bound), device, dtype) for s in in_splits]
        )
        self.bias = (
            shared_param(Layout((out,), (out_split,)), mesh, ("uniform", bound), device, dtype) if bias else None
        )
        # mesh.keep_gathered_weights: each gathered weight kept until clear_gathered_weights (per step)
        keep = mesh.keep_gathered_weights and not self.replicate and mesh.size(self.storage) > 1
        self._kept = [{} if keep else None for _ in in_splits]
        # mesh.chunk_mb: each gathered weight moved in pipelined chunks (jigsaw_ext.chunked)
        gathered = not (keep or self.replicate) and mesh.size(self.storage) > 1
        # (sized by the largest shard: every rank of the model group makes the same choice)
        self._chunks = [
            weight_chunks(out, max(s.sizes), mesh.chunk_mb, max(self.row_sizes)) if gathered else 1 for s in in_splits
        ]
        # mesh.prefetch_weights (link_weight_prefetch): (key, pending gather) per weight, started by the
        # layer before this one
        self._prefetched: list = [None for _ in in_splits]
        self.__dict__["_next_gathered"] = None
        self.prefetchable = (
            gathered
            and not keep
            and max(self._chunks) == 1
            and not (mesh.chunk_mb is not None and mesh.size(contract) > 1)
        )

    def prefetch(self) -> None:
        """Start the forward gathers of this layer's weights (mesh.prefetch_weights). Not under
        torch.compile, not in backward (activation checkpointing's recompute), not for weights DeepSpeed
        ZeRO-3 partitions (their data exists only inside their module's forward)."""
        if (
            torch.compiler.is_compiling()
            or torch._C._current_graph_task_id() != -1
            or any(hasattr(w, "ds_id") for w in self.weights)
        ):
            return
        storage = self.mesh.group(self.storage)
        for i, w in enumerate(self.weights):
            if self._prefetched[i] is None:
                self._prefetched[i] = start_weight_gather(w, storage, self.row_sizes)

    def drop_prefetched(self) -> None:
        for slot in self._prefetched:
            if slot is not None:
                slot[1].wait()  # completed, so no transfer is left in flight
        self._prefetched = [None] * len(self._prefetched)

    def _take_prefetched(self, i: int, w: torch.Tensor, x: torch.Tensor):
        slot, self._prefetched[i] = self._prefetched[i], None
        if slot is None:
            return None
        key, pending = slot
        dtype = autocast_dtype(x.device) or w.dtype
        if key != (w._version, dtype):  # the block changed in place, or the compute dtype did
            pending.wait()
            return None
        return pending

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        storage, contract = self.mesh.group(self.storage), self.mesh.group(self.contract)
        # mesh.chunk_mb: partial sums over the bound are computed and reduce-scattered in row chunks
        rows = (
            row_chunks(math.prod(xs[0].shape[:-1]), self.out_split.total, self.mesh.chunk_mb)
            if contract is not None
            else 1
        )
        whole = all(k is None for k in self._kept) and max(self._chunks) == 1
        if contract is not None and (storage is None or self.replicate):
            # no weight to gather: the products go straight into the reduce-scatter's buffer
            out = linear_reduce_scatter(
                xs, list(self.weights), contract, self.out_split.sizes, storage if self.replicate else None, rows
            )
        elif contract is not None and self.mesh.chunk_mb is not None and whole:
            # weights under the bound: each gathered once for all row chunks (and kept to backward);
            # every rank of the storage group takes this branch whatever its rows (uneven shards)
            ws = [gathered_weight(w, storage, self.row_sizes) for w in self.weights]
            out = linear_reduce_scatter(xs, ws, contract, self.out_split.sizes, None, rows)
        else:
            if self.__dict__.get("_chained"):
                self.prefetch()  # (unless the layer before did) this layer's gathers go first
            mine = [self._take_prefetched(i, w, x) for i, (w, x) in enumerate(zip(self.weights, xs))]
            if self.__dict__["_next_gathered"] is not None:  # its weights move while this layer computes
                self.__dict__["_next_gathered"].prefetch()
            partial = None
            for x, w, keep, chunks, pre in zip(xs, self.weights, self._kept, self._chunks, mine, strict=True):
                y = (
                    chunked_gathered_linear(x, w, storage, self.row_sizes, chunks)
                    if chunks > 1
                    else gathered_linear(
                        x,
                        w,
                        storage,
                        self.row_sizes,
                        gather=not self.replicate,
                        keep=keep,
                        prefetched=pre,
                        align=self.mesh.gemm_multiple,
                    )
                )
                partial = y if partial is None else partial + y
            out = reduce_scatter(partial, contract, self.out_split.sizes, dim=-1)
        if self.bias is not None:
            out = out + copy_to(self.bias, storage)
        return out


class DistLayerNorm(nn.Module):
    """Exact LayerNorm over a feature axis split over `axis`: mean and variance are taken over the
    full (concatenated) feature axis, combined across ranks, so every mesh computes the same
    function. Several segments normalise a concatenation without materialising it.

    local=True: the layer that consumes this LayerNorm gathers the whole feature axis first and
    normalises it itself (`BlockMLP`'s fused norm): the affine is then stored whole on every rank
    (replicated over both model axes), no statistics are exchanged, and `forward` takes the gathered
    features: a tensor with every feature in its last dimension, or the rank-major buffer of
    `gather_blocks` (`blocks`: the row counts of its blocks)."""

    def __init__(
        self, mesh: Mesh, splits: Sequence[Split], eps: float = 1e-5, local: bool = False, device=None, dtype=None
    ):
        super().__init__()
        self.mesh, self.eps, self.local = mesh, eps, local
        self.axis = splits[0].axis
        self.n = sum(s.total for s in splits)
        self.counts = [sum(s.sizes[r] for s in splits) for r in range(mesh.size(self.axis))]
        if local and len(splits) != 1:
            raise ValueError("a locally normalised LayerNorm has one feature segment")
        layouts = [Layout((s.total,), (None,) if local else (s,)) for s in splits]
        self.weights = nn.ParameterList([shared_param(lay, mesh, ("const", 1.0), device, dtype) for lay in layouts])
        self.biases = nn.ParameterList([shared_param(lay, mesh, ("const", 0.0), device, dtype) for lay in layouts])

    def forward(self, *xs: torch.Tensor, blocks: Sequence[int] | None = None):
        replicas = (
            self.mesh.group(self.weights[0].shared_over) if self.local else self.mesh.group(other_axis(self.axis))
        )
        ws = [copy_to(w, replicas) for w in self.weights]
        bs = [copy_to(b, replicas) for b in self.biases]
        out_dtype = torch.float32 if autocast_dtype(xs[0].device) is not None else xs[0].dtype
        if blocks is not None:
            return blocks_layer_norm(xs[0], ws[0], bs[0], blocks, self.eps, out_dtype)
        group = None if self.local else self.mesh.group(self.axis)
        if group is None and len(xs) == 1:  # every feature here: the fused kernel is exact
            return fused_layer_norm(xs[0], self.n, ws[0], bs[0], self.eps)
        out = split_layer_norm(xs, ws, bs, group, self.counts, self.eps, out_dtype)
        return out[0] if len(out) == 1 else tuple(out)


# ------------------------------------------------------------------------------------------------
# An MLP of two block linears, with a per-layer strategy
# ------------------------------------------------------------------------------------------------
def check_strategy_keys(model: nn.Module, mesh: Mesh) -> None:
    """A mesh.strategy key that names no layer kind of the model is an error (a typo would otherwise
    silently leave that layer on 'auto')."""
    kinds = set(resolved_strategies(model))
    unknown = sorted(set(mesh.strategy) - kinds - {"*"})
    if unknown:
        raise ValueError(
            f"mesh.strategy: unknown layer kind(s) {', '.join(unknown)}; this model has "
            f"{', '.join(sorted(kinds)) or 'no strategy layers'} (or '*' for every kind)"
        )


def resolved_strategies(model: nn.Module) -> dict[str, str]:
    """{layer kind: strategy} of the BlockMLPs of a built model (one entry per kind; kinds whose
    layers differ map to 'mixed')."""
    out: dict[str, str] = {}
    for m in model.modules():
        if isinstance(m, BlockMLP):
            out[m.kind] = m.strategy if out.get(m.kind, m.strategy) == m.strategy else "mixed"
    return out


class _Affine(nn.Module):
    """One linear map of a stationary or features BlockMLP: its weight and bias blocks, used only
    through this module's own calls (DeepSpeed ZeRO-3 materialises a module's parameters around its
    forward)."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, align: int = 1):
        super().__init__()
        self.weights = nn.ParameterList([weight])
        self.bias, self.align = bias, align

    def forward(self, x: torch.Tensor, bias_group=None, matmul=True) -> torch.Tensor:
        """x @ W^T (matmul=True; or matmul(x, W) for a callable), or x + bias (the bias replicated over
        `bias_group`)."""
        if matmul is True:
            return aligned.linear(x, self.weights[0], self.align)
        if matmul:
            return matmul(x, self.weights[0])
        return x if self.bias is None else x + copy_to(self.bias, bias_group)


class BlockMLP(nn.Module):
    """fc2(GELU(fc1(LN(x)))) over the last dimension of a block-sharded x whose features are split
    over `contract` (in_split) and whose rows (dimension `row_dim`: tokens for channel mixing,
    features for token mixing) are split over the other model axis, `storage` (row_split). The
    LayerNorm (`norm`: 'rows' or 'features', the axis it normalises; the DistLayerNorm is passed to
    forward) belongs to the block; the strategy decides where it is computed.

    strategy "gather" (Jigsaw): two BlockLinears contracting over `contract`; each weight is stored
        once per model group, its row blocks gathered over `storage` on use; partial sums are
        reduce-scattered over `contract`, so the hidden activation stays block-sharded.
    strategy "stationary": weights never move, activations do (Megatron's tensor + sequence
        parallelism, along each axis): the rows are all-gathered over `storage`; fc1 multiplies
        this rank's (hidden/storage x features/contract) weight block, the hidden partial sums are
        all-reduced over `contract`; GELU; fc2 multiplies its (features/contract x hidden/storage)
        block and the output partial sums are reduce-scattered over `storage`, back to x's layout.
        Weight gradients need no communication at all. A LayerNorm over the rows is computed on the
        gathered rows (whole there): no statistics exchanged.
    strategy "features" (Megatron tensor parallelism over `contract`): the features are all-gathered
        over `contract`, fc1 multiplies this rank's (hidden/contract x features) rows, GELU, fc2 its
        (features x hidden/contract) columns, written straight into the reduce-scatter over
        `contract` that returns x's layout. A LayerNorm over the features is computed on the gathered
        features. The weights are replicated over `storage` (available where it has one rank or the
        job replicates over it).
    All compute the same function with the same logical parameters (fc1.weights.0, fc1.bias,
    fc2.weights.0, fc2.bias), stored in different blocks; checkpoints are layout-free."""

    def __init__(
        self,
        mesh: Mesh,
        kind: str,
        in_split: Split,
        hidden: int,
        row_split: Split,
        row_dim: int,
        contract: str,
        fc2_bias: bool = True,
        micro_batch: int = 1,
        norm: str | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.mesh, self.kind, self.contract, self.storage = mesh, kind, contract, other_axis(contract)
        if row_split.axis != self.storage or in_split.axis != contract:
            raise ValueError(f"{kind}: rows must be split over '{self.storage}' and features over '{contract}'")
        self.row_split, self.row_dim, self.in_split, self.norm = row_split, row_dim, in_split, norm
        self.strategy = choose_strategy(
            mesh, kind, micro_batch * row_split.total, in_split.total, hidden, contract, norm=norm, batch=micro_batch
        )
        norm_axis = self.storage if norm == "rows" else contract
        self.fuses_norm = fuses_norm(self.strategy, norm, mesh.size(norm_axis) > 1)
        kw = dict(device=device, dtype=dtype)
        if self.strategy == "gather":
            hidden_split = Split(contract, even_split(hidden, mesh.size(contract)))
            self.fc1 = BlockLinear(mesh, [in_split], hidden_split, contract=contract, **kw)
            self.fc2 = BlockLinear(mesh, [hidden_split], in_split, contract=contract, bias=fc2_bias, **kw)
            return
        # stationary: the hidden axis split over storage; features: over contract, the rest whole
        split_axis = self.storage if self.strategy == "stationary" else contract
        hidden_split = Split(split_axis, even_split(hidden, mesh.size(split_axis)))
        features = in_split if self.strategy == "stationary" else None
        b1, b2 = 1.0 / math.sqrt(in_split.total), 1.0 / math.sqrt(hidden)
        self.fc1 = _Affine(
            make_param(Layout((hidden, in_split.total), (hidden_split, features)), mesh, ("uniform", b1), **kw),
            shared_param(Layout((hidden,), (hidden_split,)), mesh, ("uniform", b1), **kw),
            mesh.gemm_multiple,
        )
        self.fc2 = _Affine(
            make_param(Layout((in_split.total, hidden), (features, hidden_split)), mesh, ("uniform", b2), **kw),
            shared_param(Layout((in_split.total,), (in_split,)), mesh, ("uniform", b2), **kw) if fc2_bias else None,
            mesh.gemm_multiple,
        )

    def _normed(self, x: torch.Tensor, norm) -> torch.Tensor:
        """The LayerNorm applied to x's block (with its statistics exchanged where its axis is split)."""
        if norm is None:
            return x
        if self.norm == "features":
            return norm(x)
        return norm(x.transpose(self.row_dim, -1)).transpose(self.row_dim, -1)

    def forward(self, x: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
        """fc2(GELU(fc1(norm(x)))); norm: the block's DistLayerNorm (built with local=self.fuses_norm)."""
        if norm is not None and (self.norm is None or norm.local != self.fuses_norm):
            raise ValueError(
                f"{self.kind}: built for "
                + (
                    "no LayerNorm"
                    if self.norm is None
                    else f"a LayerNorm over its {self.norm} with local={self.fuses_norm}"
                )
            )
        if self.strategy == "gather":
            return self.fc2(F.gelu(self.fc1(self._normed(x, norm))))
        storage, contract = self.mesh.group(self.storage), self.mesh.group(self.contract)
        fused = norm is not None and self.fuses_norm
        if self.strategy == "features":
            # weights replicated over storage: their gradients are summed over it (when it has ranks)
            local = lambda v, w: gathered_linear(
                v,
                w,
                storage,
                (w.shape[0],),
                gather=False,  # noqa: E731
                align=self.mesh.gemm_multiple,
            )
            xf = all_gather(x if fused else self._normed(x, norm), contract, self.in_split.sizes, dim=-1)
            h = F.gelu(self.fc1(self.fc1(norm(xf) if fused else xf, matmul=local), storage, matmul=False))
            if contract is None:
                y = self.fc2(h, matmul=local)
            else:
                chunks = row_chunks(math.prod(h.shape[:-1]), self.in_split.total, self.mesh.chunk_mb)
                y = self.fc2(
                    h,
                    matmul=lambda v, w: linear_reduce_scatter([v], [w], contract, self.in_split.sizes, storage, chunks),
                )
            return self.fc2(y, storage, matmul=False)
        # stationary: every row is independent: the rows stay in the all-gather's rank-major order
        # (its buffer) through both products and are reduce-scattered from that same layout
        rows = self.row_split.sizes
        x_rows = gather_blocks(x if fused else self._normed(x, norm), storage, rows, dim=self.row_dim)
        if fused:
            x_rows = norm(x_rows, blocks=rows)
        h = F.gelu(self.fc1(sum_partials(self.fc1(x_rows), contract), contract, matmul=False))
        shape = (*x.shape[:-1], self.fc2.weights[0].shape[0])
        y = scatter_blocks(self.fc2(h), storage, rows, shape)
        return self.fc2(y, storage, matmul=False)
