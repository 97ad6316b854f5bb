"""How a lat x lon grid becomes tokens, and how those tokens and channels are split over the mesh
(shared by the data loader, the model, training and inference).

Tokens are patches in row-major order (patch row, patch column). The DOMAIN axis splits the patch
rows into latitude bands (uneven when needed: 721 rows -> 361 + 360), the TP axis splits channels.
With pad_to_patch the grid is zero-padded at the southern/eastern edge to a whole number of patches;
the padding is added by the rank that owns the edge and cropped again on output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import pairwise

import torch
import torch.nn.functional as F
from einops import rearrange

from jigsaw_ext.layout import Layout, Split, even_split
from jigsaw_ext.mesh import Mesh

from .config import ModelConfig


class MeshMismatch(ValueError):
    pass


@dataclass(frozen=True)
class Geometry:
    cfg: ModelConfig
    mesh: Mesh

    def __post_init__(self):
        dom, tp = self.mesh.size("domain"), self.mesh.size("tp")
        if self.patch_rows < dom:
            raise MeshMismatch(
                f"mesh.domain={dom} exceeds the {self.patch_rows} patch rows of model.grid {self.cfg.grid} "
                f"with model.patch {self.cfg.patch}: allowed mesh.domain <= {self.patch_rows}"
            )
        for key, n in (("model.hidden", self.cfg.hidden), ("channel-mixing hidden size", self.channel_hidden)):
            if n < tp:
                raise MeshMismatch(f"mesh.tp={tp} exceeds {key}={n}: allowed mesh.tp <= {n}")
        if self.token_hidden < dom:
            raise MeshMismatch(f"mesh.domain={dom} exceeds the token-mixing hidden size {self.token_hidden}")

    # grid and tokens ----------------------------------------------------------------------------
    @property
    def patch_rows(self) -> int:
        return math.ceil(self.cfg.grid[0] / self.cfg.patch[0])

    @property
    def patch_cols(self) -> int:
        return math.ceil(self.cfg.grid[1] / self.cfg.patch[1])

    @property
    def tokens(self) -> int:
        return self.patch_rows * self.patch_cols

    @property
    def patch_pixels(self) -> int:
        return self.cfg.patch[0] * self.cfg.patch[1]

    @property
    def token_hidden(self) -> int:
        return self._multiple(max(1, round(self.cfg.token_fraction * self.tokens)))

    @property
    def channel_hidden(self) -> int:
        return self._multiple(max(1, round(self.cfg.channel_fraction * self.cfg.hidden)))

    def _multiple(self, n: int) -> int:
        """n rounded up to model.hidden_multiple (GEMM-friendly shard sizes)."""
        m = self.cfg.hidden_multiple
        return -(-n // m) * m

    # splits over the mesh -----------------------------------------------------------------------
    def _split(self, axis: str, n: int) -> Split:
        return Split(axis, even_split(n, self.mesh.size(axis)))

    @property
    def patch_row_split(self) -> Split:
        return self._split("domain", self.patch_rows)

    @property
    def token_split(self) -> Split:
        return Split("domain", tuple(r * self.patch_cols for r in self.patch_row_split.sizes))

    @property
    def pixel_row_split(self) -> Split:
        """Real (unpadded) grid rows of each domain rank."""
        ph, n_lat = self.cfg.patch[0], self.cfg.grid[0]
        bounds = [min(self.patch_row_split.offset(d) * ph, n_lat) for d in range(len(self.patch_row_split.sizes))]
        bounds.append(n_lat)
        return Split("domain", tuple(b - a for a, b in pairwise(bounds)))

    def token_hidden_split(self) -> Split:
        return self._split("domain", self.token_hidden)

    def feature_split(self, n: int) -> Split:
        return self._split("tp", n)

    def channel_split(self, n_channels: int) -> Split:
        return self._split("tp", n_channels)

    def patch_feature_split(self, n_channels: int) -> Split:
        """Features of a patch ordered (channel, pixel): a rank's channels are one contiguous range."""
        return Split("tp", tuple(c * self.patch_pixels for c in self.channel_split(n_channels).sizes))

    def grid_layout(self, n_channels: int, batch: int) -> Layout:
        """(batch, channel, lat, lon) on the grid: channels over TP, latitude bands over DOMAIN."""
        return Layout(
            (batch, n_channels, *self.cfg.grid), (None, self.channel_split(n_channels), self.pixel_row_split, None)
        )

    # local patchify / unpatchify ----------------------------------------------------------------
    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_local, rows_local, lon) -> (B, tokens_local, C_local * patch_pixels)."""
        ph, pw = self.cfg.patch
        d = self.mesh.coord("domain")
        rows = self.patch_row_split.size(d) * ph
        expected = self.pixel_row_split.size(d)
        if x.shape[-2] != expected or x.shape[-1] != self.cfg.grid[1]:
            raise MeshMismatch(
                f"input block has {tuple(x.shape[-2:])} (rows, lon) on domain rank {d}, "
                f"expected ({expected}, {self.cfg.grid[1]}) for model.grid {self.cfg.grid}"
            )
        pad_rows, pad_cols = rows - x.shape[-2], self.patch_cols * pw - x.shape[-1]
        if pad_rows or pad_cols:
            x = F.pad(x, (0, pad_cols, 0, pad_rows))
        return rearrange(x, "b c (r ph) (q pw) -> b (r q) (c ph pw)", ph=ph, pw=pw)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, tokens_local, C_local * patch_pixels) -> (B, C_local, rows_local, lon), padding cropped."""
        ph, pw = self.cfg.patch
        d = self.mesh.coord("domain")
        x = rearrange(tokens, "b (r q) (c ph pw) -> b c (r ph) (q pw)", q=self.patch_cols, ph=ph, pw=pw)
        return x[..., : self.pixel_row_split.size(d), : self.cfg.grid[1]]
