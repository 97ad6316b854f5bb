"""The mixing MLP: two block linears with a per-layer strategy.

A `BlockMLP` (fc2 . GELU . fc1, the mixer's token- and channel-mixing MLPs) chooses per layer how
it meets its data (`STRATEGIES`): move the weights (Jigsaw's gather) or keep them stationary and move
the activations (Megatron's tensor + sequence parallelism along each axis). jigsaw_ext.strategy's
`mlp_traffic` is the cost model `auto` uses; the job can force a strategy per layer kind (mesh.strategy).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import aligned
from .chunked import linear_reduce_scatter, row_chunks
from .collectives import all_gather, copy_to, gather_blocks, scatter_blocks, sum_partials
from .gathered import gathered_linear
from .layers import BlockLinear, make_param, shared_param
from .layout import Layout, Split, even_split
from .mesh import Mesh
from .strategy import choose_strategy, fuses_norm, other_axis


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
            self.fc1: BlockLinear | _Affine = BlockLinear(mesh, [in_split], hidden_split, contract=contract, **kw)
            self.fc2: BlockLinear | _Affine = BlockLinear(
                mesh, [hidden_split], in_split, contract=contract, bias=fc2_bias, **kw
            )
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
        fused_norm = norm if self.fuses_norm else None  # applied here to the gathered rows or features
        fused = fused_norm is not None
        if self.strategy == "features":
            # weights replicated over storage: their gradients are summed over it (when it has ranks)
            def local(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
                return gathered_linear(v, w, storage, (w.shape[0],), gather=False, align=self.mesh.gemm_multiple)

            xf = all_gather(x if fused else self._normed(x, norm), contract, self.in_split.sizes, dim=-1)
            h = F.gelu(
                self.fc1(
                    self.fc1(fused_norm(xf) if fused_norm is not None else xf, matmul=local), storage, matmul=False
                )
            )
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
        if fused_norm is not None:
            x_rows = fused_norm(x_rows, blocks=rows)
        h = F.gelu(self.fc1(sum_partials(self.fc1(x_rows), contract), contract, matmul=False))
        shape = (*x.shape[:-1], self.fc2.weights[0].shape[0])
        y = scatter_blocks(self.fc2(h), storage, rows, shape)
        return self.fc2(y, storage, matmul=False)
