"""Skill on a regional daily record: the linear baseline on large raw values, the recipe's plumbing."""
from __future__ import annotations

import numpy as np
import pandas as pd


def _daily_pressure(days=800, seed=0):
    """Pressure-like daily fields: 101000 Pa + an AR(2) anomaly of ~1000 Pa + an annual cycle."""
    import xarray as xr

    rng = np.random.default_rng(seed)
    times = pd.date_range("2001-01-01", periods=days, freq="D")
    a = np.zeros((days, 3, 4))
    for i in range(2, days):
        a[i] = 1.2 * a[i - 1] - 0.4 * a[i - 2] + 400 * rng.normal(size=(3, 4))
    season = 500 * np.cos(2 * np.pi * np.arange(days) / 365.25)[:, None, None]
    return xr.DataArray(101000 + a + season, dims=("time", "latitude", "longitude"),
                        coords={"time": times, "latitude": [40.0, 42.5, 45.0], "longitude": [0.0, 2.5, 5, 7.5]})


def test_linear_baseline_is_the_least_squares_fit_on_raw_pressure_values():
    """States of 1e5 Pa beside harmonics of 1: the fit must still be the least-squares one (lstsq)."""
    from weathermixer.evaluation.baselines import ClimatologyPeriod, fit_linear

    truth = _daily_pressure()
    period = ClimatologyPeriod(pd.Timestamp("2001-01-01"), pd.Timestamp("2002-06-30"), False, False)
    dt, lead = pd.Timedelta("24h"), pd.Timedelta("72h")
    lin = fit_linear(truth, period, dt, pd.TimedeltaIndex([lead]))
    assert lin.annual
    t = pd.DatetimeIndex(truth.time.values)
    starts = [i for i in range(1, len(t)) if t[i] + lead <= period.end]
    x = truth.values
    d = 2 * np.pi * (t.day_of_year - 1) / 365.25
    for (r, c) in [(0, 0), (2, 3)]:
        X = np.stack([x[starts, r, c], x[[i - 1 for i in starts], r, c], np.sin(d[starts]), np.cos(d[starts]),
                      np.ones(len(starts))], 1)
        y = x[[i + 3 for i in starts], r, c]
        ref = np.linalg.lstsq(X, y, rcond=None)[0]
        k = lin.coef[0, :, r * 4 + c]  # at 00 UTC only, cos(hour) = 1 shares the intercept
        got = np.array([k[0], k[1], k[4], k[5], k[3] + k[6]])
        np.testing.assert_allclose(X @ got, X @ ref, rtol=0, atol=1e-3)  # Pa: the same fitted values
