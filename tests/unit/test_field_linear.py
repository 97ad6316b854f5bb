"""The field-wide linear forecast: the ridge solution on the whole field's anomalies, and what it sees that the
per-pixel regression cannot (a pattern moving across the grid)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tests.daily_fields import daily_pressure


def _moving_field(days=900, seed=0):
    """Daily fields whose anomaly moves one column east per day (plus noise and an annual cycle): tomorrow's
    value at a point is today's value one column to the west."""

    rng = np.random.default_rng(seed)
    nlon = 6
    line = rng.normal(size=days + nlon) * 800
    a = np.stack([line[nlon - j : nlon - j + days] for j in range(nlon)], axis=1)  # a[t, j] = line[t - j + nlon]
    a = a[:, None, :] * np.array([1.0, 0.8, 0.6])[None, :, None] + 100 * rng.normal(size=(days, 3, nlon))
    return daily_pressure(a, 2.5 * np.arange(nlon))


def test_field_forecast_is_the_ridge_solution_on_the_anomalies(monkeypatch):
    from weathermixer.evaluation import field_linear as FL
    from weathermixer.evaluation import metrics as M

    truth = _moving_field()
    start, end, dt = "2001-01-01", "2002-12-31", pd.Timedelta(days=1)
    leads = pd.to_timedelta([1, 3], unit="D")
    clim = M.build_climatology(truth, start, end, 15)
    system = FL.fit_system(truth, clim, start, end, dt, leads)
    times = pd.DatetimeIndex(truth.time.values)
    inside = times[(times >= start) & (times <= end)]
    anom = FL.anomalies(truth, clim, times)
    pos = pd.Series(np.arange(len(times)), index=times)
    inits = pd.date_range("2003-02-01", "2003-03-01")
    for i, L in enumerate(leads):
        s = inside[(inside - dt).isin(inside) & (inside + L).isin(inside)]
        X = np.concatenate([anom[pos[s]], anom[pos[s - dt]]], axis=1)
        Y = anom[pos[s + L]]
        G = X.T @ X
        ridge = 0.3
        W = np.linalg.solve(G + ridge * np.trace(G) / len(G) * np.eye(len(G)), X.T @ Y)
        np.testing.assert_allclose(system.coef(i, ridge), W, rtol=1e-7, atol=1e-9)
        Xi = np.concatenate([anom[pos[inits]], anom[pos[inits - dt]]], axis=1)
        c = clim.at(inits + L).transpose("time", "latitude", "longitude").values.reshape(len(inits), -1)
        got = FL.forecast(system, truth, clim, inits, [ridge] * len(leads))[:, i]
        np.testing.assert_allclose(got, Xi @ W + c, rtol=1e-9)
        assert system.samples[i] == len(s)
    monkeypatch.setattr(FL, "MAX_FEATURES", 30)  # a 3 x 6 grid: 36 features
    with pytest.raises(M.EvaluationError, match="36 features, more than 30"):
        FL.fit_system(truth, clim, start, end, dt, leads)


def test_field_forecast_sees_a_moving_pattern_the_per_pixel_regression_cannot():
    from weathermixer.evaluation import field_linear as FL
    from weathermixer.evaluation import metrics as M
    from weathermixer.evaluation.baselines import ClimatologyPeriod, fit_linear

    truth = _moving_field()
    start, end, dt = "2001-01-01", "2002-12-31", pd.Timedelta(days=1)
    leads = pd.to_timedelta([1], unit="D")
    clim = M.build_climatology(truth, start, end, 15)
    system = FL.fit_system(truth, clim, start, end, dt, leads)
    inits = pd.date_range("2003-01-02", "2003-06-01")
    w = np.ones(truth[0].size)
    ridges = FL.choose(system, truth, clim, inits, w)
    field = FL.forecast(system, truth, clim, inits, ridges)[:, 0]
    period = ClimatologyPeriod(pd.Timestamp(start), pd.Timestamp(end), False, False)
    lin = fit_linear(truth, period, dt, leads)
    now, before = truth.sel(time=inits).values, truth.sel(time=inits - dt).values
    pixel = lin.forecast(now, before, inits, (len(inits), 1, truth[0].size))[:, 0]
    o = truth.sel(time=inits + leads[0]).values.reshape(len(inits), -1)
    east = truth.longitude.values > 0  # points whose western neighbour is in the grid
    east = np.tile(east, 3)
    mse = lambda x: float(((x - o)[:, east] ** 2).mean())  # noqa: E731 - a local score
    assert mse(field) < 0.2 * mse(pixel), (mse(field), mse(pixel))
    errs = {r: float(((FL.forecast(system, truth, clim, inits, [r])[:, 0] - o) ** 2).sum()) for r in FL.RIDGES}
    assert errs[ridges[0]] == min(errs.values())


def test_blend_with_the_field_forecast_is_never_worse_than_any_of_its_references():
    import xarray as xr

    from weathermixer.evaluation import metrics as M
    from weathermixer.evaluation.damping import DampingError, apply, field_reference, fit, references

    truth = _moving_field()
    tr = truth.to_dataset(name="slp")
    inits = pd.date_range("2003-01-02", "2003-04-30")
    leads = pd.to_timedelta([1, 2], unit="D")
    valid = np.add.outer(inits.values, leads.values)
    o = truth.sel(time=pd.DatetimeIndex(valid.ravel())).values.reshape(len(inits), len(leads), 3, -1)
    rng = np.random.default_rng(3)
    fc = xr.Dataset(
        {"slp": (("time", "prediction_timedelta", "latitude", "longitude"), o + 600 * rng.normal(size=o.shape))},
        coords={"time": inits, "prediction_timedelta": leads, "latitude": truth.latitude, "longitude": truth.longitude},
    )
    res = fit(fc, tr, "2001-01-01", "2002-12-31", field_linear=True)
    assert all(len(k) == 3 for k in res["weights"]["slp"].values())
    blend = apply(fc, tr, res)["slp"].values
    f, c, g, truth_sel, _ = references(fc, tr, "slp", "2001-01-01", "2002-12-31", None)
    r, ridges = field_reference(fc, truth_sel, "2001-01-01", "2002-12-31", None, None)
    assert ridges == list(res["field_linear_ridge"]["slp"].values())
    w = M.latitude_weights(truth.latitude.values)[:, None]
    mse = {k: (w * (x - o) ** 2).mean(axis=(0, 2, 3)) for k, x in (("f", f), ("c", c), ("g", g), ("r", r))}
    mse_blend = (w * (blend - o) ** 2).mean(axis=(0, 2, 3))
    for k, m in mse.items():
        assert (mse_blend <= m * (1 + 1e-6)).all(), (k, mse_blend, m)
    assert (mse_blend < 0.9 * mse["g"]).all()  # the moving pattern: the field forecast carries the blend
    two = fit(fc, tr, "2001-01-01", "2002-12-31")
    assert (mse_blend < (w * (apply(fc, tr, two)["slp"].values - o) ** 2).mean(axis=(0, 2, 3))).all()
    res.pop("field_linear_ridge")
    with pytest.raises(DampingError, match="3 weights per lead"):
        apply(fc, tr, res)
