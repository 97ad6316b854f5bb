"""Transient buffers bounded by chunking (mesh.chunk_mb).

A gathered weight moved in chunks: the memory-bounded, pipelined form of
jigsaw_ext.collectives.gathered_linear, as an autograd function with its dual.

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
from typing import Sequence

import torch
import torch.nn.functional as F

from . import collectives
from .collectives import (_compute_dtype, _gather_dim, _scatter_dim, copy_to, linear_reduce_scatter,
                          start_all_gather, start_reduce_scatter)
from .layout import even_split


def weight_chunks(rows: int, cols: int, chunk_mb: float | None, max_chunks: int) -> int:
    """Chunks for a gathered weight of rows x cols (its fp32 gradient the larger of the two) so that
    each is at most chunk_mb MiB; 1 when unset, at most max_chunks (one row per rank and chunk)."""
    if chunk_mb is None:
        return 1
    return max(1, min(max_chunks, math.ceil(rows * cols * 4 / (chunk_mb * 2 ** 20))))


def _bounds(sizes: Sequence[int], chunks: int) -> list[list[int]]:
    """bounds[r][k]: first row of chunk k inside rank r's block (bounds[r][chunks] = sizes[r])."""
    out = []
    for s in sizes:
        b = [0]
        for c in even_split(s, chunks):
            b.append(b[-1] + c)
        out.append(b)
    return out


class _ChunkedGatheredLinear(torch.autograd.Function):
    """y = x @ W^T, W (out, in_local) stored as row blocks over `group` (sizes[r] rows on rank r),
    gathered and reduced in `chunks` pipelined pieces (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, w_block, group, sizes, chunks):
        ctx.save_for_backward(x, w_block)
        ctx.args = (group, sizes, chunks)
        w = _compute_dtype(w_block, x)  # bf16 under autocast: the gathers move bf16 bytes
        bounds, me = _bounds(sizes, chunks), collectives._rank(group)  # (the planner's tracer swaps _rank)
        parts = [[None] * chunks for _ in sizes]
        start = lambda k: start_all_gather(w[bounds[me][k]: bounds[me][k + 1]], group,  # noqa: E731
                                           [b[k + 1] - b[k] for b in bounds])
        pending = start(0)
        for k in range(chunks):
            wk = pending.wait()
            if k + 1 < chunks:
                pending = start(k + 1)  # in flight while chunk k's products are computed
            offset = 0
            for r, b in enumerate(bounds):
                s = b[k + 1] - b[k]
                parts[r][k] = F.linear(x, wk[offset: offset + s])
                offset += s
        return torch.cat([p for row in parts for p in row], dim=-1)

    @staticmethod
    def backward(ctx, grad):
        x, w_block = ctx.saved_tensors
        group, sizes, chunks = ctx.args
        bounds, me = _bounds(sizes, chunks), collectives._rank(group)
        need_x = ctx.needs_input_grad[0]
        w = w_block.to(grad.dtype)  # backward runs outside autocast: the forward matmul's dtype
        rows = math.prod(grad.shape[:-1])
        g2, x2 = grad.reshape(rows, grad.shape[-1]), x.to(grad.dtype).reshape(rows, x.shape[-1])
        offsets = [0]
        for s in sizes:
            offsets.append(offsets[-1] + s)
        chunk_sizes = lambda k: [b[k + 1] - b[k] for b in bounds]  # noqa: E731
        start_w = lambda k: start_all_gather(w[bounds[me][k]: bounds[me][k + 1]], group, chunk_sizes(k))  # noqa: E731
        dw = torch.empty(w_block.shape, dtype=torch.float32, device=w_block.device)
        dx, pending_w, in_flight = None, (start_w(0) if need_x else None), []
        for k in range(chunks):
            gk = torch.cat([g2[:, offsets[r] + b[k]: offsets[r] + b[k + 1]] for r, b in enumerate(bounds)], dim=1)
            # this chunk's weight gradient, summed over the group in fp32 while the next one is computed
            in_flight.append((k, start_reduce_scatter(gk.t().mm(x2).float(), group, chunk_sizes(k))))
            if need_x:
                wk = pending_w.wait()
                if k + 1 < chunks:
                    pending_w = start_w(k + 1)
                part = gk.mm(wk)
                dx = part if dx is None else dx.add_(part)
            if len(in_flight) > 1:
                j, pending = in_flight.pop(0)
                dw[bounds[me][j]: bounds[me][j + 1]] = pending.wait()
        for j, pending in in_flight:
            dw[bounds[me][j]: bounds[me][j + 1]] = pending.wait()
        grad_x = dx.reshape(x.shape).to(x.dtype) if need_x else None
        return grad_x, dw.to(w_block.dtype), None, None, None


def chunked_gathered_linear(x: torch.Tensor, w_block: torch.Tensor, group, sizes: Sequence[int],
                            chunks: int) -> torch.Tensor:
    """gathered_linear(x, w_block, group, sizes) with the weight and its gradient moved in `chunks`
    pipelined pieces."""
    return _ChunkedGatheredLinear.apply(x, w_block, group, tuple(sizes), chunks)


def row_chunks(rows: int, cols: int, chunk_mb: float | None) -> int:
    """Row chunks for a (rows x cols) fp32 buffer of partial sums of at most chunk_mb MiB each."""
    if chunk_mb is None or rows == 0:
        return 1
    return max(1, min(rows, math.ceil(rows * cols * 4 / (chunk_mb * 2 ** 20))))


def chunked_linear_reduce_scatter(xs: Sequence[torch.Tensor], ws: Sequence[torch.Tensor], group,
                                  sizes: Sequence[int], replicas, chunks: int) -> torch.Tensor:
    """linear_reduce_scatter on `chunks` row chunks in turn: each chunk's buffer of partial sums (and
    in backward its gathered output gradient) is 1/chunks of the whole; the same bytes in chunks
    times as many reduce-scatters (every row is independent)."""
    if chunks == 1:
        return linear_reduce_scatter(xs, ws, group, sizes, replicas=replicas)
    # replicated weights: their gradient, summed over the chunks by autograd, all-reduced once
    ws = [copy_to(w, replicas) for w in ws]
    lead = xs[0].shape[:-1]
    flat = [x.reshape(math.prod(lead), x.shape[-1]) for x in xs]  # (shards may be empty)
    bounds = [0]
    for c in even_split(flat[0].shape[0], chunks):
        bounds.append(bounds[-1] + c)
    outs = [linear_reduce_scatter([x[lo:hi] for x in flat], ws, group, sizes)
            for lo, hi in zip(bounds, bounds[1:])]
    return torch.cat(outs).reshape(*lead, outs[0].shape[-1])


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
