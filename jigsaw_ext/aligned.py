"""Matrix products on aligned shapes (mesh.gemm_multiple): the same products, faster GEMMs.

bf16 GEMMs whose inner or output dimension is not a multiple of 8 run at about a third of the
aligned rate on H100/H200 (the WeatherMixer's 17,304 tokens, H_s = 8,652 and its 4,140 patch
features). Here the operands are zero-padded along the inner dimension and the output's feature
dimension to a multiple of `multiple` just for the product, and the output is cropped back: the
padded entries multiply zeros, so the result is the unpadded product (up to summation order), and
the parameters, their gradients, the optimizer state and checkpoints keep the model's own shapes.
No padded weight exists between steps, so nothing has to be kept at zero. The padding copies are
one pass over each operand, small beside the product (a 1.3 TFLOP token-mixing GEMM reads 150 MB).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pad_dim(x: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
    """x zero-padded at the end of `dim` to a multiple of `multiple` (x itself when it is one)."""
    n = x.shape[dim]
    extra = -n % multiple
    if multiple <= 1 or extra == 0:
        return x
    dim = dim % x.dim()
    pad = [0, 0] * (x.dim() - 1 - dim) + [0, extra]
    return F.pad(x, pad)


def linear(x: torch.Tensor, w: torch.Tensor, multiple: int = 1) -> torch.Tensor:
    """x @ w^T (F.linear without bias) with the inner and output dimensions padded (autograd-safe:
    the gradients of x and w are those of the unpadded product, cropped by the pads' backward)."""
    if multiple <= 1:
        return F.linear(x, w)
    out = w.shape[0]
    xp, wp = pad_dim(x, -1, multiple), pad_dim(pad_dim(w, -1, multiple), 0, multiple)
    if xp is x and wp is w:
        return F.linear(x, w)
    y = F.linear(xp, wp)
    return y if y.shape[-1] == out else y[..., :out]


def matmul(a: torch.Tensor, b: torch.Tensor, multiple: int = 1) -> torch.Tensor:
    """a @ b (2-d, or batched 3-d) with the inner dimension and b's columns padded; the rows of a
    (the GEMM's M: any size runs at full rate) are left as they are."""
    if multiple <= 1:
        return a @ b
    cols = b.shape[-1]
    ap, bp = pad_dim(a, -1, multiple), pad_dim(pad_dim(b, -2, multiple), -1, multiple)
    y = ap @ bp
    return y if y.shape[-1] == cols else y[..., :cols]


def weight_bmm(w: torch.Tensor, x: torch.Tensor, multiple: int = 1) -> torch.Tensor:
    """w @ x[b] for every b: one 2-d weight (N, K) against a batch x (B, K, F) -> (B, N, F). The weight
    is padded before it is expanded over the batch, so the padding copies one weight, not B."""
    if multiple <= 1:
        return torch.bmm(w.expand(x.shape[0], *w.shape), x)
    cols = x.shape[-1]
    wp, xp = pad_dim(w, -1, multiple), pad_dim(pad_dim(x, -2, multiple), -1, multiple)
    y = torch.bmm(wp.expand(x.shape[0], *wp.shape), xp)
    return y if y.shape[-1] == cols else y[..., :cols]
