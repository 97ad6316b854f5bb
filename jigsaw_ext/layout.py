"""Block layouts: which tensor dimension is split over which mesh axis, with which shard sizes.

One abstraction serves every mesh: a `Layout` is data (global shape + a `Split` per dimension),
never a class per parallel degree. Shards may be uneven (721 latitude rows over 2 ranks is 361/360)
and may be empty on some ranks (3 static channels over TP=4).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch


def even_split(n: int, parts: int) -> tuple[int, ...]:
    """Sizes of `parts` contiguous shards of `n` items; the first n % parts shards get one more."""
    if parts < 1:
        raise ValueError(f"cannot split into {parts} parts")
    q, r = divmod(n, parts)
    return tuple(q + (1 if i < r else 0) for i in range(parts))


@dataclass(frozen=True)
class Split:
    """A dimension split into contiguous shards along one mesh axis ('dp', 'domain' or 'tp')."""

    axis: str
    sizes: tuple[int, ...]

    @property
    def total(self) -> int:
        return sum(self.sizes)

    def offset(self, coord: int) -> int:
        return sum(self.sizes[:coord])

    def size(self, coord: int) -> int:
        return self.sizes[coord]

    def slice(self, coord: int) -> slice:
        start = self.offset(coord)
        return slice(start, start + self.sizes[coord])


@dataclass(frozen=True)
class Layout:
    """Global logical shape of a tensor and how each of its dimensions is split over the mesh."""

    shape: tuple[int, ...]
    splits: tuple[Split | None, ...]

    def __post_init__(self):
        if len(self.shape) != len(self.splits):
            raise ValueError(f"layout rank mismatch: shape {self.shape} vs splits {self.splits}")
        for dim, (n, split) in enumerate(zip(self.shape, self.splits, strict=True)):
            if split is not None and split.total != n:
                raise ValueError(f"dim {dim}: shard sizes {split.sizes} do not add up to {n}")

    @property
    def split_axes(self) -> set[str]:
        return {s.axis for s in self.splits if s is not None}

    def local_slices(self, coords: Mapping[str, int]) -> tuple[slice, ...]:
        return tuple(slice(None) if s is None else s.slice(coords[s.axis]) for s in self.splits)

    def local_shape(self, coords: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(n if s is None else s.size(coords[s.axis]) for n, s in zip(self.shape, self.splits, strict=True))

    def shard(self, full: torch.Tensor, coords: Mapping[str, int]) -> torch.Tensor:
        """This rank's block of a full logical tensor (a view)."""
        if tuple(full.shape) != self.shape:
            raise ValueError(f"expected a full tensor of shape {self.shape}, got {tuple(full.shape)}")
        return full[self.local_slices(coords)]

    # a layout as JSON (checkpoints record every parameter's layout, so they can be read on any mesh)
    def to_json(self) -> dict:
        return {
            "shape": list(self.shape),
            "splits": [None if s is None else {"axis": s.axis, "sizes": list(s.sizes)} for s in self.splits],
        }

    @classmethod
    def from_json(cls, d: dict) -> Layout:
        return cls(
            tuple(d["shape"]), tuple(None if s is None else Split(s["axis"], tuple(s["sizes"])) for s in d["splits"])
        )


def block_layout(p: torch.Tensor) -> Layout:
    """The layout of the logical tensor whose block the parameter `p` holds (jigsaw_ext.layers.make_param
    attaches it as `p.block_layout`)."""
    layout = p.__dict__.get("block_layout")
    if not isinstance(layout, Layout):
        raise AttributeError("a parameter without a block layout: build it with jigsaw_ext.layers.make_param")
    return layout
