"""The linear map fused with the gather of its weight: a local product with a weight whose row blocks
live on the ranks of a group, as one autograd function whose backward is the forward's dual.

    forward                          backward
    gathered_linear(x, w_block)      y = x @ all_gather(w_block)^T;  backward re-gathers the weight
                                      (nothing gathered is kept alive) and reduce-scatters dL/dW
                                      back to the block owner (all-reduce in replicated mode)

Built on the primitives of jigsaw_ext.collectives (every transfer goes through them, so the
planner's tracer sees it); jigsaw_ext.chunked holds the pipelined, memory-bounded form.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from . import aligned
from .accumulate import deferred_inputs, local_gradient
from .collectives import Pending, group_rank, start_all_gather, start_all_reduce, start_reduce_scatter


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast computes in on this device type, or None when it is off (always on the
    meta device, which autocast does not know: jigsaw_ext.plan traces models there)."""
    if device.type == "meta" or not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def compute_dtype(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The weight in the dtype the matmul will use (autocast's, if enabled), so that the gather
    moves bf16 bytes under bf16 autocast."""
    dtype = autocast_dtype(x.device)
    return w if dtype is None else w.to(dtype)


def _operand(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(x as its products read it, t). t: x has 3+ dims with its last two transposed in memory (token
    mixing's blocks, x = block.transpose(1, 2)): the products are then taken per sample as W @ x^T on
    the contiguous (batch, in, F) transpose (a view), so neither x nor the output nor the gradients
    are copied into the other layout. Else x as (rows, in) (a view, or one copy for every product)."""
    if x.dim() >= 3 and not x.is_contiguous() and x.transpose(-1, -2).is_contiguous():
        return x.transpose(-1, -2).reshape(math.prod(x.shape[:-2]), x.shape[-1], x.shape[-2]), True
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1]), False  # (shards may be empty)


def _product(x: torch.Tensor, w: torch.Tensor, t: bool, align: int = 1) -> torch.Tensor:
    """x @ w^T for an operand of `_operand`: (rows, out), or with t (batch, out, F). align: the GEMM's
    inner and output dimensions padded to this multiple (jigsaw_ext.aligned)."""
    return aligned.weight_bmm(w, x, align) if t else aligned.linear(x, w, align)


def _weight_grad(g: torch.Tensor, x: torch.Tensor, t: bool, align: int = 1) -> torch.Tensor:
    """dL/dw of `_product` from its output gradient g (in its layout, x's dtype). With t, one product
    of the 2-d (rows, .) copies of both: per-sample products would be rounded one by one in bf16, a
    batched product summed after holds batch x weight (2.4 GB for the C1 token mixer at batch 4), and
    a loop over the samples would give the planner's trace a structure that changes with the batch."""
    if not t:
        return aligned.matmul(g.t(), x, align)
    rows = lambda v: v.transpose(1, 2).reshape(-1, v.shape[1])  # noqa: E731
    return aligned.matmul(rows(g).t(), rows(x), align)


def _input_grad(g: torch.Tensor, w: torch.Tensor, t: bool, align: int = 1) -> torch.Tensor:
    """dL/dx of `_product` in the operand's layout: (rows, in), or with t (batch, in, F)."""
    return aligned.weight_bmm(w.t(), g, align) if t else aligned.matmul(g, w, align)


class _GatheredLinear(torch.autograd.Function):
    """y = x @ W^T where W (out, in_local) is stored as row blocks spread over `group`.

    keep: None (gather in forward, gather again in backward: nothing gathered outlives its use), or
    a dict owned by the layer that keeps the gathered weight until the layer clears it (once per
    optimizer step, jigsaw_ext.layers.clear_gathered_weights) or the block changes in place: one
    gather per optimizer step instead of two per micro-batch, for one full-row weight of memory.
    x is read in its own layout (`_operand`); y has x's layout."""

    @staticmethod
    def forward(ctx, x, w_block, group, sizes, gather, keep, deferral, anchor, prefetched=None, align=1):
        shape, (x, t) = x.shape, _operand(x)
        ctx.save_for_backward(x, w_block)  # the operand: what backward's products read, with no copy
        ctx.args = (group, sizes, gather, shape, t, align)
        ctx.w_full, ctx.deferral = None, deferral
        lead = shape[:-2] if t else shape[:-1]

        def out(y: torch.Tensor) -> torch.Tensor:
            return y.view(*lead, y.shape[1], shape[-2]).transpose(-1, -2) if t else y.view(*lead, y.shape[-1])

        w_compute = compute_dtype(w_block, x)  # bf16 under autocast: the gather moves bf16 bytes
        if not gather:
            return out(_product(x, w_compute, t, align))
        if prefetched is not None:  # gathered while the previous layer computed (mesh.prefetch_weights)
            return out(_product(x, prefetched.wait(), t, align))
        me, offset = group_rank(group), 0
        if keep is not None and keep.get("key") == (w_block._version, w_compute.dtype):
            w_full, own = keep["w"], None
        else:
            pending = start_all_gather(w_compute, group, sizes)
            own = _product(x, w_compute, t, align)  # overlaps with the transfer of the other blocks
            w_full = pending.wait()
            if keep is not None:
                keep.update(key=(w_block._version, w_compute.dtype), w=w_full)
        ctx.w_full = w_full if keep is not None else None
        pieces = []
        for r, s in enumerate(sizes):
            pieces.append(own if (r == me and own is not None) else _product(x, w_full[offset : offset + s], t, align))
            offset += s
        return out(torch.cat(pieces, dim=1 if t else -1))

    @staticmethod
    def backward(ctx, grad):
        x, w_block = ctx.saved_tensors
        group, sizes, gather, shape, t, align = ctx.args
        need_x = ctx.needs_input_grad[0]
        # backward runs outside autocast: compute in the dtype of the incoming gradient (that of the
        # forward's matmul), reduce weight gradients in fp32
        w_compute = w_block.to(grad.dtype)
        kept = ctx.w_full
        pending_w = start_all_gather(w_compute, group, sizes) if (gather and need_x and kept is None) else None
        # the gradient in the operand's layout: a view with t, else (rows, out) (one copy if transposed)
        g = (
            grad.transpose(-1, -2).reshape(x.shape[0], grad.shape[-1], grad.shape[-2])
            if t
            else grad.reshape(x.shape[0], grad.shape[-1])
        )
        # summed over the group in fp32 (a bf16 sum of partials loses bits)
        full_w = _weight_grad(g, x.to(grad.dtype), t, align).float()
        local_w = local_gradient(ctx.deferral, full_w)  # None: deferred to the step's last micro-batch
        pending_gw = (
            None
            if local_w is None
            else start_reduce_scatter(local_w, group, sizes)
            if gather
            else start_all_reduce(local_w, group)
        )
        grad_x = None
        if need_x:
            if not gather:
                w = w_compute
            elif kept is not None:
                w = kept.to(grad.dtype)
            else:
                assert pending_w is not None  # started above: gather, need_x and nothing kept
                w = pending_w.wait()
            dx = _input_grad(g, w, t, align).to(x.dtype)
            grad_x = dx.view(*shape[:-2], shape[-1], shape[-2]).transpose(-1, -2) if t else dx.view(shape)
        ctx.w_full = None
        grad_w = None if pending_gw is None else pending_gw.wait().to(w_block.dtype)
        return grad_x, grad_w, None, None, None, None, None, None, None, None


def gathered_linear(
    x: torch.Tensor,
    w_block: torch.Tensor,
    group,
    sizes: Sequence[int],
    gather: bool = True,
    keep: dict | None = None,
    prefetched: Pending | None = None,
    align: int = 1,
) -> torch.Tensor:
    """Local product of x with the full-row weight whose row blocks live on the ranks of `group`.

    gather=True: w_block holds rows offset(r):offset(r)+sizes[r] (stored once per group).
    gather=False: w_block holds every row (replicated over `group`; gradients all-reduced).
    keep: see _GatheredLinear (None: re-gather in backward).
    prefetched: the forward gather of this weight, started earlier by `start_weight_gather`.
    align: the products' inner and output dimensions padded to this multiple (mesh.gemm_multiple).
    """
    if group is None:
        return aligned.linear(x, w_block, align)
    deferral, (w,), anchor = deferred_inputs([w_block])
    return _GatheredLinear.apply(x, w, group, tuple(sizes), gather, keep, deferral[0], anchor, prefetched, align)


def start_weight_gather(w_block: torch.Tensor, group, sizes: Sequence[int]) -> tuple[tuple, Pending]:
    """(key, pending): the async all-gather of a weight's row blocks in the dtype the forward will
    compute in (autocast's, if on), for `gathered_linear(..., prefetched=pending)`; the key (the
    block's version and that dtype) tells the consumer whether it still matches."""
    with torch.no_grad():
        w = compute_dtype(w_block.detach(), w_block)
        return (w_block._version, w.dtype), start_all_gather(w, group, sizes)
