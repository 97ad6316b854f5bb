"""The two reference forecasts every model is scored beside, on the same inits, leads and grid:

    persistence   forecast(t, L) = truth(t)
    climatology   forecast(t, L) = clim(day of year and hour of t + L)

and the climatology's period: the training years only (given, or by default the truth times before
the first init), with a flag when it overlaps the evaluated times. The climatology itself is built
by weathermixer.evaluation.metrics.build_climatology.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import xarray as xr

from . import metrics as M
from .metrics import LAT, LON, TIME, EvaluationError
from .plan import Plan, truth_var


@dataclass(frozen=True)
class ClimatologyPeriod:
    """The training period the climatology is built from."""

    start: pd.Timestamp
    end: pd.Timestamp
    default: bool  # True: not given, the truth times before the first init
    overlaps_evaluation: bool  # it reaches into the evaluated inits or valid times


def climatology_period(truth_times: pd.DatetimeIndex, plan: Plan, start=None, end=None) -> ClimatologyPeriod:
    """[start, end]; both None: the truth times before the first init; one None: the truth's first or last time."""
    default = start is None and end is None
    if default:
        before = truth_times[truth_times < plan.inits.min()]
        if not len(before):
            raise EvaluationError(
                f"no truth time before the first init {plan.inits.min()} for the climatology: "
                f"give the training years with --climatology-years START END"
            )
        start, end = before[0], before[-1]
    start = pd.Timestamp(start) if start is not None else truth_times[0]
    end = pd.Timestamp(end) if end is not None else truth_times[-1]
    if end < start:
        raise EvaluationError(f"climatology period ends ({end}) before it starts ({start})")
    overlap = bool(start <= plan.valid_times.max() and end >= plan.inits.min())
    return ClimatologyPeriod(start, end, default, overlap)


def variable_climatology(
    tr: xr.Dataset, plan: Plan, var: str, period: ClimatologyPeriod, window_days: int, fallback: str
) -> M.Climatology:
    """The climatology of one variable at the plan's levels, for the plan's valid times only."""
    clim_truth = truth_var(tr, var, plan.levels[var])
    return M.build_climatology(
        clim_truth, period.start, period.end, window_days, for_times=plan.valid_times, fallback=fallback
    )


def persistence_forecast(truth_at_inits: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """truth(t) at every lead: (init, ...) -> `shape` = (init, lead, ...), a read-only view."""
    return np.broadcast_to(truth_at_inits[:, None], shape)


def climatology_forecast(
    clim: M.Climatology, valid: np.ndarray, lev_dims: tuple[str, ...], shape: tuple[int, ...]
) -> np.ndarray:
    """clim at the valid times `valid` (init, lead) -> `shape` = (init, lead, [level], latitude, longitude)."""
    return clim.at(valid.ravel()).transpose(TIME, *lev_dims, LAT, LON).values.reshape(shape)


# the learned anchor: a per-pixel linear regression ----------------------------------------------------
def _harmonics(times, annual: bool) -> np.ndarray:
    """(n, 2 or 4): sin/cos of the hour of day, and of the day of year when `annual`."""
    t = pd.DatetimeIndex(times)
    h = 2 * np.pi * (t.hour + t.minute / 60) / 24
    cols = [np.sin(h), np.cos(h)]
    if annual:
        d = 2 * np.pi * (t.day_of_year - 1 + t.hour / 24) / 365.25
        cols += [np.sin(d), np.cos(d)]
    return np.stack(cols, axis=1)


def _design(now: np.ndarray, before: np.ndarray, times, annual: bool) -> np.ndarray:
    """(n, p, pixels) features: x(t), x(t - dt), the harmonics of t, 1."""
    n, pix = now.shape[0], now[0].size
    harm = np.broadcast_to(_harmonics(times, annual)[:, :, None], (n, 2 + 2 * annual, pix))
    return np.concatenate([now.reshape(n, 1, pix), before.reshape(n, 1, pix), harm, np.ones((n, 1, pix))], axis=1)


@dataclass
class LinearBaseline:
    """forecast(t, L) = a_L x(t) + b_L x(t - dt) + c_L . harmonics(t) + d_L at every pixel (and level),
    least squares over the training period only (every t with t - dt and t + L inside it)."""

    coef: np.ndarray  # (lead, p, pixels)
    dt: pd.Timedelta
    annual: bool  # day-of-year harmonics (only with >= 1 year of training data: else they act as a trend)
    samples: list[int]

    @property
    def features(self) -> list[str]:
        return (
            ["x(t)", "x(t - dt)", "sin hour", "cos hour"]
            + (["sin day of year", "cos day of year"] if self.annual else [])
            + ["1"]
        )

    def forecast(self, now: np.ndarray, before: np.ndarray, inits, shape: tuple[int, ...]) -> np.ndarray:
        """(init, lead, ...pixel dims) from the truth at the inits and dt before them."""
        X = _design(now, before, inits, self.annual)  # (init, p, pixels)
        return np.einsum("ipk,lpk->ilk", X, self.coef).reshape(shape)


def _solve_normal(A: np.ndarray, B: np.ndarray, rcond: float) -> np.ndarray:
    """x with A x = B for stacks of normal matrices A (..., p, p): the pseudo-inverse's least-squares solution,
    and the minimum-norm one where a feature is constant or collinear (data at one hour of day: sin(hour) = 0,
    cos(hour) = the intercept). The features are scaled to unit root mean square first: raw states (1e5 Pa)
    beside harmonics (1) put the normal matrix's eigenvalues 1e10 apart, and the unscaled pseudo-inverse then
    returns coefficients far from the least-squares fit."""
    d = np.sqrt(np.diagonal(A, axis1=-2, axis2=-1))
    d = np.where(d > 0, d, 1.0)
    scaled = A / d[..., :, None] / d[..., None, :]
    return (np.linalg.pinv(scaled, rcond=rcond, hermitian=True) @ (B / d)[..., None])[..., 0] / d


def fit_linear(
    truth: xr.DataArray,
    period: ClimatologyPeriod,
    dt: pd.Timedelta,
    leads: pd.TimedeltaIndex,
    block: int = 256,
    rcond: float = 1e-12,
) -> LinearBaseline:
    """Fit the per-pixel regressions of `truth` (dims time, then the pixel dims) for every lead, reading
    only truth times inside the training period, in blocks of `block` start times."""
    times = pd.DatetimeIndex(truth[TIME].values)
    inside = (times >= period.start) & (times <= period.end)
    pos = pd.Series(np.arange(len(times)), index=times)[inside]
    starts = [t for t in pos.index if t - dt in pos.index]
    annual = (period.end - period.start) >= pd.Timedelta(days=365)
    p = 5 + 2 * annual
    pix = int(np.prod([truth.sizes[d] for d in truth.dims if d != TIME]))
    A, B = np.zeros((len(leads), pix, p, p)), np.zeros((len(leads), pix, p))
    counts = [0] * len(leads)
    for b0 in range(0, len(starts), block):
        ts = pd.DatetimeIndex(starts[b0 : b0 + block])
        need = ts.union(ts - dt)
        for L in leads:
            need = need.union(ts[(ts + L).isin(pos.index)] + L)
        rows = truth.isel({TIME: pos[need].values}).values.astype(np.float64)
        at = need.get_indexer
        X = _design(rows[at(ts)], rows[at(ts - dt)], ts, annual)
        for i, L in enumerate(leads):
            ok = np.flatnonzero((ts + L).isin(pos.index))
            if not len(ok):
                continue
            Y = rows[at(ts[ok] + L)].reshape(len(ok), pix)
            A[i] += np.einsum("npk,nqk->kpq", X[ok], X[ok])
            B[i] += np.einsum("npk,nk->kp", X[ok], Y)
            counts[i] += len(ok)
    short = [f"{L / pd.Timedelta(hours=1):g} h" for L, n in zip(leads, counts, strict=True) if n < 2 * p]
    if short:
        raise EvaluationError(
            f"linear baseline: the training period {period.start} .. {period.end} holds fewer "
            f"than {2 * p} (t - dt, t, t + lead) triples for lead(s) {', '.join(short)}; give a "
            f"longer period (--clim-start/--clim-end) or --no-linear-baseline"
        )
    coef = _solve_normal(A, B, rcond)
    return LinearBaseline(coef.transpose(0, 2, 1), dt, bool(annual), counts)


# regions ----------------------------------------------------------------------------------------------
REGIONS = {
    "global": (-90.0, 90.0),
    "tropics": (-20.0, 20.0),
    "extratropics": None,
    "northern_hemisphere": (0.0, 90.0),
    "southern_hemisphere": (-90.0, 0.0),
}


def region_rows(lat: np.ndarray) -> dict[str, np.ndarray]:
    """Latitude rows of each region the grid covers (its extent reaches the region's bounds within one
    grid spacing). Extra-tropics = |lat| >= 20 in both hemispheres; hemispheres split at the equator
    (a row on it belongs to neither)."""
    lat = np.asarray(lat, dtype=np.float64)
    tol = float(np.max(np.abs(np.diff(lat)))) if lat.size > 1 else 0.0
    lo, hi = lat.min() - tol, lat.max() + tol
    covers = lambda a, b: lo <= a and hi >= b  # noqa: E731
    out = {}
    for name, bounds in REGIONS.items():
        if name == "extratropics":
            if covers(-90, 90):
                out[name] = np.flatnonzero(np.abs(lat) >= 20)
            continue
        a, b = bounds
        if covers(a, b):
            rows = (
                (lat >= a) & (lat <= b)
                if name in ("global", "tropics")
                else ((lat > 0) if name.startswith("northern") else (lat < 0))
            )
            out[name] = np.flatnonzero(rows)
    return {k: v for k, v in out.items() if v.size}
