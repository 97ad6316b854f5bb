"""Collectives as autograd functions, each with its dual in backward.

Convention: the objective is L = sum over the ranks of a model group of each rank's local loss
term, and every backward returns dL/d(this rank's local input). Under it the duals are exact
transposes of the forward maps:

    forward                          backward
    copy_to(param, g)   identity     all-reduce over g   (a parameter replicated over g is ONE
                                                           logical variable: its gradient is the sum;
                                                           inside an open bucket one flat all-reduce
                                                           per group for all of them, once per backward)
    reduce_scatter(x)   reduce-scat. all-gather
    all_gather(x)       all-gather   reduce-scatter
    sum_partials(x)     all-reduce   all-reduce          (partial sums -> the sum, replicated over g)
    split_layer_norm    one all-gather of every rank's    all-reduce of the two row sums of the
                        row (mean, M2) (Chan's combination) input gradient   (jigsaw_ext.layernorm)
    gathered_linear(x, w_block)      y = x @ all_gather(w_block)^T;  backward re-gathers the weight
                                      (nothing gathered is kept alive) and reduce-scatters dL/dW
                                      back to the block owner (all-reduce in replicated mode)

Reductions of gradients (weight gradients, small-parameter buckets) accumulate in fp32 whatever the
parameter dtype (Megatron's grad_reduce_in_fp32); activations move in the dtype they are computed in.
Forwards run inside `defer_gradient_reductions()` leave those reductions to the last micro-batch of
the optimizer step (jigsaw_ext.accumulate: one reduction per step instead of one per micro-batch).

Shards may be uneven (and empty): the collectives pad every shard to the largest one inside the
collective, so gloo (which rejects uneven all_gather lists) and NCCL take the same path. A group of
None means the axis has size 1 and every function here is the identity: no copy, no call.
Layers never call torch.distributed directly; everything goes through this module.
"""

from __future__ import annotations

import contextvars
import math
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist

from . import aligned
from .accumulate import defer_gradient_reductions, deferred_inputs, local_gradient  # noqa: F401 (re-exported)
from .ring import RingWork, ring_all_gather_steps, ring_reduce_scatter_steps, use_ring

# torch >= 2.13 names; older releases (the GPU machines' 2.11) only have the *_tensor spellings
_native_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_native_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _all_gather_single(output_tensor: torch.Tensor, input_tensor: torch.Tensor, group=None, async_op=False):
    """all_gather_into_tensor: the ring on gloo, the backend's collective elsewhere."""
    if not use_ring(group) or output_tensor.numel() == 0:
        return _native_all_gather(output_tensor, input_tensor, group=group, async_op=async_op)
    work = RingWork(ring_all_gather_steps(output_tensor, input_tensor, group))
    return work if async_op else work.wait() and None


def _reduce_scatter_single(output: torch.Tensor, input: torch.Tensor, group=None, async_op=False):
    """reduce_scatter_tensor (sum): the ring on gloo, the backend's collective elsewhere. output is
    contiguous; input may be a strided (n, ...) view (the ring copies only what it sends)."""
    if not use_ring(group) or output.numel() == 0:
        return _native_reduce_scatter(output.view(-1), input.contiguous().view(-1), group=group, async_op=async_op)
    work = RingWork(ring_reduce_scatter_steps(output, input, group))
    return work if async_op else work.wait() and None


# counted by jigsaw_ext.commstats as the torch.distributed collectives they implement
_all_gather_single.comm_rule = "all_gather_into_tensor"
_reduce_scatter_single.comm_rule = "reduce_scatter_tensor"
_all_reduce = dist.all_reduce  # module-level names: jigsaw_ext.plan.trace swaps them for recorders


class _Pending:
    """An async collective plus the post-processing that turns its buffer into the result."""

    def __init__(self, work, finish):
        self._work, self._finish = work, finish

    def wait(self) -> torch.Tensor:
        if self._work is not None:
            self._work.wait()
        return self._finish()


def _rank(group) -> int:
    return dist.get_rank(group)


def _async(requested: bool) -> bool:
    """Async collectives (a Work handle to wait on later) except under torch.compile, which traces
    synchronous collectives into its graph (as functional collectives) but breaks the graph at an
    async one: compiled, the model has no graph break at its collectives."""
    return requested and not torch.compiler.is_compiling()


def _view3(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, int]:
    """x as (pre, n_dim, post) (a view for contiguous x), and the normalised dim."""
    dim = dim % x.dim()
    x = x.contiguous()
    return x.view(math.prod(x.shape[:dim]), x.shape[dim], math.prod(x.shape[dim + 1 :])), dim


def _gather_into_blocks(x3: torch.Tensor, group, n: int, m: int, async_op: bool = False):
    """(buf, work): every rank's (pre, s_r, post) shard, padded to m, all-gathered into the rank-major
    buffer (n, pre, m, post) (each rank's chunk contiguous)."""
    pre, s, post = x3.shape
    send = x3 if s == m else torch.cat([x3, x3.new_zeros(pre, m - s, post)], dim=1)
    buf = x3.new_empty((n, pre, m, post))
    work = _all_gather_single(buf.view(-1), send.reshape(-1), group=group, async_op=_async(async_op))
    return buf, work


def _scatter_from_blocks(send: torch.Tensor, group, async_op: bool = False):
    """(out, work): a rank-major buffer (n, pre, m, post) of partial sums reduce-scattered; this
    rank's (pre, m, post) chunk (padding included)."""
    n, pre, m, post = send.shape
    out = send.new_empty((pre, m, post))
    # send as it is: a transposed view is made contiguous by the backend's path, chunk-wise by the ring
    work = _reduce_scatter_single(out, send, group=group, async_op=_async(async_op))
    return out, work


def start_all_gather(x: torch.Tensor, group, sizes: Sequence[int], dim: int = 0, async_op: bool = True) -> _Pending:
    """Concatenate every rank's shard along `dim` (shard r has sizes[r] entries) on every rank."""
    n, m = len(sizes), max(sizes)
    x3, dim = _view3(x, dim)
    pre = x3.shape[0]
    buf, work = _gather_into_blocks(x3, group, n, m, async_op)
    shape = lambda total: (*x.shape[:dim], total, *x.shape[dim + 1 :])  # noqa: E731

    def finish():
        if pre == 1 and all(sz == m for sz in sizes):
            return buf.view(shape(n * m))
        return torch.cat([buf[r, :, :sz] for r, sz in enumerate(sizes)], dim=1).view(shape(sum(sizes)))

    return _Pending(work, finish)


def start_reduce_scatter(x: torch.Tensor, group, sizes: Sequence[int], dim: int = 0, async_op: bool = True) -> _Pending:
    """Sum over the group; rank r keeps entries offset(r) : offset(r) + sizes[r] along `dim`."""
    n, m = len(sizes), max(sizes)
    x3, dim = _view3(x, dim)
    pre, total, post = x3.shape
    if all(sz == m for sz in sizes):
        send = x3.view(pre, n, m, post).transpose(0, 1)  # a view (the ring copies only what it sends)
    else:
        send = x3.new_zeros((n, pre, m, post))
        offset = 0
        for r, sz in enumerate(sizes):
            send[r, :, :sz] = x3[:, offset : offset + sz]
            offset += sz
    out, work = _scatter_from_blocks(send, group, async_op)
    me = _rank(group)
    shape = (*x.shape[:dim], sizes[me], *x.shape[dim + 1 :])
    return _Pending(work, lambda: (out if sizes[me] == m else out[:, : sizes[me]]).reshape(shape))


def start_all_reduce(x: torch.Tensor, group, async_op: bool = True) -> _Pending:
    x = x.contiguous()
    work = _all_reduce(x, group=group, async_op=_async(async_op))
    return _Pending(work, lambda: x)


def _gather_dim(x, group, sizes, dim):
    return start_all_gather(x, group, sizes, dim, async_op=False).wait()


def _scatter_dim(x, group, sizes, dim):
    return start_reduce_scatter(x, group, sizes, dim, async_op=False).wait()


class _CopyTo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, deferral, anchor):
        ctx.group, ctx.deferral = group, deferral
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        local = local_gradient(ctx.deferral, grad.to(torch.float32, copy=True))
        if local is None:  # deferred to the last micro-batch of the optimizer step
            return None, None, None, None
        return start_all_reduce(local, ctx.group, async_op=False).wait().to(grad.dtype), None, None, None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, sizes, dim):
        ctx.args = (group, sizes, dim)
        return _scatter_dim(x, group, sizes, dim)

    @staticmethod
    def backward(ctx, grad):
        return _gather_dim(grad, *ctx.args), None, None, None


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, sizes, dim):
        ctx.args = (group, sizes, dim)
        return _gather_dim(x, group, sizes, dim)

    @staticmethod
    def backward(ctx, grad):
        return _scatter_dim(grad, *ctx.args), None, None, None


class _CopyToMany(torch.autograd.Function):
    """copy_to of several parameters replicated over one group: their gradients are flattened into
    one fp32 buffer and summed in ONE all-reduce, when the last of them is complete (autograd runs
    this node's backward once every use of every view has contributed, i.e. at the end of the
    backward pass)."""

    @staticmethod
    def forward(ctx, group, deferral, anchor, *params):
        ctx.group, ctx.deferral = group, deferral
        return tuple(p.view_as(p) for p in params)

    @staticmethod
    def backward(ctx, *grads):
        local = [
            local_gradient(c, g.reshape(-1).to(torch.float32, copy=c is not None)) for c, g in zip(ctx.deferral, grads)
        ]  # None: deferred to the step's last micro-batch
        now = [x for x in local if x is not None]
        flat = start_all_reduce(torch.cat(now), ctx.group, async_op=False).wait() if now else None
        out, offset = [], 0
        for g, x in zip(grads, local):
            out.append(None if x is None else flat[offset : offset + g.numel()].view_as(g).to(g.dtype))
            offset += 0 if x is None else g.numel()
        return (None, None, None, *out)


_BUCKET: contextvars.ContextVar[dict | None] = contextvars.ContextVar("jigsaw_bucket", default=None)


def open_bucket(shared: Iterable[tuple[torch.Tensor, object]]) -> None:
    """From now until `close_bucket()`, `copy_to(p, group)` of each listed (parameter, group) returns
    a view made by one `_CopyToMany` per group, so the gradients of all of them are summed in one
    collective per group per backward instead of one per use (jigsaw_ext.layers.bucket_small_gradients
    opens it around a model's forward)."""
    if torch.compiler.is_compiling():  # torch.compile cannot trace a ContextVar: per-use reductions
        return
    by_group: dict[int, tuple[object, list]] = {}
    for p, group in shared:
        if group is not None:
            by_group.setdefault(id(group), (group, []))[1].append(p)
    views = {}
    for group, params in by_group.values():
        deferral, tensors, anchor = deferred_inputs(params)
        for p, v in zip(params, _CopyToMany.apply(group, deferral, anchor, *tensors)):
            views[(id(p), id(group))] = v
    _BUCKET.set(views)


def close_bucket() -> None:
    if not torch.compiler.is_compiling():
        _BUCKET.set(None)


def copy_to(x: torch.Tensor, group) -> torch.Tensor:
    """Mark `x` (a parameter replicated over `group`) as one logical variable: gradients are summed."""
    if group is None:
        return x
    views = None if torch.compiler.is_compiling() else _BUCKET.get()
    if views is not None and (id(x), id(group)) in views:
        return views[(id(x), id(group))]
    deferral, (t,), anchor = deferred_inputs([x])
    return _CopyTo.apply(t, group, deferral[0], anchor)


class _SumPartials(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return start_all_reduce(x.clone(), group, async_op=False).wait()

    @staticmethod
    def backward(ctx, grad):
        return start_all_reduce(grad.clone(), ctx.group, async_op=False).wait(), None


def sum_partials(x: torch.Tensor, group) -> torch.Tensor:
    """The sum over `group` of every rank's partial `x`, on every rank (forward all-reduce; under the
    sum-of-local-losses convention its dual is again an all-reduce)."""
    return x if group is None else _SumPartials.apply(x, group)


class _GatherBlocks(torch.autograd.Function):
    """All-gather along `dim`, returned as the collective's own rank-major buffer (n, pre, m, post)
    (shards padded to the largest m): for row-wise computations, whose rows can stay in that order
    until a _ScatterBlocks, with no concatenation and no transposing copy in between."""

    @staticmethod
    def forward(ctx, x, group, sizes, dim):
        x3, _ = _view3(x, dim)
        ctx.args = (group, x.shape, x3.shape[1])
        return _gather_into_blocks(x3, group, len(sizes), max(sizes))[0]

    @staticmethod
    def backward(ctx, grad):
        group, shape, s = ctx.args
        return _scatter_from_blocks(grad, group)[0][:, :s].reshape(shape), None, None, None


class _ScatterBlocks(torch.autograd.Function):
    """The dual: a rank-major buffer (n, pre, m, post) of partial sums reduce-scattered; this rank's
    (pre, sizes[me], post) block reshaped to `shape`."""

    @staticmethod
    def forward(ctx, buf, group, sizes, shape):
        n, pre, m, post = buf.shape
        s = sizes[_rank(group)]
        ctx.args = (group, n, pre, s, m, post)
        return _scatter_from_blocks(buf, group)[0][:, :s].reshape(shape)

    @staticmethod
    def backward(ctx, grad):
        group, n, pre, s, m, post = ctx.args
        return _gather_into_blocks(grad.contiguous().view(pre, s, post), group, n, m)[0], None, None, None


def gather_blocks(x: torch.Tensor, group, sizes: Sequence[int], dim: int) -> torch.Tensor:
    """x's shards along `dim` from every rank of `group` as the rank-major (n, pre, m, post) buffer
    (see _GatherBlocks); with no group, x as (1, pre, size, post)."""
    if group is None:
        x3, _ = _view3(x, dim)
        return x3.unsqueeze(0)
    return _GatherBlocks.apply(x, group, tuple(sizes), dim)


def scatter_blocks(buf: torch.Tensor, group, sizes: Sequence[int], shape) -> torch.Tensor:
    """Sum a rank-major buffer of partial sums over `group`; this rank's block, as `shape`."""
    if group is None:
        return buf[0].reshape(shape)
    return _ScatterBlocks.apply(buf, group, tuple(sizes), tuple(shape))


def reduce_scatter(x: torch.Tensor, group, sizes: Sequence[int], dim: int = -1) -> torch.Tensor:
    return x if group is None else _ReduceScatter.apply(x, group, tuple(sizes), dim)


def all_gather(x: torch.Tensor, group, sizes: Sequence[int], dim: int = -1) -> torch.Tensor:
    return x if group is None else _AllGather.apply(x, group, tuple(sizes), dim)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast computes in on this device type, or None when it is off (always on the
    meta device, which autocast does not know: jigsaw_ext.plan traces models there)."""
    if device.type == "meta" or not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def _compute_dtype(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
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
        out = lambda y: (
            y.view(*lead, y.shape[1], shape[-2]).transpose(-1, -2)
            if t  # noqa: E731
            else y.view(*lead, y.shape[-1])
        )
        w_compute = _compute_dtype(w_block, x)  # bf16 under autocast: the gather moves bf16 bytes
        if not gather:
            return out(_product(x, w_compute, t, align))
        if prefetched is not None:  # gathered while the previous layer computed (mesh.prefetch_weights)
            return out(_product(x, prefetched.wait(), t, align))
        me, offset = _rank(group), 0
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
        grad_w = _weight_grad(g, x.to(grad.dtype), t, align).float()
        grad_w = local_gradient(ctx.deferral, grad_w)  # None: deferred to the step's last micro-batch
        pending_gw = (
            None
            if grad_w is None
            else start_reduce_scatter(grad_w, group, sizes)
            if gather
            else start_all_reduce(grad_w, group)
        )
        grad_x = None
        if need_x:
            w = (kept.to(grad.dtype) if kept is not None else pending_w.wait()) if gather else w_compute
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
    prefetched: _Pending | None = None,
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


def start_weight_gather(w_block: torch.Tensor, group, sizes: Sequence[int]) -> tuple[tuple, _Pending]:
    """(key, pending): the async all-gather of a weight's row blocks in the dtype the forward will
    compute in (autocast's, if on), for `gathered_linear(..., prefetched=pending)`; the key (the
    block's version and that dtype) tells the consumer whether it still matches."""
    with torch.no_grad():
        w = _compute_dtype(w_block.detach(), w_block)
        return (w_block._version, w.dtype), start_all_gather(w, group, sizes)


def _sum_over(x: torch.Tensor, group) -> torch.Tensor:
    return x if group is None else start_all_reduce(x, group, async_op=False).wait()
