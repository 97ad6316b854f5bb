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

Reductions of gradients (weight gradients, small-parameter buckets) accumulate in fp32 whatever the
parameter dtype (Megatron's grad_reduce_in_fp32); activations move in the dtype they are computed in.
Forwards run inside `defer_gradient_reductions()` leave those reductions to the last micro-batch of
the optimizer step (jigsaw_ext.accumulate: one reduction per step instead of one per micro-batch).

Shards may be uneven (and empty): the collectives pad every shard to the largest one inside the
collective, so gloo (which rejects uneven all_gather lists) and NCCL take the same path. A group of
None means the axis has size 1 and every function here is the identity: no copy, no call.
Layers never call torch.distributed directly; everything goes through this module. The products fused
with their communication (jigsaw_ext.gathered, jigsaw_ext.chunked) are built on its primitives.
"""

from __future__ import annotations

import contextvars
import math
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist

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
_all_gather_single.__dict__["comm_rule"] = "all_gather_into_tensor"
_reduce_scatter_single.__dict__["comm_rule"] = "reduce_scatter_tensor"
_all_reduce = dist.all_reduce  # module-level names: jigsaw_ext.plan.trace swaps them for recorders


class Pending:
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


def start_all_gather(x: torch.Tensor, group, sizes: Sequence[int], dim: int = 0, async_op: bool = True) -> Pending:
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

    return Pending(work, finish)


def start_reduce_scatter(x: torch.Tensor, group, sizes: Sequence[int], dim: int = 0, async_op: bool = True) -> Pending:
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
    return Pending(work, lambda: (out if sizes[me] == m else out[:, : sizes[me]]).reshape(shape))


def start_all_reduce(x: torch.Tensor, group, async_op: bool = True) -> Pending:
    x = x.contiguous()
    work = _all_reduce(x, group=group, async_op=_async(async_op))
    return Pending(work, lambda: x)


def group_rank(group) -> int:
    """This rank's index in `group` (through `_rank`, which the planner's tracer swaps)."""
    return _rank(group)


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
            local_gradient(c, g.reshape(-1).to(torch.float32, copy=c is not None))
            for c, g in zip(ctx.deferral, grads, strict=True)
        ]  # None: deferred to the step's last micro-batch
        now = [x for x in local if x is not None]
        flat = start_all_reduce(torch.cat(now), ctx.group, async_op=False).wait() if now else None
        out: list[torch.Tensor | None] = []
        offset = 0
        for g, x in zip(grads, local, strict=True):
            if x is None:
                out.append(None)
                continue
            assert flat is not None  # x is one of `now`: the all-reduce ran
            out.append(flat[offset : offset + g.numel()].view_as(g).to(g.dtype))
            offset += g.numel()
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
        for p, v in zip(params, _CopyToMany.apply(group, deferral, anchor, *tensors), strict=True):
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


def _sum_over(x: torch.Tensor, group) -> torch.Tensor:
    return x if group is None else start_all_reduce(x, group, async_op=False).wait()
