"""Per-channel normalisation statistics, streamed over the time axis (one time step in memory)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from .reader import GriddedDataset, check_finite


class _Moments:
    """Chan et al.'s parallel update of mean and M2 per channel over (C, H, W) batches."""

    def __init__(self, c: int):
        self.n, self.mean, self.m2 = 0, np.zeros(c), np.zeros(c)

    def add(self, x: np.ndarray):
        x = x.reshape(x.shape[0], -1).astype(np.float64)
        nb = x.shape[1]
        mb = x.mean(1)
        m2b = ((x - mb[:, None]) ** 2).sum(1)
        n = self.n + nb
        delta = mb - self.mean
        self.mean = self.mean + delta * nb / n
        self.m2 = self.m2 + m2b + delta ** 2 * self.n * nb / n
        self.n = n

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.m2 / max(self.n, 1))


def compute_stats(data: GriddedDataset, start: str | None = None, end: str | None = None,
                  log=None) -> dict:
    """Mean and std of every model channel (per variable and level) over times [start, end], std of
    the dt-differences x(t+dt) - x(t) with both times inside the period, and mean/std of the static
    fields read from the store."""
    times = data.times
    lo = pd.Timestamp(start) if start else times[0]
    hi = pd.Timestamp(end) if end else times[-1]
    idx = np.flatnonzero((times >= lo) & (times <= hi))
    if len(idx) < data.k + 1:
        raise ValueError(f"{data.where}: period {lo} .. {hi} holds {len(idx)} time step(s); need at least "
                         f"{data.k + 1} for dt={data.cfg.dt_hours:g} h differences")
    names = [c.name for c in data.channels]
    full = slice(0, data.grid[0])
    mom, dmom = _Moments(len(names)), _Moments(len(names))
    ring: dict[int, np.ndarray] = {}
    for j, t in enumerate(idx):
        x = data.read_fields(int(t), full, slice(None))
        check_finite(x, names, times[t], data.lat, data.lon, data.where)
        mom.add(x)
        if t - data.k in ring:
            dmom.add(x - ring.pop(t - data.k))
        ring[int(t)] = x
        ring = {s: v for s, v in ring.items() if s > t - data.k}
        if log and (j % 50 == 0 or j == len(idx) - 1):
            log(f"stats: {j + 1}/{len(idx)} time steps")
    chan = {}
    for i, c in enumerate(data.channels):
        chan[c.name] = {"variable": c.var, "level": c.level, "mean": float(mom.mean[i]),
                        "std": float(mom.std[i]), "diff_std": float(dmom.std[i])}
    static = {}
    if data.static:
        s = data.read_static([c.name for c in data.static], full)
        for i, c in enumerate(data.static):
            static[c.name] = {"variable": c.var, "mean": float(s[i].astype(np.float64).mean()),
                              "std": float(s[i].astype(np.float64).std())}
    return {"source": data.where, "start": str(times[idx[0]]), "end": str(times[idx[-1]]),
            "time_steps": int(len(idx)), "dt_hours": data.cfg.dt_hours, "channels": chan, "static": static}


class Normalizer:
    """(x - mean) / std per channel from a stats file; std of 0 is treated as 1."""

    def __init__(self, stats: dict, source: str = "stats"):
        self.stats, self.source = stats, source

    @classmethod
    def load(cls, path: str | Path) -> "Normalizer":
        try:
            return cls(json.loads(Path(path).read_text()), str(path))
        except FileNotFoundError:
            raise ValueError(f"stats file not found: {path} (data.stats); create it with "
                             f"`python -m weathermixer.data stats`") from None

    def _arrays(self, section: str, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        table = self.stats.get(section, {})
        missing = [n for n in names if n not in table]
        if missing:
            raise ValueError(f"{self.source}: no {section} statistics for {missing}; recompute the stats "
                             f"for the model's channels")
        mean = np.array([table[n]["mean"] for n in names], dtype=np.float32)
        std = np.array([table[n]["std"] for n in names], dtype=np.float32)
        std[std < 1e-12] = 1.0
        return mean, std

    def fields(self, names: list[str]):
        return self._arrays("channels", names)

    def static(self, names: list[str]):
        return self._arrays("static", names)
