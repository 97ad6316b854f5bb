"""Layout-independent initialisation: one global seed gives the same logical weights on every mesh.

Each logical tensor is drawn in fixed chunks of rows along its first dimension; a chunk's random
stream is seeded from (seed, parameter name, chunk index) only. A rank draws just the chunks that
overlap its block and keeps its slice, so no rank materialises a full large matrix and the values
do not depend on how the tensor is split.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn as nn

from .layout import block_layout
from .mesh import Mesh

CHUNK_ELEMENTS = 1 << 16


def _chunk_seed(seed: int, name: str, chunk: int) -> int:
    digest = hashlib.sha256(f"{seed}:{name}:{chunk}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def fill_block(param: torch.Tensor, layout, coords, init: tuple, seed: int, name: str) -> None:
    kind, value = init
    if kind == "const":
        param.fill_(value)
        return
    if kind != "uniform":
        raise ValueError(f"unknown init kind {kind!r} for parameter {name}")
    shape = layout.shape
    row_elems = math.prod(shape[1:])
    rows_per_chunk = max(1, CHUNK_ELEMENTS // max(row_elems, 1))
    slices = layout.local_slices(coords)
    r0, r1, _ = slices[0].indices(shape[0])
    gen = torch.Generator(device="cpu")
    pieces = []
    for chunk in range(r0 // rows_per_chunk, (r1 - 1) // rows_per_chunk + 1 if r1 > r0 else 0):
        c0 = chunk * rows_per_chunk
        c1 = min(c0 + rows_per_chunk, shape[0])
        gen.manual_seed(_chunk_seed(seed, name, chunk))
        block = torch.rand((c1 - c0, *shape[1:]), generator=gen, dtype=torch.float64)
        block = block[max(r0, c0) - c0 : min(r1, c1) - c0]
        pieces.append(block[(slice(None), *slices[1:])])
    if pieces:
        full = torch.cat(pieces)
        param.copy_((full * 2 - 1) * value)


def init_parameters(module: nn.Module, mesh: Mesh, seed: int) -> None:
    """Fill every parameter carrying `.block_layout`/`.block_init` with its block of the logical tensor."""
    for name, p in module.named_parameters():
        if p.is_meta:
            continue
        if not hasattr(p, "block_layout"):
            raise TypeError(f"parameter {name} has no layout: build it with jigsaw_ext.layers.make_param")
        fill_block(p, block_layout(p), mesh.coords, p.__dict__["block_init"], seed, name)
