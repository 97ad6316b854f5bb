"""Metric functions of weathermixer.evaluation.metrics against hand-worked cases and independent computations
(xarray's .weighted, explicit loops, pandas groupby), never against their own outputs."""

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from weathermixer.evaluation import metrics as M
from weathermixer.evaluation.metrics import EvaluationError

LAT3 = np.array([-60.0, 0.0, 60.0])  # cos = 0.5, 1, 0.5; mean 2/3 -> w = 0.75, 1.5, 0.75


def field(values, lat=LAT3, times=None):
    values = np.asarray(values, dtype=float)
    lon = np.arange(values.shape[-1]) * 360.0 / values.shape[-1]
    if times is None:
        return xr.DataArray(values, dims=("latitude", "longitude"), coords={"latitude": lat, "longitude": lon})
    return xr.DataArray(
        values, dims=("time", "latitude", "longitude"), coords={"time": times, "latitude": lat, "longitude": lon}
    )


def random_pair(seed=0, nt=5, lat=None, nlon=16):
    lat = np.linspace(-87.5, 87.5, 8) if lat is None else lat
    rng = np.random.default_rng(seed)
    times = pd.date_range("2020-01-01", periods=nt, freq="6h")
    f = field(rng.normal(size=(nt, lat.size, nlon)), lat, times)
    o = field(rng.normal(size=(nt, lat.size, nlon)), lat, times)
    return f, o


def test_latitude_weights_on_real_latitudes():
    np.testing.assert_allclose(M.latitude_weights(LAT3, "cos"), [0.75, 1.5, 0.75])
    # cell areas (the default): bounds -90, -30, 30, 90 -> sin differences 0.5, 1, 0.5; mean 2/3
    np.testing.assert_allclose(M.latitude_weights(LAT3), [0.75, 1.5, 0.75], rtol=1e-12)
    lat = np.linspace(-90, 90, 32)  # a grid with poles: cos weights vanish there, mean stays 1
    area = M.latitude_weights(lat)
    half = np.deg2rad(90.0 / 31)  # a pole row's cell: from the pole to halfway to the next row
    assert area[0] == area[-1] == pytest.approx((1 - np.cos(half)) * 32 / 2, rel=1e-12) and area[0] > 0.01
    assert area.mean() == pytest.approx(1.0)
    w = M.latitude_weights(lat, "cos")
    assert w[0] == 0.0 and w[-1] == 0.0
    c = np.cos(lat * np.pi / 180.0)
    np.testing.assert_allclose(w, np.clip(c, 0, None) * lat.size / np.clip(c, 0, None).sum(), atol=1e-15)
    assert w.mean() == pytest.approx(1.0)
    for bad in ([], [91.0], [[0.0, 1.0]], [90.0, -90.0]):
        with pytest.raises(ValueError):
            M.latitude_weights(bad, "cos")


def test_zero_error_and_constant_bias():
    _, o = random_pair(1)
    for form in M.RMSE_FORMS:
        assert float(M.rmse(o, o, form=form)) == 0.0
    assert float(M.bias(o, o)) == 0.0
    for b in (2.5, -0.75):
        for form in M.RMSE_FORMS:
            assert float(M.rmse(o + b, o, form=form)) == pytest.approx(abs(b), rel=1e-12)
        assert float(M.bias(o + b, o)) == pytest.approx(b, rel=1e-12)


def test_hand_worked_3x4_grid():
    # w = 0.75, 1.5, 0.75 on rows -60, 0, 60 (cos 0.5, 1, 0.5 over their mean 2/3).
    e = np.array([[2.0, 0, 0, 0], [1.0, 1, 1, 1], [0.0, 0, 0, 0]])
    truth = field(np.full((3, 4), 10.0))
    fc = truth + e
    # squared error weighted: row -60: 0.75 * 4 = 3; row 0: 1.5 * (1+1+1+1) = 6; row 60: 0 -> 9 / 12 cells
    assert float(M.mse(fc, truth)) == pytest.approx(0.75)
    assert float(M.rmse(fc, truth)) == pytest.approx(np.sqrt(0.75))  # unweighted would be sqrt(8/12)
    # error weighted: 0.75 * 2 + 1.5 * 4 = 7.5 -> 7.5 / 12 = 0.625 (unweighted 0.5)
    assert float(M.bias(fc, truth)) == pytest.approx(0.625)
    # the latitudes in the other order give the same numbers
    flipped = lambda a: field(a.values[::-1], LAT3[::-1])  # noqa: E731
    assert float(M.rmse(flipped(fc), flipped(truth))) == pytest.approx(np.sqrt(0.75))
    # with poles on the grid, cos: w = 0, 3, 0 -> only the equator row counts: 3 * 4 / 12 = 1
    poles = np.array([-90.0, 0.0, 90.0])
    assert float(M.mse(field(fc.values, poles), field(truth.values, poles), weighting="cos")) == pytest.approx(1.0)
    # cell areas: bounds -90, -45, 45, 90 -> 1 - sin 45, 2 sin 45, 1 - sin 45 over their mean 2/3: the pole row counts
    wp, we = 1.5 * (1 - np.sqrt(0.5)), 1.5 * np.sqrt(2)
    assert float(M.mse(field(fc.values, poles), field(truth.values, poles))) == pytest.approx((4 * wp + 4 * we) / 12)
    # ACC: f' = 1 at (-60, 0); o' = 1 at (-60, 0) and (0, 90 deg lon)
    # sum w f'o' = 0.75; sum w f'^2 = 0.75; sum w o'^2 = 0.75 + 1.5 = 2.25 -> 0.75 / sqrt(1.6875) = 1/sqrt(3)
    fa = field([[1.0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    oa = field([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]])
    assert float(M.acc(fa, oa)) == pytest.approx(1 / np.sqrt(3))  # unweighted: 1/sqrt(2)


def test_acc_perfect_anti_and_undefined():
    f, o = random_pair(2)
    assert float(M.acc(2.0 * o, o)) == pytest.approx(1.0)
    assert float(M.acc(-0.5 * o, o)) == pytest.approx(-1.0)
    with np.errstate(invalid="ignore"):
        assert np.isnan(float(M.acc(0.0 * o, o)))  # zero forecast anomaly (the climatology forecast)
    assert -1.0 < float(M.acc(f, o)) < 1.0


def test_wb1_and_wb2_forms_on_two_times():
    times = pd.date_range("2020-01-01", periods=2, freq="12h")
    truth = field(np.zeros((2, 3, 4)), times=times)
    fc = truth + np.array([1.0, 3.0])[:, None, None]  # MSE_t = 1, 9
    assert float(M.rmse(fc, truth, form="wb2")) == pytest.approx(np.sqrt(5.0))  # sqrt((1 + 9) / 2)
    assert float(M.rmse(fc, truth, form="wb1")) == pytest.approx(2.0)  # (1 + 3) / 2
    f, o = random_pair(3)
    assert float(M.rmse(f, o, form="wb1")) < float(M.rmse(f, o, form="wb2"))
    with pytest.raises(ValueError, match="wb3"):
        M.rmse(f, o, form="wb3")


def test_against_xarray_weighted_and_loops():
    f, o = random_pair(4, nt=6)
    # WeatherBench 2's get_lat_weights: cell bounds -90, the midpoints, 90; weight sin(upper) - sin(lower)
    lat = np.deg2rad(f.latitude.values)
    bounds = np.concatenate([[-np.pi / 2], (lat[:-1] + lat[1:]) / 2, [np.pi / 2]])
    area = np.sin(bounds[1:]) - np.sin(bounds[:-1])
    areaw = xr.DataArray(area, dims="latitude")
    mse_t = ((f - o) ** 2).weighted(areaw).mean(("latitude", "longitude"))
    np.testing.assert_allclose(M.mse(f, o).values, mse_t.values, rtol=1e-12)
    assert float(M.rmse(f, o)) == pytest.approx(float(np.sqrt(mse_t.mean())), rel=1e-12)
    assert float(M.rmse(f, o, form="wb1")) == pytest.approx(float(np.sqrt(mse_t).mean()), rel=1e-12)
    me_t = (f - o).weighted(areaw).mean(("latitude", "longitude"))
    assert float(M.bias(f, o)) == pytest.approx(float(me_t.mean()), rel=1e-12)
    w = area[:, None]
    per_t = [
        np.sum(w * a * b) / np.sqrt(np.sum(w * a * a) * np.sum(w * b * b))
        for a, b in zip(f.values, o.values, strict=True)
    ]
    assert float(M.acc(f, o)) == pytest.approx(np.mean(per_t), rel=1e-12)
    # numpy input: (time, latitude, longitude) with explicit latitudes
    assert float(M.rmse(f.values, o.values, lat=f.latitude.values)) == pytest.approx(float(M.rmse(f, o)))
    # other dims (level, lead) are kept
    stacked = xr.concat([f, 2 * f], "level")
    assert M.rmse(stacked, xr.concat([o, o], "level")).dims == ("level",)


def test_mismatched_inputs_are_errors():
    f, o = random_pair(5)
    with pytest.raises(ValueError, match="coordinates differ"):
        M.rmse(f, o.assign_coords(latitude=o.latitude.values + 1.0))
    with pytest.raises(ValueError, match="lat has 3 values"):
        M.rmse(f.values, o.values, lat=LAT3)


# climatology -----------------------------------------------------------------------------------------
def daily_series(start="2018-12-25", end="2020-01-10", hours=(0, 12), seed=0, shape=(2, 3)):
    times = pd.DatetimeIndex([t for t in pd.date_range(start, end, freq="6h") if t.hour in hours])
    rng = np.random.default_rng(seed)
    return xr.DataArray(
        rng.normal(size=(len(times),) + shape),
        dims=("time", "latitude", "longitude"),
        coords={"time": times, "latitude": [-30.0, 30.0], "longitude": [0.0, 120.0, 240.0]},
    )


def groupby_mean(da, doys, hour):
    t = pd.DatetimeIndex(da.time.values)
    pick = np.isin(t.day_of_year, doys) & (t.hour == hour)
    return da.values[pick].mean(0)


def test_climatology_cell_means_window_and_lookup():
    da = daily_series()
    t0 = pd.Timestamp("2020-01-02T12")
    clim = M.build_climatology(da, "2019-01-01", "2019-12-31T23:59", for_times=[t0])
    np.testing.assert_allclose(clim.at([t0]).values[0], groupby_mean(da.sel(time=slice("2019", "2019")), [2], 12))
    assert clim.n_times == 365 * 2 and not clim.filled
    # the window is circular: day 1 +- 1 takes days 366?, 1, 2 -> in 2019 (no day 366) days 365, 1, 2
    t1 = pd.Timestamp("2020-01-01T00")
    clim = M.build_climatology(da, "2019-01-01", "2019-12-31T23:59", window_days=1, for_times=[t1, t0])
    expect = groupby_mean(da.sel(time=slice("2019", "2019")), [365, 1, 2], 0)
    np.testing.assert_allclose(clim.at([t1]).values[0], expect)
    assert clim.at([t1, t0]).dims == ("time", "latitude", "longitude")
    # all cells (for_times=None) hold the same values as the needed ones
    full = M.build_climatology(da, "2019-01-01", "2019-12-31T23:59", window_days=1)
    np.testing.assert_allclose(full.at([t1]).values, clim.at([t1]).values)
    assert full.data.sizes["dayofyear"] == 366 and full.data.sizes["hour"] == 2


def test_climatology_fallback_and_errors():
    da = daily_series("2019-01-01", "2019-01-10T18")
    want = pd.Timestamp("2020-01-20T12")  # day 20: no training data within +-0 days
    clim = M.build_climatology(da, "2019-01-01", "2019-12-31", for_times=[want])
    assert clim.filled == [{"dayofyear": 20, "hour": 12, "from_dayofyear": 10}]
    np.testing.assert_allclose(clim.at([want]).values[0], groupby_mean(da, [10], 12))
    with pytest.raises(EvaluationError, match="day of year 20 at hour 12"):
        M.build_climatology(da, "2019-01-01", "2019-12-31", for_times=[want], fallback="error")
    assert not M.build_climatology(
        da, "2019-01-01", "2019-12-31", window_days=10, for_times=[want], fallback="error"
    ).filled
    with pytest.raises(EvaluationError, match=r"hour\(s\) \[6\]"):
        M.build_climatology(da, "2019-01-01", "2019-12-31", for_times=[pd.Timestamp("2020-01-02T06")])
    with pytest.raises(EvaluationError, match="holds no time"):
        M.build_climatology(da, "2015-01-01", "2015-12-31")
    with pytest.raises(EvaluationError, match="2020-01-05T00:00"):  # a time the climatology was not built for
        clim.at([pd.Timestamp("2020-01-05T00")])
