"""A field-wide linear forecast: per lead, a ridge regression of the anomaly of the whole field at the valid
time on the anomalies of the whole field at the init time t and at t - dt.

    anomaly(t + L) = W_L [a(t), a(t - dt)],   a(s) = x(s) - clim(s)

with clim evaluate's climatology of the training period, W_L fitted on the training period only (every t with
t - dt and t + L inside it). Where the per-pixel regression sees one point's own past, this one sees the
pattern: a low west of a point is the point's pressure fall tomorrow. On a grid of P points it holds
L x 2P x P coefficients, so it suits regional grids (a 17 x 33 grid: 561 points, 629,442 per lead).

The ridge is relative to the features' mean variance: (X'X + r tr(X'X) / n I) W = X'Y, n the number of
features, so r is scale-free; `choose` picks it per lead on validation inits by latitude-weighted MSE.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import xarray as xr

from . import metrics as M
from .metrics import TIME, EvaluationError

RIDGES = (1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0)
MAX_FEATURES = 4096  # 2P: one (2P x 2P) eigenbasis per lead is held in float64 (4096: 134 MB a lead)


@dataclass
class FieldSystem:
    """The normal equations of the anomaly regression on the training period, in the eigenbasis of X'X."""

    evals: np.ndarray  # (lead, n)
    evecs: np.ndarray  # (lead, n, n)
    xty: np.ndarray  # (lead, n, pixels) X'Y per lead
    dt: pd.Timedelta
    leads: pd.TimedeltaIndex
    samples: list[int]

    def coef(self, i: int, ridge: float) -> np.ndarray:
        """(n, pixels): W of lead index i for the relative ridge `ridge`."""
        evals, evecs = self.evals[i], self.evecs[i]
        lam = ridge * evals.sum() / len(evals)
        return evecs @ ((evecs.T @ self.xty[i]) / (evals + lam)[:, None])


def anomalies(truth: xr.DataArray, clim: M.Climatology, times: pd.DatetimeIndex) -> np.ndarray:
    """(len(times), pixels) float64: truth minus the climatology at `times`."""
    x = truth.sel({TIME: times}).values.astype(np.float64)
    c = clim.at(times).transpose(TIME, *truth.dims[1:]).values.astype(np.float64)
    return (x - c).reshape(len(times), -1)


def fit_system(
    truth: xr.DataArray, clim: M.Climatology, start, end, dt: pd.Timedelta, leads: pd.TimedeltaIndex
) -> FieldSystem:
    """X'X and X'Y of the anomaly regression over the truth times in [start, end] (dims time, then pixels)."""
    pixels = int(np.prod(truth.shape[1:]))
    if 2 * pixels > MAX_FEATURES:
        raise EvaluationError(
            f"field-wide regression: {pixels} grid points give {2 * pixels} features, more than {MAX_FEATURES}; "
            f"it is meant for regional grids: blend without it (no --field-linear)"
        )
    times = pd.DatetimeIndex(truth[TIME].values)
    inside = times[(times >= pd.Timestamp(start)) & (times <= pd.Timestamp(end))]
    starts = inside[(inside - dt).isin(inside)]
    a = pd.DataFrame(anomalies(truth, clim, inside), index=inside)
    X = np.concatenate([a.loc[starts].values, a.loc[starts - dt].values], axis=1)
    evals, evecs, xty, samples = [], [], [], []
    for L in leads:
        ok = (starts + L).isin(inside)
        if ok.sum() < 2:
            raise EvaluationError(
                f"field-wide regression: the training period {start} .. {end} holds no (t - dt, t, t + "
                f"{L / pd.Timedelta(hours=1):g} h) triples: give a longer period"
            )
        w, v = np.linalg.eigh(X[ok].T @ X[ok])
        evals.append(np.clip(w, 0, None))
        evecs.append(v)
        xty.append(X[ok].T @ a.loc[starts[ok] + L].values)
        samples.append(int(ok.sum()))
    return FieldSystem(np.stack(evals), np.stack(evecs), np.stack(xty), dt, leads, samples)


def forecast(
    system: FieldSystem, truth: xr.DataArray, clim: M.Climatology, inits: pd.DatetimeIndex, ridges: list[float]
) -> np.ndarray:
    """(init, lead, pixels) full-field forecasts (anomaly forecast plus the climatology at the valid time)."""
    X = np.concatenate([anomalies(truth, clim, inits), anomalies(truth, clim, inits - system.dt)], axis=1)  # (init, n)
    out = np.empty((len(inits), len(system.leads), X.shape[1] // 2))
    for i, (L, r) in enumerate(zip(system.leads, ridges, strict=True)):
        valid = inits + L
        c = clim.at(valid).transpose(TIME, *truth.dims[1:]).values.astype(np.float64).reshape(len(inits), -1)
        out[:, i] = X @ system.coef(i, r) + c
    return out


def choose(
    system: FieldSystem,
    truth: xr.DataArray,
    clim: M.Climatology,
    inits: pd.DatetimeIndex,
    weights: np.ndarray,
    candidates=RIDGES,
) -> list[float]:
    """Per lead, the candidate ridge with the lowest `weights`-weighted MSE (weights per pixel) at `inits`."""
    X = np.concatenate([anomalies(truth, clim, inits), anomalies(truth, clim, inits - system.dt)], axis=1)
    best = []
    for i, L in enumerate(system.leads):
        y = anomalies(truth, clim, inits + L)
        errs = [float((((X @ system.coef(i, r)) - y) ** 2 * weights).sum()) for r in candidates]
        best.append(float(candidates[int(np.argmin(errs))]))
    return best
