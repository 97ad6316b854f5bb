"""The blend's shrinkage towards the per-pixel regression (`damping fit --shrink`): its cross-validated choice is
the 2-fold score written out, and it falls back to the regression where the forecast adds nothing."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tests.daily_fields import daily_pressure


def _daily_pressure(days=1300, seed=0, coherent=False):
    """Daily fields: 101000 Pa + an AR(2) anomaly of ~1000 Pa + an annual cycle, 3 x 4 points; `coherent`: one
    anomaly over the whole grid plus 150 Pa of local noise (few independent cases per month)."""

    rng = np.random.default_rng(seed)
    a = np.zeros((days, 1, 1) if coherent else (days, 3, 4))
    for i in range(2, days):
        a[i] = 1.2 * a[i - 1] - 0.4 * a[i - 2] + 400 * rng.normal(size=a.shape[1:])
    if coherent:
        a = a + 150 * rng.normal(size=(days, 3, 4))
    return daily_pressure(a, [0.0, 2.5, 5, 7.5])


def _store(truth, inits, leads, values):
    import xarray as xr

    return xr.Dataset(
        {"slp": (("time", "prediction_timedelta", "latitude", "longitude"), values)},
        coords={"time": inits, "prediction_timedelta": leads, "latitude": truth.latitude, "longitude": truth.longitude},
    )


def _at_valid(truth, inits, leads):
    valid = pd.DatetimeIndex(np.add.outer(inits.values, leads.values).ravel())
    return truth.sel(time=valid).values.reshape(len(inits), len(leads), 3, 4)


def _wsum(x, lat):
    from weathermixer.evaluation import metrics as M

    return (M.latitude_weights(lat)[:, None] * x**2).sum(axis=(0, 2, 3))


def test_month_folds_alternate_the_months_present():
    from weathermixer.evaluation.damping import month_folds

    whole = pd.date_range("2008-01-01", "2008-12-31")
    np.testing.assert_array_equal(month_folds(whole), (whole.month.values - 1) % 2)
    odd = whole[whole.month % 2 == 1]  # Jan, Mar, May, ...: still two folds
    np.testing.assert_array_equal(month_folds(odd), ((odd.month.values - 1) // 2) % 2)


def test_shrink_choice_is_the_two_fold_score_written_out():
    from weathermixer.evaluation.damping import DampingError, apply, fit, month_folds

    truth = _daily_pressure()
    tr = truth.to_dataset(name="slp")
    inits, leads = pd.date_range("2003-01-01", "2003-06-30"), pd.to_timedelta([1, 3], unit="D")
    o = _at_valid(truth, inits, leads)
    rng = np.random.default_rng(2)
    fc = _store(truth, inits, leads, o + 500 * rng.normal(size=o.shape))
    res = fit(fc, tr, "2001-01-01", "2002-12-31", shrink=[0, 1, float("inf")])
    assert res["weights"]["slp"] == fit(fc, tr, "2001-01-01", "2002-12-31", shrink=[0])["weights"]["slp"]
    assert res["weights"]["slp"] != fit(fc, tr, "2001-01-01", "2002-12-31", shrink=[1])["weights"]["slp"]
    folds = month_folds(inits)
    for cand in (0.0, float("inf")):
        err = np.zeros(len(leads))
        for k in (0, 1):
            train, test = np.flatnonzero(folds != k), np.flatnonzero(folds == k)
            part = fit(fc.isel(time=train), tr, "2001-01-01", "2002-12-31", shrink=None)
            if np.isinf(cand):  # the regression alone
                part["weights"]["slp"] = {k2: [0.0, 0.0] for k2 in part["weights"]["slp"]}
            err += _wsum(apply(fc.isel(time=test), tr, part)["slp"].values - o[test], truth.latitude.values)
        regression = fit(fc, tr, "2001-01-01", "2002-12-31", shrink=[float("inf")])
        assert all(x == [0.0, 0.0] for x in regression["weights"]["slp"].values())
        g = apply(fc, tr, regression)["slp"].values
        ratio = err / _wsum(g - o, truth.latitude.values)
        written = [res["shrink"]["slp"][key]["cv_mse_over_regression"][f"{cand:g}"] for key in ("24", "72")]
        np.testing.assert_allclose(written, ratio, rtol=1e-5)
    with pytest.raises(DampingError, match="calendar months"):
        fit(fc.isel(time=slice(0, 31)), tr, "2001-01-01", "2002-12-31", shrink=[0, 1])


def _overfit_case(seed):
    """Lead 1 day: a good forecast. Lead 3 days: the regression plus a slow, grid-wide error that least squares
    on four months of a grid-wide anomaly can mistake for skill. Returns the out-of-sample weighted squared
    errors (on the next 14 months) of the plain and the shrunk blend and of the regression, and the choice."""
    from weathermixer.evaluation.damping import apply, fit, references

    truth = _daily_pressure(seed=seed, coherent=True)
    tr = truth.to_dataset(name="slp")
    leads = pd.to_timedelta([1, 3], unit="D")
    rng = np.random.default_rng(100 + seed)
    inits = pd.date_range("2003-01-01", "2004-06-30")
    o = _at_valid(truth, inits, leads)
    g = references(_store(truth, inits, leads, o), tr, "slp", "2001-01-01", "2002-12-31", None)[2]
    slow = np.zeros(len(inits))
    for i in range(1, len(inits)):
        slow[i] = 0.97 * slow[i - 1] + 150 * rng.normal()
    values = o.copy()
    values[:, 0] += 200 * rng.normal(size=values[:, 0].shape)
    values[:, 1] = g[:, 1] + slow[:, None, None]
    fc = _store(truth, inits, leads, values)
    first, later = np.flatnonzero(inits < "2003-05-01"), np.flatnonzero(inits >= "2003-05-01")
    plain = fit(fc.isel(time=first), tr, "2001-01-01", "2002-12-31")
    shrunk = fit(fc.isel(time=first), tr, "2001-01-01", "2002-12-31", shrink=[0, 0.1, 1, 10, float("inf")])
    lat = truth.latitude.values
    mse = {
        name: _wsum(apply(fc.isel(time=later), tr, res)["slp"].values - o[later], lat)
        for name, res in (("plain", plain), ("shrunk", shrunk))
    }
    mse["regression"] = _wsum(g[later] - o[later], lat)
    return mse, {k: float(v["shrink"]) for k, v in shrunk["shrink"]["slp"].items()}


def test_shrink_falls_back_to_the_regression_where_the_forecast_adds_nothing():
    cases = [_overfit_case(seed) for seed in range(8)]
    total = {k: sum(m[k] for m, _ in cases) for k in ("plain", "shrunk", "regression")}
    chosen = [c for _, c in cases]
    assert all(c["24"] == 0 for c in chosen), chosen  # the good lead keeps its least-squares weights
    assert sum(c["72"] > 0 for c in chosen) >= 4, chosen  # the useless lead is shrunk in most cases
    assert total["shrunk"][1] < 0.99 * total["plain"][1], total  # and scores better on the later months
    assert total["shrunk"][1] <= 1.01 * total["regression"][1], total
    assert total["shrunk"][0] < 0.5 * total["regression"][0], total
