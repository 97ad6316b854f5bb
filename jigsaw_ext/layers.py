"""Block-sharded layers: local matmul + mappings from jigsaw_ext.collectives.

Every activation between layers is block-sharded: its token axis over DOMAIN, its feature axis over
TP. A `BlockLinear` maps the last dimension of such a block. The contracted axis is split over one
mesh axis (`contract`): each rank multiplies the block it holds, producing partial sums for every
output feature, and a reduce-scatter over `contract` leaves each rank exactly its output block, in
the layout the next layer needs. Channel mixing contracts over TP; token mixing (applied to the
transposed block) contracts over DOMAIN. The weight rows are spread over the other model axis
(`storage`), so each rank stores ~1/(DOMAIN*TP) of every matrix, and are gathered on use
(`replicate=True` keeps them replicated over `storage` instead: no weight traffic, more memory).

The mixing MLP built from them, with its per-layer strategies, is jigsaw_ext.mlp.BlockMLP.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn

from .chunked import chunked_gathered_linear, gathered_weight, linear_reduce_scatter, row_chunks, weight_chunks
from .collectives import close_bucket, copy_to, open_bucket, reduce_scatter
from .fused import layer_norm as fused_layer_norm
from .gathered import autocast_dtype, gathered_linear, start_weight_gather
from .layernorm import blocks_layer_norm, split_layer_norm
from .layout import Layout, Split, even_split
from .mesh import Mesh
from .strategy import other_axis

MODEL_AXES = ("domain", "tp")


def make_param(layout: Layout, mesh: Mesh, init: tuple, device=None, dtype=None) -> nn.Parameter:
    """A parameter holding this rank's block of a logical tensor.

    `layout` says how the logical tensor is split; `init` how its logical values are drawn
    (jigsaw_ext.init), so every mesh ends up with the same logical model."""
    p = nn.Parameter(torch.empty(layout.local_shape(mesh.coords), device=device, dtype=dtype))
    # attributes of the tensor, read through jigsaw_ext.layout.block_layout (and p.block_layout)
    p.__dict__.update(block_layout=layout, block_init=init)
    # DeepSpeed's gradient norm counts a parameter on every rank where `model_parallel` is set and
    # otherwise only on model-parallel rank 0: flag exactly one replica of each block (coordinate 0
    # on the axes it is replicated over), so the norm over the model group counts every element once
    p.__dict__["model_parallel"] = all(mesh.coord(axis) == 0 for axis in replicated_axes(layout))
    return p


def shared_param(layout: Layout, mesh: Mesh, init: tuple, device=None, dtype=None) -> nn.Parameter:
    """A small parameter (bias, LayerNorm affine) replicated over one model axis (or both: then over
    the 'model' group, unless one of them has size 1) and used through `copy_to` over that group
    (`p.shared_over`): `bucket_small_gradients` sums its gradient with all the others in one
    collective per group per backward."""
    p = make_param(layout, mesh, init, device, dtype)
    axes = [a for a in replicated_axes(layout) if mesh.size(a) > 1] or list(replicated_axes(layout))[:1]
    p.__dict__["shared_over"] = axes[0] if len(axes) == 1 else "model" if len(axes) == 2 else None
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
    for a, b in zip(chain, chain[1:], strict=False):
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
        self._kept: list[dict | None] = [{} if keep else None for _ in in_splits]
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
            mine = [self._take_prefetched(i, w, x) for i, (w, x) in enumerate(zip(self.weights, xs, strict=True))]
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
            assert partial is not None  # (xs is never empty)
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
