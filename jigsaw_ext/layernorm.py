"""The exact LayerNorm of a feature axis split over a mesh axis, as an autograd function with its
dual (the collective side of jigsaw_ext.layers.DistLayerNorm; the collectives come from
jigsaw_ext.collectives).

    forward: one all-gather of every rank's row (mean, M2), combined with Chan et al.'s formula
    backward: one all-reduce of the two row sums the input gradient needs

and the LayerNorm of a feature axis that a layer has gathered whole into the rank-major buffer of
jigsaw_ext.collectives.gather_blocks (no collective at all: `blocks_layer_norm`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .collectives import _gather_dim, _sum_over


def _segment_moments(x: torch.Tensor, eps: float):
    """(x normalised by its own row statistics, row mean, row M2) of one feature segment, from one
    fused LayerNorm kernel: it reads x twice where sum, centre, square, sum read it four times and
    write two temporaries. M2 = n (1 / rstd^2 - eps), exact to rounding; None for an empty segment."""
    n = x.shape[-1]
    if n == 0:
        return None
    out, mean, rstd = torch.native_layer_norm(x, (n,), None, None, eps)
    return out, mean, rstd, rstd.pow(-2).sub_(eps).clamp_(min=0).mul_(n)


def _chan(means: torch.Tensor, m2s: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row (mean, M2) of the union of parts with row means `means`, M2s `m2s` (..., k) and sizes c (k,):
    Chan et al.'s pairwise formula, as stable as a two-pass variance."""
    total = c.sum().clamp(min=1)
    mean = (means * c).sum(-1, keepdim=True) / total
    return mean, m2s.sum(-1, keepdim=True) + ((means - mean).square() * c).sum(-1, keepdim=True)


def _row_stats(xs: Sequence[torch.Tensor], counts: Sequence[int], group, eps: float):
    """(mean, variance, parts) over the full feature axis of every row: each segment's (mean, M2) from
    the fused kernel, combined over the segments and then over the ranks from ONE all-gather of each
    rank's row (mean, M2) (_chan). counts[r]: features on rank r; parts: _segment_moments per segment."""
    parts = [_segment_moments(x, eps) for x in xs]
    present = [p for p in parts if p is not None]
    lead = xs[0].shape[:-1]
    if present:
        sizes = torch.tensor([float(x.shape[-1]) for x in xs if x.shape[-1]], device=xs[0].device)
        mean, m2 = _chan(torch.cat([p[1] for p in present], -1), torch.cat([p[3] for p in present], -1), sizes)
    else:
        mean = m2 = torch.zeros(*lead, 1, dtype=torch.float32, device=xs[0].device)
    if group is None:
        return mean, m2 / max(sum(x.shape[-1] for x in xs), 1), parts
    stats = _gather_dim(torch.cat([mean, m2], dim=-1), group, [2] * len(counts), -1)
    stats = stats.view(*stats.shape[:-1], len(counts), 2)
    c = torch.tensor(counts, dtype=stats.dtype, device=stats.device)
    mean, m2 = _chan(stats[..., 0], stats[..., 1], c)
    return mean, m2 / float(sum(counts)), parts


class _SplitLayerNorm(torch.autograd.Function):
    """LayerNorm over a feature axis whose segments are split over `group`: statistics over all
    features, combined across ranks. Saves what F.layer_norm saves: the input (in its own dtype),
    the row mean and 1/std; the normalised input is recomputed in backward. Forward: one all-gather
    of the row statistics; backward: one all-reduce of the two row sums the input gradient needs."""

    @staticmethod
    def forward(ctx, group, counts, eps, out_dtype, n_seg, *tensors):
        xs, ws, bs = tensors[:n_seg], tensors[n_seg : 2 * n_seg], tensors[2 * n_seg :]
        acc = [x.to(torch.promote_types(x.dtype, torch.float32)) for x in xs]
        mean, var, parts = _row_stats(acc, counts, group, eps)
        inv = torch.rsqrt(var + eps)
        ctx.save_for_backward(mean, inv, *xs, *ws)
        ctx.args = (group, sum(counts), n_seg)
        outs = []
        for x, w, b, part in zip(acc, ws, bs, parts, strict=True):
            if part is None:
                outs.append(x.to(out_dtype))
                continue
            # from the segment's own normalisation, in its buffer: (x - mean) inv = own inv / rstd_s +
            # (mean_s - mean) inv, then the affine (in place: addcmul with a broadcast bias is 5x slower on CPU)
            own, mean_s, rstd_s, _ = part
            normed = own.mul_(inv / rstd_s).add_((mean_s - mean).mul_(inv))
            outs.append(normed.mul_(w).add_(b).to(out_dtype))
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        group, n, n_seg = ctx.args
        mean, inv, *rest = ctx.saved_tensors
        xs, ws = rest[:n_seg], rest[n_seg:]
        shift = -mean * inv
        normed = [torch.addcmul(shift, x.to(mean.dtype), inv) for x in xs]
        lead = lambda t: t.reshape(-1, t.shape[-1])  # noqa: E731
        # one copy of a transposed gradient (the token-mixing LayerNorm's comes back as the transpose
        # of fc1's input gradient): otherwise g * normed inherits its strides, and the two row-sum
        # products and the two reshapes below would each copy g or g * normed
        gs = [g.to(h.dtype).contiguous() for g, h in zip(grads, normed, strict=True)]
        ghs = [g * h for g, h in zip(gs, normed, strict=True)]
        dws = [lead(gh).sum(0).to(w.dtype) for gh, w in zip(ghs, ws, strict=True)]
        dbs = [lead(g).sum(0).to(w.dtype) for g, w in zip(gs, ws, strict=True)]
        # the row sums of g w and g w normed as products with w (no full-size g * w temporary)
        wf = [w.to(h.dtype) for w, h in zip(ws, normed, strict=True)]
        sums = torch.stack(
            [
                sum(g.matmul(w) for g, w in zip(gs, wf, strict=True)),
                sum(gh.matmul(w) for gh, w in zip(ghs, wf, strict=True)),
            ],
            dim=-1,
        )
        sums = _sum_over(sums, group) / n
        mean_g, mean_gh = sums[..., :1], sums[..., 1:]
        # inv * (g w - mean_g - normed mean_gh): three passes, in the buffer of g * normed
        dxs = [
            torch.addcmul(-mean_g, h, -mean_gh, out=gh).addcmul_(g, w).mul_(inv).to(x.dtype)
            for g, h, gh, w, x in zip(gs, normed, ghs, wf, xs, strict=True)
        ]
        return (None, None, None, None, None, *dxs, *dws, *dbs)


def split_layer_norm(
    xs: Sequence[torch.Tensor],
    ws: Sequence[torch.Tensor],
    bs: Sequence[torch.Tensor],
    group,
    counts: Sequence[int],
    eps: float,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, ...]:
    """LayerNorm of the concatenation of `xs` along the last dim, whose features are split over
    `group` (counts[r]: the features rank r of the group holds); ws/bs are the matching affine segments."""
    return _SplitLayerNorm.apply(group, tuple(counts), eps, out_dtype, len(xs), *xs, *ws, *bs)


def _padded(v: torch.Tensor, sizes: Sequence[int], m: int) -> torch.Tensor:
    """A vector of sum(sizes) entries as the (n, 1, m, 1) blocks of a rank-major buffer, zero padded."""
    out = v.new_zeros(len(sizes), m)
    offset = 0
    for r, s in enumerate(sizes):
        out[r, :s] = v[offset : offset + s]
        offset += s
    return out.view(len(sizes), 1, m, 1)


def _unpadded(blocks: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    return torch.cat([blocks[r, :s] for r, s in enumerate(sizes)])


class _BlocksLayerNorm(torch.autograd.Function):
    """LayerNorm over dimensions (0, 2) of a rank-major buffer (n, pre, m, post) whose block r holds
    sizes[r] rows of the feature axis (then zero padding): every feature is on this rank, so the
    statistics need no collective. Saves what F.layer_norm saves (the input, the mean and 1/std);
    padded rows come out 0 and get a zero gradient."""

    @staticmethod
    def forward(ctx, buf, w, b, sizes, eps, out_dtype):
        n, pre, m, post = buf.shape
        total = sum(sizes)
        x = buf.to(torch.promote_types(buf.dtype, torch.float32))
        if all(s == m for s in sizes):  # two passes: torch.var_mean is slower on CPU
            mask = None
            mean = x.sum((0, 2), keepdim=True) / total
            centred = x - mean
            var = centred.square().sum((0, 2), keepdim=True) / total
        else:
            mask = (torch.arange(m, device=buf.device) < torch.tensor(sizes, device=buf.device)[:, None]).view(
                n, 1, m, 1
            )
            mean = x.sum((0, 2), keepdim=True) / total  # the padding is zero
            centred = (x - mean).mul_(mask)
            var = centred.square().sum((0, 2), keepdim=True) / total
        inv = torch.rsqrt(var + eps)
        ctx.save_for_backward(buf, mean, inv, w)
        ctx.args = (tuple(sizes), mask)
        out = centred.mul_(inv).mul_(_padded(w.to(x.dtype), sizes, m)).add_(_padded(b.to(x.dtype), sizes, m))
        return out.to(out_dtype)

    @staticmethod
    def backward(ctx, grad):
        buf, mean, inv, w = ctx.saved_tensors
        sizes, mask = ctx.args
        total, m = sum(sizes), buf.shape[2]
        normed = (buf.to(mean.dtype) - mean).mul_(inv)
        if mask is not None:
            normed.mul_(mask)
        g = grad.to(mean.dtype)
        dw = _unpadded((g * normed).sum((1, 3)), sizes).to(w.dtype)
        db = _unpadded(g.sum((1, 3)), sizes).to(w.dtype)
        g_hat = g * _padded(w.to(mean.dtype), sizes, m)
        mean_g = g_hat.sum((0, 2), keepdim=True) / total
        mean_gh = (g_hat * normed).sum((0, 2), keepdim=True) / total
        dx = g_hat.sub_(mean_g).sub_(normed.mul_(mean_gh)).mul_(inv)
        if mask is not None:
            dx.mul_(mask)
        return dx.to(buf.dtype), dw, db, None, None, None


def blocks_layer_norm(
    buf: torch.Tensor, w: torch.Tensor, b: torch.Tensor, sizes: Sequence[int], eps: float, out_dtype: torch.dtype
) -> torch.Tensor:
    """LayerNorm of the feature axis held as the rank-major row blocks (n, pre, m, post) of
    jigsaw_ext.collectives.gather_blocks (block r: sizes[r] features); w, b: the whole affine."""
    return _BlocksLayerNorm.apply(buf, w, b, tuple(sizes), eps, out_dtype)
