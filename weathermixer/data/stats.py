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
        self.m2 = self.m2 + m2b + delta**2 * self.n * nb / n
        self.n = n

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.m2 / max(self.n, 1))


def daily_cycle_basis(times) -> np.ndarray:
    """(len(times), 5): 1, cos(w h), sin(w h), cos(2 w h), sin(2 w h) with h the UTC hour of day."""
    t = pd.DatetimeIndex(times)
    om = 2 * np.pi * (t.hour.values + t.minute.values / 60) / 24
    return np.stack([np.ones_like(om), np.cos(om), np.sin(om), np.cos(2 * om), np.sin(2 * om)], axis=1)


class _DailyCycle:
    """Per-pixel least-squares fit of the mean daily cycle (DAILY_CYCLE_TERMS) of some channels,
    streamed: the normal equations (the 5 x 5 Gram matrix is the same for every pixel) are summed one
    time step at a time. Terms the period's hours cannot resolve (e.g. 6-hourly data: sin(2 w h) = 0)
    get the minimum-norm solution (0)."""

    def __init__(self, channels: list[int], shape: tuple[int, int]):
        self.channels = channels
        self.gram = np.zeros((5, 5))
        self.rhs = np.zeros((5, len(channels), *shape))

    def add(self, x: np.ndarray, time) -> None:
        f = daily_cycle_basis([time])[0]
        self.gram += np.outer(f, f)
        self.rhs += f[:, None, None, None] * x[self.channels].astype(np.float64)[None]

    def solve(self) -> np.ndarray:
        """(5, channels, H, W) coefficients."""
        return np.tensordot(np.linalg.pinv(self.gram, rcond=1e-10), self.rhs, axes=1)


def compute_stats(
    data: GriddedDataset,
    start: str | None = None,
    end: str | None = None,
    log=None,
    daily_cycle: list[str] | None = None,
) -> dict:
    """Mean and std of every model channel (per variable and level) over times [start, end], std of
    the dt-differences x(t+dt) - x(t) with both times inside the period, and mean/std of the static
    fields read from the store. For the channels in `daily_cycle` (default: those the model's
    daily_cycle_* static inputs name, data.daily_cycle) also the per-pixel mean daily cycle over the
    same period (section "daily_cycle": coefficients of DAILY_CYCLE_TERMS, physical units, rows north
    to south): compute the stats over the training period only, since these become model inputs."""
    times = data.times
    lo = pd.Timestamp(start) if start else times[0]
    hi = pd.Timestamp(end) if end else times[-1]
    idx = np.flatnonzero((times >= lo) & (times <= hi))
    if len(idx) < data.k + 1:
        raise ValueError(
            f"{data.where}: period {lo} .. {hi} holds {len(idx)} time step(s); need at least "
            f"{data.k + 1} for dt={data.cfg.dt_hours:g} h differences"
        )
    names = [c.name for c in data.channels]
    cycle_names = list(getattr(data, "daily_cycle", []) if daily_cycle is None else daily_cycle)
    unknown = [n for n in cycle_names if n not in names]
    if unknown:
        raise ValueError(f"daily cycle asked for {unknown}, not channels of the model ({names})")
    cycle = _DailyCycle([names.index(n) for n in cycle_names], data.grid) if cycle_names else None
    mom, dmom = _stream_moments(data, idx, cycle, log)
    out = {
        "source": data.where,
        "start": str(times[idx[0]]),
        "end": str(times[idx[-1]]),
        "time_steps": int(len(idx)),
        "dt_hours": data.cfg.dt_hours,
        "channels": {
            c.name: {
                "variable": c.var,
                "level": c.level,
                "mean": float(mom.mean[i]),
                "std": float(mom.std[i]),
                "diff_std": float(dmom.std[i]),
            }
            for i, c in enumerate(data.channels)
        },
        "static": _static_stats(data),
    }
    if cycle is not None:
        out["daily_cycle"] = _daily_cycle_section(cycle, cycle_names, times[idx], out, data.grid)
    return out


def _stream_moments(data: GriddedDataset, idx: np.ndarray, cycle, log) -> tuple[_Moments, _Moments]:
    """(moments of the states, moments of their dt-differences) over the time indices `idx`, read one
    state at a time; each state is also added to the daily cycle fit (if any)."""
    names, times, full = [c.name for c in data.channels], data.times, slice(0, data.grid[0])
    mom, dmom = _Moments(len(names)), _Moments(len(names))
    ring: dict[int, np.ndarray] = {}
    for j, t in enumerate(idx):
        x = data.read_fields(int(t), full, slice(None))
        check_finite(x, names, times[t], data.lat, data.lon, data.where)
        mom.add(x)
        if cycle is not None:
            cycle.add(x, times[t])
        if t - data.k in ring:
            dmom.add(x - ring.pop(t - data.k))
        ring[int(t)] = x
        ring = {s: v for s, v in ring.items() if s > t - data.k}
        if log and (j % 50 == 0 or j == len(idx) - 1):
            log(f"stats: {j + 1}/{len(idx)} time steps")
    return mom, dmom


def _static_stats(data: GriddedDataset) -> dict:
    """Mean and std of each static field read from the store."""
    if not data.static:
        return {}
    s = data.read_static([c.name for c in data.static], slice(0, data.grid[0]))
    return {
        c.name: {
            "variable": c.var,
            "mean": float(s[i].astype(np.float64).mean()),
            "std": float(s[i].astype(np.float64).std()),
        }
        for i, c in enumerate(data.static)
    }


def _daily_cycle_section(cycle, cycle_names: list[str], period: pd.DatetimeIndex, out: dict, grid) -> dict:
    """The stats file's "daily_cycle" section: the fitted coefficients per channel and how they were fitted."""
    from ..config import DAILY_CYCLE_TERMS

    coef = cycle.solve()
    hours = sorted({round(h, 4) for h in (period.hour + period.minute / 60)})
    return {
        "start": out["start"],
        "end": out["end"],
        "grid": list(grid),
        "hours_seen": hours,
        "basis": "mean + cos1 cos(w h) + sin1 sin(w h) + cos2 cos(2 w h) + sin2 sin(2 w h), h = UTC hour, "
        "w = 2 pi / 24 h; per pixel, least squares over the period; rows north to south",
        "channels": {
            n: {term: np.round(coef[j, i], 5).tolist() for j, term in enumerate(DAILY_CYCLE_TERMS)}
            for i, n in enumerate(cycle_names)
        },
    }


class Normalizer:
    """(x - mean) / std per channel from a stats file; std of 0 is treated as 1."""

    def __init__(self, stats: dict, source: str = "stats"):
        self.stats, self.source = stats, source

    @classmethod
    def load(cls, path: str | Path) -> Normalizer:
        try:
            return cls(json.loads(Path(path).read_text()), str(path))
        except FileNotFoundError:
            raise ValueError(
                f"stats file not found: {path} (data.stats); create it with `python -m weathermixer.data stats`"
            ) from None

    def _arrays(self, section: str, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        table = self.stats.get(section, {})
        missing = [n for n in names if n not in table]
        if missing:
            raise ValueError(
                f"{self.source}: no {section} statistics for {missing}; recompute the stats for the model's channels"
            )
        mean = np.array([table[n]["mean"] for n in names], dtype=np.float32)
        std = np.array([table[n]["std"] for n in names], dtype=np.float32)
        std[std < 1e-12] = 1.0
        return mean, std

    def fields(self, names: list[str]):
        return self._arrays("channels", names)

    def daily_cycle(self, channel: str, term: str, grid: tuple[int, int]) -> tuple[np.ndarray, dict]:
        """(H, W) coefficient `term` of `channel`'s per-pixel mean daily cycle (physical units) and the
        section's metadata (period)."""
        section = self.stats.get("daily_cycle") or {}
        table = (section.get("channels") or {}).get(channel)
        if table is None:
            raise ValueError(
                f"{self.source}: no per-pixel daily cycle of '{channel}' (a daily_cycle_*_{channel} "
                f"static input needs it); recompute the stats with `python -m weathermixer.data stats` "
                f"over the training period for this job (its static inputs name the channel)"
            )
        arr = np.asarray(table[term], dtype=np.float32)
        if arr.shape != tuple(grid):
            raise ValueError(
                f"{self.source}: daily cycle of '{channel}' is on a {arr.shape} grid, the model's is {tuple(grid)}"
            )
        return arr, section

    def static(self, names: list[str]):
        return self._arrays("static", names)
