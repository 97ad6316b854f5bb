"""Products written straight into collective buffers, in pipelined chunks (mesh.chunk_mb bounds
their size): autograd functions with their duals, built on jigsaw_ext.collectives.

`linear_reduce_scatter`: the partial sums of a linear map reduce-scattered over the contract axis,
in row chunks (chunk i's reduce-scatter in flight while chunk i + 1 is computed).

`chunked_gathered_linear`: a gathered weight moved in chunks, the memory-bounded, pipelined form of
jigsaw_ext.gathered.gathered_linear:

    forward:  chunk k of every rank's row block all-gathered (asynchronously, while chunk k - 1's
              products are computed), its output columns computed, the chunk freed
    backward: the same chunks re-gathered for the input gradient; each chunk's weight gradient
              (fp32) reduce-scattered to its owners while the next chunk's is computed

At most two gathered chunks and two weight-gradient chunks are alive at once, instead of the whole
gathered weight and its whole full-row gradient: the transient memory of the 'gather' strategy
drops by about chunks / 2, for chunks times as many (smaller) collectives. Chunk k of rank r is
rows even_split(sizes[r], chunks)[k] of its block: the chunks of uneven blocks are padded inside
the collective like every other uneven shard. With one chunk it sends what gathered_linear sends.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .accumulate import deferred_inputs, local_gradient
from .collectives import (
    Pending,
    _gather_dim,
    _gather_into_blocks,
    _scatter_dim,
    _scatter_from_blocks,
    group_rank,
    start_all_gather,
    start_all_reduce,
    start_reduce_scatter,
)
from .gathered import autocast_dtype, compute_dtype
from .layout import even_split


def weight_chunks(rows: int, cols: int, chunk_mb: float | None, max_chunks: int) -> int:
    """Chunks for a gathered weight of rows x cols (its fp32 gradient the larger of the two) so that
    each is at most chunk_mb MiB; 1 when unset, at most max_chunks (one row per rank and chunk)."""
    if chunk_mb is None:
        return 1
    return max(1, min(max_chunks, math.ceil(rows * cols * 4 / (chunk_mb * 2**20))))


def _bounds(sizes: Sequence[int], chunks: int) -> list[list[int]]:
    """bounds[r][k]: first row of chunk k inside rank r's block (bounds[r][chunks] = sizes[r])."""
    return [[lo for lo, _ in _row_bounds(s, chunks)] + [s] for s in sizes]


class _ChunkedGatheredLinear(torch.autograd.Function):
    """y = x @ W^T, W (out, in_local) stored as row blocks over `group` (sizes[r] rows on rank r),
    gathered and reduced in `chunks` pipelined pieces (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, w_block, group, sizes, chunks):
        ctx.save_for_backward(x, w_block)
        ctx.args = (group, sizes, chunks)
        w = compute_dtype(w_block, x)  # bf16 under autocast: the gathers move bf16 bytes
        bounds, me = _bounds(sizes, chunks), group_rank(group)
        parts: list[list[torch.Tensor]] = [[] for _ in sizes]

        def start(k: int) -> Pending:
            return start_all_gather(w[bounds[me][k] : bounds[me][k + 1]], group, [b[k + 1] - b[k] for b in bounds])

        pending = start(0)
        for k in range(chunks):
            wk = pending.wait()
            if k + 1 < chunks:
                pending = start(k + 1)  # in flight while chunk k's products are computed
            offset = 0
            for r, b in enumerate(bounds):
                s = b[k + 1] - b[k]
                parts[r].append(F.linear(x, wk[offset : offset + s]))  # chunk k
                offset += s
        return torch.cat([p for row in parts for p in row], dim=-1)

    @staticmethod
    def backward(ctx, grad):
        x, w_block = ctx.saved_tensors
        group, sizes, chunks = ctx.args
        bounds, me = _bounds(sizes, chunks), group_rank(group)
        need_x = ctx.needs_input_grad[0]
        w = w_block.to(grad.dtype)  # backward runs outside autocast: the forward matmul's dtype
        rows = math.prod(grad.shape[:-1])
        g2, x2 = grad.reshape(rows, grad.shape[-1]), x.to(grad.dtype).reshape(rows, x.shape[-1])
        offsets = [0]
        for s in sizes:
            offsets.append(offsets[-1] + s)
        chunk_sizes = lambda k: [b[k + 1] - b[k] for b in bounds]  # noqa: E731
        start_w = lambda k: start_all_gather(w[bounds[me][k] : bounds[me][k + 1]], group, chunk_sizes(k))  # noqa: E731
        dw = torch.empty(w_block.shape, dtype=torch.float32, device=w_block.device)
        dx, pending_w, in_flight = None, (start_w(0) if need_x else None), []
        for k in range(chunks):
            gk = torch.cat([g2[:, offsets[r] + b[k] : offsets[r] + b[k + 1]] for r, b in enumerate(bounds)], dim=1)
            # this chunk's weight gradient, summed over the group in fp32 while the next one is computed
            in_flight.append((k, start_reduce_scatter(gk.t().mm(x2).float(), group, chunk_sizes(k))))
            if need_x:
                assert pending_w is not None  # started for chunk 0 and after every chunk but the last
                wk = pending_w.wait()
                if k + 1 < chunks:
                    pending_w = start_w(k + 1)
                part = gk.mm(wk)
                dx = part if dx is None else dx.add_(part)
            if len(in_flight) > 1:
                j, pending = in_flight.pop(0)
                dw[bounds[me][j] : bounds[me][j + 1]] = pending.wait()
        for j, pending in in_flight:
            dw[bounds[me][j] : bounds[me][j + 1]] = pending.wait()
        grad_x = dx.reshape(x.shape).to(x.dtype) if dx is not None else None  # (dx is set iff need_x)
        return grad_x, dw.to(w_block.dtype), None, None, None


def chunked_gathered_linear(
    x: torch.Tensor, w_block: torch.Tensor, group, sizes: Sequence[int], chunks: int
) -> torch.Tensor:
    """gathered_linear(x, w_block, group, sizes) with the weight and its gradient moved in `chunks`
    pipelined pieces."""
    return _ChunkedGatheredLinear.apply(x, w_block, group, tuple(sizes), chunks)


def row_chunks(rows: int, cols: int, chunk_mb: float | None) -> int:
    """Row chunks for a (rows x cols) fp32 buffer of partial sums of at most chunk_mb MiB each."""
    if chunk_mb is None or rows == 0:
        return 1
    return max(1, min(rows, math.ceil(rows * cols * 4 / (chunk_mb * 2**20))))


def _row_bounds(rows: int, chunks: int) -> list[tuple[int, int]]:
    bounds = [0]
    for c in even_split(rows, chunks):
        bounds.append(bounds[-1] + c)
    return list(zip(bounds, bounds[1:], strict=False))


def _products_into(send: torch.Tensor, xs: Sequence[torch.Tensor], ws: Sequence[torch.Tensor], sizes) -> None:
    """send[r] (rows x m) = sum_j xs[j] @ ws[j][rows of output block r]^T: each destination rank's
    partial sums written straight into the reduce-scatter's rank-major buffer."""
    offset, m = 0, send.shape[-1]
    for r, sz in enumerate(sizes):
        slot = send[r] if sz == m else send[r, :, :sz]
        for j, (x, w) in enumerate(zip(xs, ws, strict=True)):
            if j == 0 and slot.is_contiguous():
                torch.mm(x, w[offset : offset + sz].t(), out=slot)
            elif j == 0:
                slot.copy_(x.mm(w[offset : offset + sz].t()))
            else:
                slot.addmm_(x, w[offset : offset + sz].t())
        offset += sz


class _LinearReduceScatter(torch.autograd.Function):
    """sum_j x_j @ W_j^T reduce-scattered over `group` along the output features, for weights held
    whole (their rows not spread over another axis, or replicated over it: then `replicas` is that
    axis's group and the weight gradients are all-reduced over it once, in fp32). The products are
    written straight into the reduce-scatter's rank-major buffer (one product per destination rank's
    output block) and the backward uses the all-gathered gradient's blocks in place: no transposing
    copy. In `chunks` row chunks (mesh.chunk_mb): chunk i's reduce-scatter is in flight while chunk
    i + 1's products are computed, at most two buffers alive; backward, chunk i + 1's gradient is
    all-gathered while chunk i's input and weight gradients are computed."""

    @staticmethod
    def forward(ctx, group, sizes, replicas, n_seg, chunks, deferral, anchor, *tensors):
        xs, ws = tensors[:n_seg], tensors[n_seg:]
        dtype = autocast_dtype(xs[0].device) or xs[0].dtype
        lead = xs[0].shape[:-1]
        x2 = [x.reshape(math.prod(lead), x.shape[-1]).to(dtype) for x in xs]  # (shards may be empty)
        wc = [w.to(dtype) for w in ws]
        n, m, pre = len(sizes), max(sizes), x2[0].shape[0]
        me = group_rank(group)
        bounds = _row_bounds(pre, chunks)
        # one chunk: the reduce-scatter's own output buffer is the result (no copy unless padded)
        out = None if len(bounds) == 1 else x2[0].new_empty((pre, sizes[me]))
        in_flight = []
        for lo, hi in bounds:
            send = (
                x2[0].new_empty((n, hi - lo, m)) if all(sz == m for sz in sizes) else x2[0].new_zeros((n, hi - lo, m))
            )
            _products_into(send, [x[lo:hi] for x in x2], wc, sizes)
            in_flight.append((lo, hi, *_scatter_from_blocks(send.unsqueeze(-1), group, async_op=True)))
            while len(in_flight) > (1 if hi < pre else 0):
                a, b, part, work = in_flight.pop(0)
                if work is not None:
                    work.wait()
                if out is None:
                    out = part[:, : sizes[me], 0].contiguous()
                else:
                    out[a:b] = part[:, : sizes[me], 0]
        ctx.save_for_backward(*x2, *ws)
        ctx.args = (group, sizes, replicas, n_seg, chunks, [x.shape for x in xs], [x.dtype for x in xs])
        ctx.deferral = deferral
        assert out is not None  # the last chunk's pop sets it
        return out.reshape(*lead, sizes[me])

    @staticmethod
    def backward(ctx, dy):
        group, sizes, replicas, n_seg, chunks, shapes, x_dtypes = ctx.args
        saved = ctx.saved_tensors
        x2, ws = saved[:n_seg], saved[n_seg:]
        n, m, pre, dtype = len(sizes), max(sizes), x2[0].shape[0], dy.dtype
        d2 = dy.contiguous().view(pre, dy.shape[-1])
        bounds = _row_bounds(pre, chunks)

        def start(i: int) -> tuple[torch.Tensor, Any]:  # (buffer, work)
            return _gather_into_blocks(d2[bounds[i][0] : bounds[i][1]].unsqueeze(-1), group, n, m, async_op=True)

        wc = [w.to(dtype) for w in ws]
        # input gradients only where an input needs one (the patch embedding's data does not)
        needed = ctx.needs_input_grad[7 : 7 + n_seg]
        dxs = [x.new_empty((pre, w.shape[1])) if need else None for x, w, need in zip(x2, ws, needed, strict=True)]
        dws = [torch.zeros(w.shape, dtype=torch.float32, device=w.device) for w in ws]
        pending = start(0)
        for i, (lo, hi) in enumerate(bounds):
            buf, work = pending
            if work is not None:
                work.wait()
            if i + 1 < len(bounds):
                pending = start(i + 1)  # in flight while this chunk's gradients are computed
            buf = buf.squeeze(-1)
            for x, w, dx, dw in zip(x2, wc, dxs, dws, strict=True):
                offset = 0
                for r, sz in enumerate(sizes):
                    g = buf[r, :, :sz]
                    if dx is not None and r == 0:
                        torch.mm(g, w[offset : offset + sz], out=dx[lo:hi])
                    elif dx is not None:
                        dx[lo:hi].addmm_(g, w[offset : offset + sz])
                    if dtype == torch.float32:
                        dw[offset : offset + sz].addmm_(g.t(), x[lo:hi])
                    else:
                        dw[offset : offset + sz].add_(g.t().mm(x[lo:hi].to(dtype)))
                    offset += sz
        grads: list[torch.Tensor | None] = list(dws)
        if replicas is not None:  # the weights are replicated over another axis: sum their gradients
            for j, deferral in enumerate(ctx.deferral):  # (a loop: jigsaw_ext.plan.trace reads this frame)
                local = local_gradient(deferral, dws[j])  # None: deferred to the step's last micro-batch
                grads[j] = None if local is None else start_all_reduce(local, replicas, async_op=False).wait()
        dxs = [None if dx is None else dx.reshape(sh).to(dt) for dx, sh, dt in zip(dxs, shapes, x_dtypes, strict=True)]
        return (None,) * 7 + (*dxs, *[None if dw is None else dw.to(w.dtype) for dw, w in zip(grads, ws, strict=True)])


def linear_reduce_scatter(
    xs: Sequence[torch.Tensor], ws: Sequence[torch.Tensor], group, sizes: Sequence[int], replicas=None, chunks: int = 1
) -> torch.Tensor:
    """reduce_scatter(sum_j F.linear(xs[j], ws[j]), group, sizes, dim=-1) without its copies (see
    _LinearReduceScatter); `replicas`: the group the weights are replicated over, if any; `chunks`:
    row chunks, pipelined (every row is independent)."""
    # weights replicated over `replicas`: their gradient reduction may be deferred (jigsaw_ext.accumulate)
    deferral, ws, anchor = deferred_inputs(ws) if replicas is not None else ([None] * len(ws), ws, None)
    return _LinearReduceScatter.apply(group, tuple(sizes), replicas, len(xs), chunks, deferral, anchor, *xs, *ws)


class _GatheredWeight(torch.autograd.Function):
    """The whole weight from its row blocks (all-gather over `group`), once for all the row chunks
    that use it; dual: its gradient, summed over the chunks by autograd, reduce-scattered once in fp32."""

    @staticmethod
    def forward(ctx, w_block, group, sizes):
        ctx.args = (group, sizes, w_block.dtype)
        return _gather_dim(w_block, group, sizes, 0)

    @staticmethod
    def backward(ctx, grad):
        group, sizes, dtype = ctx.args
        return _scatter_dim(grad.float(), group, sizes, 0).to(dtype), None, None


def gathered_weight(w_block: torch.Tensor, group, sizes: Sequence[int]) -> torch.Tensor:
    return w_block if group is None else _GatheredWeight.apply(w_block, group, tuple(sizes))
