"""weathermixer.evaluate end to end on a synthetic store (scores checked against an independent
per-init loop), the scorecard, and every bad-input error."""

import csv
import json

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from weathermixer.data.synth import write_synthetic
from weathermixer.evaluation import evaluate as E
from weathermixer.evaluation import scorecard as S
from weathermixer.evaluation.metrics import EvaluationError

VARS = ["2m_temperature", "geopotential", "temperature"]
LEVELS = [500, 850]
INITS = pd.date_range("2020-01-02", "2020-01-05T12", freq="12h")
LEADS = pd.to_timedelta([6, 12, 24, 48], "h")
BIAS = {"2m_temperature": 0.5, "geopotential": -40.0, "temperature": 1.5}


def forecast_from(truth: xr.Dataset, inits, leads, variables, bias, growth=0.3, descending=True):
    """truth(t + L) + bias + a pattern growing with lead, on latitudes in the other order."""
    lat, lon = np.deg2rad(truth.latitude.values), np.deg2rad(truth.longitude.values)
    pattern = np.cos(lat)[:, None] * np.sin(2 * lon)[None, :] + 0.3 * np.sin(lat)[:, None]
    out = {}
    for v in variables:
        da = truth[v]
        scale = float(da.std())
        fields = [
            [
                da.sel(time=t + lead).values + bias[v] + growth * scale * (lead / pd.Timedelta("24h")) * pattern
                for lead in leads
            ]
            for t in inits
        ]
        out[v] = (("time", "prediction_timedelta") + da.dims[1:], np.array(fields, dtype=np.float32))
    coords = {"time": inits, "prediction_timedelta": leads, "latitude": truth.latitude, "longitude": truth.longitude}
    if "level" in truth.dims:
        coords["level"] = truth.level
    fc = xr.Dataset(out, coords=coords)
    return fc.isel(latitude=slice(None, None, -1)) if descending else fc


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    d = tmp_path_factory.mktemp("evaluate")
    a = write_synthetic(str(d / "a.zarr"), (8, 16), "2019-01-01", "2019-01-10T18", 6.0, VARS, LEVELS, seed=0)
    b = write_synthetic(str(d / "b.zarr"), (8, 16), "2020-01-01", "2020-01-08T18", 6.0, VARS, LEVELS, seed=1)
    truth = xr.concat([a.load(), b.load()], "time", data_vars="minimal", coords="minimal", compat="override")
    truth.to_zarr(d / "truth.zarr", consolidated=False)
    fc = forecast_from(truth, INITS, LEADS, VARS, BIAS)
    fc["geopotential"] = fc["geopotential"].transpose("prediction_timedelta", "time", "latitude", "level", "longitude")
    fc.to_zarr(d / "fc.zarr", consolidated=False)
    return {"truth": str(d / "truth.zarr"), "forecast": str(d / "fc.zarr"), "truth_ds": truth, "fc_ds": fc}


def wb2_lat_weights(lat_deg):
    """WeatherBench 2's get_lat_weights (evaluation/utils.py) on ascending latitudes: cell bounds at -90,
    the midpoints and 90; the weight of a row is sin(upper bound) - sin(lower bound)."""
    lat = np.deg2rad(np.asarray(lat_deg, dtype=np.float64))
    bounds = np.concatenate([[-np.pi / 2], (lat[:-1] + lat[1:]) / 2, [np.pi / 2]])
    return np.sin(bounds[1:]) - np.sin(bounds[:-1])


def reference(truth, fc, var, level, lead_h, form="wb2", inits=INITS, clim_year="2019"):
    """Scores by an explicit loop over inits: WeatherBench 2's cell-area weights per row, means over
    longitude, climatology by pandas groupby over (day of year, hour) of the training year."""
    tr = truth[var] if level is None else truth[var].sel(level=level)
    f_all = fc[var] if level is None else fc[var].sel(level=level)
    f_all = f_all.sortby("latitude").transpose("time", "prediction_timedelta", "latitude", "longitude")
    tr = tr.sortby("latitude")
    w = wb2_lat_weights(tr.latitude.values)
    w = w / w.sum()
    train = tr.sel(time=clim_year)
    t_idx = pd.DatetimeIndex(train.time.values)
    groups = {
        key: train.values[np.asarray(pos)].mean(0)
        for key, pos in pd.Series(range(len(t_idx))).groupby([t_idx.day_of_year, t_idx.hour]).groups.items()
    }
    lead = pd.Timedelta(hours=lead_h)
    mean = lambda x: float(np.sum(w * x.mean(axis=1)))  # noqa: E731
    out = {s: {"mse": [], "me": [], "acc": []} for s in ("model", "persistence", "climatology")}
    for t in inits:
        v = t + lead
        o = tr.sel(time=v).values.astype(float)
        clim = groups[(v.day_of_year, v.hour)]
        fields = {
            "model": f_all.sel(time=t, prediction_timedelta=lead).values.astype(float),
            "persistence": tr.sel(time=t).values.astype(float),
            "climatology": clim,
        }
        for s, f in fields.items():
            out[s]["mse"].append(mean((f - o) ** 2))
            out[s]["me"].append(mean(f - o))
            fa, oa = f - clim, o - clim
            den = np.sqrt(mean(fa * fa) * mean(oa * oa))
            out[s]["acc"].append(mean(fa * oa) / den if den > 0 else np.nan)
    res = {}
    for s, d in out.items():
        mse = np.array(d["mse"])
        rmse = np.sqrt(mse.mean()) if form == "wb2" else np.sqrt(mse).mean()
        res[s] = {"rmse": rmse, "bias": np.mean(d["me"]), "acc": np.mean(d["acc"])}
    return res


def test_cli_end_to_end(stores, tmp_path, capsys):
    out = tmp_path / "report"
    rc = E.main(
        [
            "--forecast",
            stores["forecast"],
            "--truth",
            stores["truth"],
            "--out",
            str(out),
            "--climatology-years",
            "2019",
            "2019",
            "--headline",
            "z500,temperature@850,2m_temperature",
            "--map-leads",
            "12,48",
            "--quiet",
            "--clim-window-days",
            "0",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    m = json.loads((out / "metrics.json").read_text())
    keys = ["geopotential@500", "geopotential@850", "temperature@500", "temperature@850", "2m_temperature"]
    assert sorted(m["scores"]) == sorted(keys)
    assert m["grid"]["shape"] == [8, 16] and m["definitions"]["rmse_form"] == "wb2"
    assert m["definitions"]["latitude_weighting"] == "area" and "cell area" in m["definitions"]["latitude_weights"]
    assert m["init_times"] == [f"{t:%Y-%m-%dT%H:%M}" for t in INITS]
    assert m["lead_hours"] == [6.0, 12.0, 24.0, 48.0]
    assert m["climatology"]["years"] == [2019] and not m["climatology"]["overlaps_evaluation"]
    assert m["headline"] == {
        "z500": "geopotential@500",
        "temperature@850": "temperature@850",
        "2m_temperature": "2m_temperature",
    }
    truth, fc = stores["truth_ds"], stores["fc_ds"]
    for key in keys:
        var, _, level = key.partition("@")
        assert set(m["scores"][key]) == {"6", "12", "24", "48"}
        for lead, cell in m["scores"][key].items():
            ref = reference(truth, fc, var, int(level) if level else None, float(lead))
            assert set(cell) == {"model", "persistence", "climatology", "linear"}
            for system in ("model", "persistence"):
                for stat in ("rmse", "bias", "acc"):
                    assert cell[system][stat] == pytest.approx(ref[system][stat], rel=1e-5, abs=1e-9), (
                        key,
                        lead,
                        system,
                        stat,
                    )
            assert cell["climatology"]["rmse"] == pytest.approx(ref["climatology"]["rmse"], rel=1e-5)
            assert cell["climatology"]["bias"] == pytest.approx(ref["climatology"]["bias"], rel=1e-5, abs=1e-9)
            assert cell["climatology"]["acc"] is None  # zero forecast anomaly: undefined
    z = m["scores"]["geopotential@500"]  # the perturbation grows with lead
    assert z["6"]["model"]["rmse"] < z["12"]["model"]["rmse"] < z["48"]["model"]["rmse"]

    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert len(rows) == len(keys) * 4 * 4
    for r in rows:
        s = m["scores"][r["field"]][r["lead_hours"]][r["system"]]
        for stat in ("rmse", "bias", "acc"):
            assert (r[stat] == "" and s[stat] is None) or float(r[stat]) == s[stat]
        assert r["level"] == ("" if "@" not in r["field"] else r["field"].split("@")[1])
    pngs = [out / f"scores_{label}.png" for label in ("z500", "temperature_850", "2m_temperature")]
    pngs += [out / f"map_{label}_{h}h.png" for label in ("z500", "temperature_850", "2m_temperature") for h in (12, 48)]
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000, p
    assert sorted(out.glob("*.png")) == sorted(pngs)

    # the scorecard: another grid and other years -> said clearly, no reference rows
    assert S.main([str(out / "metrics.json")]) == 0
    text = capsys.readouterr().out
    assert "DOES NOT MATCH" in text and "grid 8x16" in text and "2017-2018" in text
    assert "operational IFS" not in text
    assert S.main([str(out / "metrics.json"), "--strict"]) == 1


def test_wb1_form_lead_and_init_subset(stores):
    fc = E.open_dataset(stores["forecast"], "forecast")
    tr = E.open_dataset(stores["truth"], "truth")
    plan = E.plan_evaluation(fc, tr, ["temperature"], [24], init_start="2020-01-03", init_end="2020-01-04")
    assert plan.inits.equals(INITS[(INITS >= "2020-01-03") & (INITS <= "2020-01-04")])
    res = E.evaluate(
        fc,
        tr,
        plan,
        "2019-01-01",
        "2019-12-31",
        rmse_form="wb1",
        max_block_bytes=1,  # 1 init/block
        window_days=0,
    )
    assert res["definitions"]["rmse_form"] == "wb1"
    ref = reference(stores["truth_ds"], stores["fc_ds"], "temperature", 850, 24, form="wb1", inits=plan.inits)
    cell = res["scores"]["temperature@850"]["24"]
    for system in ("model", "persistence"):
        assert cell[system]["rmse"] == pytest.approx(ref[system]["rmse"], rel=1e-5)
        assert cell[system]["acc"] == pytest.approx(ref[system]["acc"], rel=1e-5)
    wb2 = reference(stores["truth_ds"], stores["fc_ds"], "temperature", 850, 24, inits=plan.inits)
    # the model's error is the same field at every init (MSE_t constant: both forms agree up to float32 rounding);
    # persistence's error differs between inits, so its WB1 form is strictly below its WB2 form
    assert ref["persistence"]["rmse"] < wb2["persistence"]["rmse"] - 1e-6


def test_headline_names():
    keys = {
        "geopotential@500": ("geopotential", 500),
        "temperature@850": ("temperature", 850),
        "2m_temperature": ("2m_temperature", None),
    }
    assert E.resolve_headline(None, keys) == {
        "z500": "geopotential@500",
        "t850": "temperature@850",
        "t2m": "2m_temperature",
    }
    other = {
        "precip": ("precip", None),
        "wind@3": ("wind", 3),
        "wind@7": ("wind", 7),
        "a": ("a", None),
        "b": ("b", None),
    }
    assert E.resolve_headline(None, other) == {k: k for k in list(other)[:4]}
    assert E.resolve_headline("wind@7, precip", other) == {"wind@7": "wind@7", "precip": "precip"}
    with pytest.raises(EvaluationError, match="'wind' has levels 3, 7"):
        E.resolve_headline("wind", other)
    with pytest.raises(EvaluationError, match=r"'u10' \(10m_u_component_of_wind\) is not an evaluated field"):
        E.resolve_headline("z500,u10", keys)


# a 32 x 64 set in the WeatherBench test years: the scorecard prints the reference rows --------------
def tiny_truth(times, lat, lon, levels=(500, 850), seed=0):
    rng = np.random.default_rng(seed)
    shape = (len(times), len(levels), len(lat), len(lon))
    base = {"geopotential": 5.5e4, "temperature": 270.0}
    data = {
        v: (("time", "level", "latitude", "longitude"), base[v] + rng.normal(size=shape) * base[v] / 100) for v in base
    }
    data["sfc"] = (("time", "latitude", "longitude"), rng.normal(size=(len(times), len(lat), len(lon))))
    return xr.Dataset(data, coords={"time": times, "level": list(levels), "latitude": lat, "longitude": lon})


def test_scorecard_on_the_reference_grid(tmp_path, capsys):
    lat = np.linspace(-87.1875, 87.1875, 32)
    lon = np.arange(64) * 5.625
    truth = tiny_truth(pd.date_range("2016-12-20", "2017-01-12", freq="12h"), lat, lon)
    inits = pd.date_range("2017-01-01", periods=3, freq="12h")
    leads = pd.to_timedelta([72, 120], "h")
    fc = forecast_from(
        truth,
        inits,
        leads,
        ["geopotential", "temperature"],
        {"geopotential": 30.0, "temperature": 0.2},
        descending=False,
    )
    plan = E.plan_evaluation(fc, truth)
    res = E.evaluate(fc, truth, plan, "2016-01-01", "2016-12-31T23:59", window_days=0)
    assert res["climatology"]["filled_cells"] > 0  # valid days in January: nearest December day
    res["headline"] = E.resolve_headline(None, plan.keys)
    E.write_report(res, tmp_path, plots=False)
    assert S.main([str(tmp_path / "metrics.json"), "--strict"]) == 0
    text = capsys.readouterr().out
    assert "MATCHES the reference set" in text and "DOES NOT MATCH" not in text
    ours = [line for line in text.splitlines() if line.startswith("ours: model")][0].split()[2:]
    z, t = res["scores"]["geopotential@500"], res["scores"]["temperature@850"]
    assert ours == [
        f"{z['72']['model']['rmse']:.0f}",
        f"{z['120']['model']['rmse']:.0f}",
        f"{t['72']['model']['rmse']:.2f}",
        f"{t['120']['model']['rmse']:.2f}",
    ]
    ifs = [line for line in text.splitlines() if line.startswith("operational IFS")][0].split()[-4:]
    assert ifs == ["154", "334", "1.36", "2.03"]
    assert "wb2 form" in text  # the reference is the WB1 form: said in a note


# bad input ---------------------------------------------------------------------------------------
LAT4, LON8 = np.array([-67.5, -22.5, 22.5, 67.5]), np.arange(8) * 45.0
TIMES = pd.date_range("2019-12-30", "2020-01-04", freq="6h")


def small_pair(**changes):
    truth = tiny_truth(TIMES, LAT4, LON8)
    fc = forecast_from(
        truth,
        pd.date_range("2020-01-01", periods=2, freq="12h"),
        pd.to_timedelta([6, 12], "h"),
        ["geopotential", "temperature", "sfc"],
        {"geopotential": 1.0, "temperature": 1.0, "sfc": 1.0},
    )
    return fc, truth


def _coarser(fc, tr):
    return fc.isel(longitude=slice(0, 4)), tr


BAD = {
    "grid size": (_coarser, {}, "grids differ: forecast 4x4 .* truth 4x8"),
    "latitudes": (lambda fc, tr: (fc.assign_coords(latitude=fc.latitude + 1.0), tr), {}, "latitudes differ"),
    "longitudes": (lambda fc, tr: (fc.assign_coords(longitude=fc.longitude - 180.0), tr), {}, "longitudes differ"),
    "variable not in truth": (lambda fc, tr: (fc, tr.drop_vars("sfc")), {}, r"\['sfc'\] of the forecast missing"),
    "variable not in forecast": (
        lambda fc, tr: (fc, tr),
        {"variables": ["humidity"]},
        r"\['humidity'\] not in the forecast",
    ),
    "level not in truth": (lambda fc, tr: (fc, tr.sel(level=[500])), {}, "level.s. 850 not in the truth"),
    "init outside truth": (
        lambda fc, tr: (fc, tr.sel(time=slice("2020-01-01T06", None))),
        {},
        "init time.s. not in the truth data .*2020-01-01T00:00",
    ),
    "lead not in forecast": (lambda fc, tr: (fc, tr), {"leads_hours": [6, 999]}, "lead 999 h not in the forecast"),
    "valid time outside truth": (
        lambda fc, tr: (fc, tr.sel(time=slice(None, "2020-01-01T12"))),
        {},
        "lead 6 h: valid time.s. not in the truth data .*2020-01-01T18:00",
    ),
    "no init in range": (lambda fc, tr: (fc, tr), {"init_start": "2021-01-01"}, "no forecast init time"),
    "missing dimension": (
        lambda fc, tr: (fc.rename(prediction_timedelta="step"), tr),
        {},
        "forecast has no dimension 'prediction_timedelta'",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_a_named_error(case):
    change, kwargs, match = BAD[case]
    fc, tr = change(*small_pair())
    with pytest.raises(EvaluationError, match=match):
        E.plan_evaluation(fc, tr, **kwargs)


def test_bad_climatology_and_map_leads(tmp_path):
    fc, tr = small_pair()
    plan = E.plan_evaluation(fc, tr)
    assert isinstance(EvaluationError("x"), ValueError)
    with pytest.raises(EvaluationError, match="holds no time"):
        E.evaluate(fc, tr, plan, "2015-01-01", "2015-12-31")
    with pytest.raises(EvaluationError, match="no data for day of year 1 at hour 6"):
        E.evaluate(fc, tr, plan, "2019-12-30", "2019-12-31T23:00", fallback="error", window_days=0)
    with pytest.raises(EvaluationError, match="no truth time before the first init"):
        E.evaluate(fc, tr.sel(time=slice("2020-01-01", None)), plan)
    res = E.evaluate(fc, tr, plan)  # default period: the truth before the first init
    assert res["climatology"]["period"].startswith("default") and res["climatology"]["end"] == "2019-12-31T18:00"
    with pytest.raises(EvaluationError, match="map lead 24 h is not an evaluated lead"):
        E.check_map_leads(plan, [24])
    assert E.check_map_leads(plan, None) == [6.0, 12.0]


def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys):
    fc, tr = small_pair()
    tr.to_netcdf(tmp_path / "truth.nc", engine="h5netcdf")
    fc.isel(longitude=slice(0, 4)).to_zarr(tmp_path / "coarse.zarr", consolidated=False)
    fc.to_zarr(tmp_path / "fc.zarr", consolidated=False)
    base = ["--truth", str(tmp_path / "truth.nc"), "--out", str(tmp_path / "r"), "--quiet"]
    for forecast, match in ((tmp_path / "coarse.zarr", "grids differ"), (tmp_path / "nope.zarr", "forecast not found")):
        assert E.main(["--forecast", str(forecast), *base]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and match in err[0], err
    assert E.main(["--forecast", str(tmp_path / "fc.zarr"), *base, "--clim-start", "2019-12-30"]) == 2
    assert "both --clim-start and --clim-end" in capsys.readouterr().err
    assert E.main(["--forecast", str(tmp_path / "fc.zarr"), *base, "--map-leads", "24"]) == 2
    assert "map lead 24 h" in capsys.readouterr().err and not (tmp_path / "r").exists()
    # the same data pass from a netCDF truth file
    assert E.main(["--forecast", str(tmp_path / "fc.zarr"), *base, "--no-plots", "--leads", "12"]) == 0
    assert (tmp_path / "r" / "metrics.csv").stat().st_size > 0 and not list((tmp_path / "r").glob("*.png"))


def test_dimension_aliases_are_renamed(tmp_path):
    fc, tr = small_pair()
    fc.rename(latitude="lat", longitude="lon", time="init_time", prediction_timedelta="lead_time").to_zarr(
        tmp_path / "fc.zarr", consolidated=False
    )
    opened = E.open_dataset(str(tmp_path / "fc.zarr"), "forecast")
    assert {"time", "prediction_timedelta", "latitude", "longitude"} <= set(opened.dims)
    assert E.plan_evaluation(opened, tr).keys == E.plan_evaluation(fc, tr).keys
