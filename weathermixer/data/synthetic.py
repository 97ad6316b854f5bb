"""An in-memory ERA5-like data set: deterministic from a seed, any time index on demand.

Dynamics (time step `step_hours`, default 6 h):
- a few latent fields made of low zonal/meridional harmonics, sin(colat)^m cos(m lon + ...) so they
  are smooth at the poles, each advected eastward by a latitude-dependent zonal jet (strongest
  near +-45 deg). The shift is exact and fractional (a phase rotation of each zonal wavenumber),
  so x(t+1) is a learnable function of x(t);
- every predicted channel is a fixed random mix of the latent fields; temperature-like channels
  (name contains "temperature", or is "t"/"t2m", optionally with a level suffix) add a diurnal
  cycle following the sun westward (stronger at the surface and over land) and a cooling with
  orography, so the static fields matter;
- static fields: a land-sea mask (thresholded smooth field, ~30 % land) and orography (positive,
  land only), fixed in time;
- small independent noise per time step (the irreducible error).

Every channel is standardised (mean ~0, std ~1, statistics of the noiseless signal over a spread
of times). Latitudes are equiangular from +90 to -90 including both poles (ERA5 order).

Each rank may generate the full field and shard it with the model's grid layout: fine for this
small embedded default. The real data pipeline reads only each rank's block from disk.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from ..config import ModelConfig


def is_temperature(name: str) -> bool:
    base = name.lower()
    return "temperature" in base or base.split("_")[0] in {"t", "t2m"}


def is_surface_level(name: str, cfg: ModelConfig) -> bool:
    return name in cfg.channels.surface


class SyntheticWeather:
    """x(t) for integer time indices t >= 0 on the ModelConfig's grid and channels."""

    def __init__(
        self,
        cfg: ModelConfig,
        seed: int = 0,
        n_latent: int = 3,
        noise: float = 0.05,
        step_hours: float = 6.0,
        max_wavenumber: int = 4,
        max_meridional: int = 4,
    ):
        self.cfg, self.seed, self.noise, self.step_hours = cfg, seed, noise, step_hours
        self.n_lat, self.n_lon = cfg.grid
        self.names = cfg.channels.names
        self.static_names = list(cfg.channels.static)
        rng = np.random.default_rng([seed, 0x5EED])

        lat = np.linspace(90.0, -90.0, self.n_lat) if self.n_lat > 1 else np.zeros(1)
        lon = np.arange(self.n_lon) * 360.0 / self.n_lon
        self._lat_deg, self._lon_deg = lat, lon
        colat = np.deg2rad(90.0 - lat)[:, None]  # (H, 1), 0 at the north pole
        lon_rad = np.deg2rad(lon)[None, :]  # (1, W)

        self._init_latent(rng, n_latent, max_wavenumber, max_meridional, colat, lon_rad)
        self._init_static(rng, colat, lon_rad)

        # channels: fixed latent mixes + diurnal cycle + orography cooling on temperature-like ones
        C = len(self.names)
        self._mix = rng.normal(size=(C, n_latent)) / math.sqrt(n_latent)
        self._diurnal = np.array(
            [(1.0 if is_surface_level(n, cfg) else 0.3) if is_temperature(n) else 0.0 for n in self.names]
        )
        self._lapse = np.array([0.8 if is_temperature(n) else 0.0 for n in self.names])
        self._cos_lat = np.clip(np.cos(np.deg2rad(lat)), 0.0, None)[:, None]
        self._lon_hours = (lon / 15.0)[None, :]

        # standardisation from the noiseless signal at a spread of times
        ref = np.stack([self._raw(t) for t in range(0, 64 * 37, 37)])  # (T, C, H, W)
        self._mean = ref.mean(axis=(0, 2, 3))
        self._std = ref.std(axis=(0, 2, 3))
        self._std[self._std < 1e-12] = 1.0

    def _init_latent(self, rng, n_latent: int, max_wavenumber: int, max_meridional: int, colat, lon_rad) -> None:
        """Latent fields psi_j(t) = Re sum_m C_jm(lat) exp(i m (lon - c_j(lat) t)): random meridional
        structure per zonal wavenumber m, advected by a westerly jet."""
        lat = self._lat_deg
        M = max(1, min(max_wavenumber, self.n_lon // 4))
        self._m = np.arange(M + 1)
        coef = np.zeros((n_latent, self.n_lat, M + 1), dtype=np.complex128)
        for j in range(n_latent):
            for m in range(M + 1):
                for n in range(max_meridional):
                    amp = rng.normal() / (1.0 + 0.5 * n) * (0.3 if m == 0 else 1.0)  # weak zonal mean
                    phase_lat, phase_lon = rng.uniform(0, 2 * np.pi, 2)
                    coef[j, :, m] += (
                        amp * np.sin(colat[:, 0]) ** m * np.cos(n * colat[:, 0] + phase_lat) * np.exp(1j * phase_lon)
                    )
        self._coef = coef
        self._eim = np.exp(1j * self._m[:, None] * lon_rad)  # (M+1, W)
        # zonal jet in radians of longitude per step: westerlies everywhere, strongest at +-45 deg
        jet = 0.5 + 0.5 * np.exp(-(((np.abs(lat) - 45.0) / 15.0) ** 2))
        speed = rng.uniform(0.6, 1.2, n_latent)  # per latent field, in units of 10 deg / step
        self._speed = np.deg2rad(10.0) * speed[:, None] * jet[None, :]  # (n_latent, H)

    def _init_static(self, rng, colat, lon_rad) -> None:
        """Static fields: a land-sea mask and orography from smooth random fields, another smooth field for
        any other static name (standardised)."""

        def smooth(k_max):
            f = np.zeros((self.n_lat, self.n_lon))
            for m in range(k_max + 1):
                for n in range(k_max):
                    a = rng.normal() / (1.0 + 0.3 * (m + n))
                    p1, p2 = rng.uniform(0, 2 * np.pi, 2)
                    f += a * np.sin(colat) ** m * np.cos(n * colat + p1) * np.cos(m * lon_rad + p2)
            return f

        land_field = smooth(6)
        lsm = (land_field > np.quantile(land_field, 0.7)).astype(np.float64)
        orography = np.maximum(smooth(6), 0.0) * lsm
        orography /= max(orography.max(), 1e-12)
        static_pool = {"land_sea_mask": lsm, "orography": orography}
        static = []
        for name in self.static_names:
            low = name.lower()
            key = (
                "orography"
                if ("oro" in low or "geopotential" in low)
                else "land_sea_mask"
                if ("land" in low or "lsm" in low)
                else None
            )
            static.append(static_pool[key] if key else smooth(5))  # e.g. soil type: another fixed field
        self._lsm, self._oro = lsm, orography
        self._static = np.stack([_standardise(s) for s in static]) if static else np.zeros((0, self.n_lat, self.n_lon))

    # --------------------------------------------------------------------------------------------
    @property
    def lat(self) -> torch.Tensor:
        """Latitudes of the grid rows in degrees, +90 .. -90 including the poles."""
        return torch.tensor(self._lat_deg, dtype=torch.float32)

    @property
    def lon(self) -> torch.Tensor:
        return torch.tensor(self._lon_deg, dtype=torch.float32)

    def _raw(self, t: int) -> np.ndarray:
        phase = np.exp(-1j * self._m[None, None, :] * self._speed[:, :, None] * t)  # (J, H, M+1)
        latent = np.einsum("jhm,mw->jhw", self._coef * phase, self._eim).real  # (J, H, W)
        x = np.einsum("cj,jhw->chw", self._mix, latent)
        hours = (t * self.step_hours) % 24.0
        local = hours + self._lon_hours  # local solar time, (1, W)
        sun = self._cos_lat * np.cos(2 * np.pi * (local - 14.0) / 24.0) * (0.5 + self._lsm)  # (H, W)
        x = x + self._diurnal[:, None, None] * sun[None] - self._lapse[:, None, None] * self._oro[None]
        return x

    def state(self, times: int | Sequence[int]) -> torch.Tensor:
        """Standardised fields at the given time indices: float32 (B, C, H, W)."""
        times = [times] if isinstance(times, (int, np.integer)) else list(times)
        out = np.empty((len(times), len(self.names), self.n_lat, self.n_lon), dtype=np.float32)
        for b, t in enumerate(times):
            if t < 0:
                raise ValueError(f"time index {t} < 0")
            x = (self._raw(int(t)) - self._mean[:, None, None]) / self._std[:, None, None]
            if self.noise:
                x = x + self.noise * np.random.default_rng([self.seed, int(t)]).standard_normal(x.shape)
            out[b] = x
        return torch.from_numpy(out)

    def static(self, batch: int = 1) -> torch.Tensor | None:
        """Standardised static fields (B, S, H, W), or None when the model has no static channels."""
        if not self.static_names:
            return None
        s = torch.from_numpy(self._static.astype(np.float32))
        return s.unsqueeze(0).expand(batch, -1, -1, -1).contiguous()

    def sample(self, times: Sequence[int], leads: int = 1):
        """(state at t, static, [state at t + 1, ..., t + leads]) for a batch of start times."""
        times = list(times)
        return (
            self.state(times),
            self.static(len(times)),
            [self.state([t + k for t in times]) for k in range(1, leads + 1)],
        )


def _standardise(x: np.ndarray) -> np.ndarray:
    s = x.std()
    return (x - x.mean()) / (s if s > 1e-12 else 1.0)
