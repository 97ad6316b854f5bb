"""Skill on a regional daily record: the linear baseline on large raw values, the recipe's plumbing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest


def _daily_pressure(days=800, seed=0):
    """Pressure-like daily fields: 101000 Pa + an AR(2) anomaly of ~1000 Pa + an annual cycle."""
    import xarray as xr

    rng = np.random.default_rng(seed)
    times = pd.date_range("2001-01-01", periods=days, freq="D")
    a = np.zeros((days, 3, 4))
    for i in range(2, days):
        a[i] = 1.2 * a[i - 1] - 0.4 * a[i - 2] + 400 * rng.normal(size=(3, 4))
    season = 500 * np.cos(2 * np.pi * np.arange(days) / 365.25)[:, None, None]
    return xr.DataArray(
        101000 + a + season,
        dims=("time", "latitude", "longitude"),
        coords={"time": times, "latitude": [40.0, 42.5, 45.0], "longitude": [0.0, 2.5, 5, 7.5]},
    )


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
    for r, c in [(0, 0), (2, 3)]:
        X = np.stack(
            [
                x[starts, r, c],
                x[[i - 1 for i in starts], r, c],
                np.sin(d[starts]),
                np.cos(d[starts]),
                np.ones(len(starts)),
            ],
            1,
        )
        y = x[[i + 3 for i in starts], r, c]
        ref = np.linalg.lstsq(X, y, rcond=None)[0]
        k = lin.coef[0, :, r * 4 + c]  # at 00 UTC only, cos(hour) = 1 shares the intercept
        got = np.array([k[0], k[1], k[4], k[5], k[3] + k[6]])
        np.testing.assert_allclose(X @ got, X @ ref, rtol=0, atol=1e-3)  # Pa: the same fitted values


ROOT = Path(__file__).resolve().parents[2]
NCEP = ROOT.parent / "shared" / "data" / "real" / "ncep_slp_natl_daily_2001_2010.zarr"


def _forecast_store(truth, inits, leads, make):
    """A forecast store in the WeatherBench 2 layout with values make(truth at the valid times)."""
    import xarray as xr

    valid = np.add.outer(inits.values, leads.values)
    o = truth.sel(time=pd.DatetimeIndex(valid.ravel())).values.reshape(len(inits), len(leads), *truth.shape[1:])
    return xr.Dataset(
        {"slp": (("time", "prediction_timedelta", "latitude", "longitude"), make(o))},
        coords={
            "time": inits,
            "prediction_timedelta": leads,
            "latitude": truth.latitude.values,
            "longitude": truth.longitude.values,
        },
    )


def test_blend_with_the_baselines_is_fitted_on_validation_and_never_worse_there():
    from weathermixer.evaluation import metrics as M
    from weathermixer.evaluation.damping import DampingError, apply, fit, references

    truth = _daily_pressure(days=1200)
    tr = truth.to_dataset(name="slp")
    inits = pd.date_range("2003-01-01", "2003-03-31", freq="D")
    leads = pd.to_timedelta([1, 3, 10], unit="D")
    rng = np.random.default_rng(1)
    fc = _forecast_store(
        truth, inits, leads, lambda o: o + 300 * rng.normal(size=o.shape) * np.arange(1, 4)[:, None, None]
    )
    res = fit(fc, tr, "2001-01-01", "2002-12-31")
    blend = apply(fc, tr, res)
    f, c, g, o, _ = references(fc, tr, "slp", "2001-01-01", "2002-12-31", None)
    o = _forecast_store(truth, inits, leads, lambda x: x)["slp"].values
    w = M.latitude_weights(truth.latitude.values)[:, None]
    mse = {
        name: (w * (x - o) ** 2).mean(axis=(0, 2, 3))
        for name, x in (("forecast", f), ("clim", c), ("linear", g), ("blend", blend["slp"].values))
    }
    for other in ("forecast", "clim", "linear"):  # each is a point of the blend's family: least squares beats it
        assert (mse["blend"] <= mse[other] * (1 + 1e-6)).all(), (other, mse)
    assert mse["blend"][2] < 0.9 * mse["forecast"][2]  # the noisiest lead is pulled towards the baselines
    perfect = _forecast_store(truth, inits, leads, lambda x: x)
    ab = np.array(list(fit(perfect, tr, "2001-01-01", "2002-12-31")["weights"]["slp"].values()))
    np.testing.assert_allclose(ab, [[1, 0]] * 3, atol=1e-6)  # a perfect forecast is left as it is
    with pytest.raises(DampingError, match="reaches the first init"):
        fit(fc, tr, "2001-01-01", "2003-01-31")
    with pytest.raises(DampingError, match="lead"):
        apply(
            fc.isel(prediction_timedelta=[0]).assign_coords(prediction_timedelta=pd.to_timedelta([2], unit="D")),
            tr,
            res,
        )


def test_autoregressive_training_needs_skip_coefficients_for_lead_one_only():
    from weathermixer.config import ConfigError, parse, read_job_file
    from weathermixer.config.train import TrainJobConfig

    job = read_job_file(ROOT / "deepspeed_configs" / "ncep_slp_daily_cpu.json")["weathermixer"]
    assert job["train"]["rollout_mode"] == "autoregressive" and job["model"]["pixel_skip"] == 1
    parse(TrainJobConfig, job, "job")
    job["train"]["rollout_mode"] = "latent"
    with pytest.raises(ConfigError, match="pixel_skip >= 4"):
        parse(TrainJobConfig, job, "job")


@pytest.mark.skipif(not NCEP.exists(), reason="the NCEP sample is not in ../shared/data/real")
def test_skill_recipe_script_end_to_end_at_a_tiny_setting(tmp_path):
    """bash benchmarks/skill_ncep_slp.sh at 2 steps, 2 days, 2 seeds trained at once: every stage runs and
    metrics.csv has the model (the mean of the seeds) and the three baselines at 1, 2, 3, 5 and 10 days on the
    scored split."""
    import json
    import os
    import subprocess
    import sys

    out = tmp_path / "skill"
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [
            "bash",
            "benchmarks/skill_ncep_slp.sh",
            str(out),
            "--validation",
            "--seeds",
            "2",
            "--jobs",
            "2",
            "--steps",
            "2",
            "--days",
            "2",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    m = pd.read_csv(out / "report" / "metrics.csv")
    assert set(m.system) == {"model", "persistence", "climatology", "linear"}
    assert sorted(m.lead_hours.unique()) == [24, 48, 72, 120, 240]
    assert m.rmse.notna().all() and (m.rmse > 0).all()
    assert (out / "report_raw" / "metrics.csv").exists() and (out / "damping.json").exists()
    assert int((out / "seed0.parameters").read_text().replace(",", "")) > 0
    assert (out / "seed1.parameters").read_text() == (out / "seed0.parameters").read_text()
    assert (out / "forecast_val_mean.zarr").exists()
    blend = json.loads((out / "damping.json").read_text())  # the default blend holds the field-wide forecast
    assert set(blend["field_linear_ridge"]["slp"]) == set(blend["weights"]["slp"])
    assert all(len(k) == 3 for k in blend["weights"]["slp"].values())
    for options, message in (
        (["--bogus"], "unknown option --bogus"),
        (["--blend", "nearest"], "choose field or baselines"),
        (["--jobs", "0"], "give a whole number >= 1"),
    ):
        bad = subprocess.run(
            ["bash", "benchmarks/skill_ncep_slp.sh", str(out), *options],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert bad.returncode == 2 and message in bad.stderr, (options, bad.stderr)


@pytest.mark.skipif(not NCEP.exists(), reason="the NCEP sample is not in ../shared/data/real")
def test_skill_recipe_script_stops_every_seed_when_one_fails(tmp_path):
    """Seeds trained at once: the one that fails ends the script with its log's tail, and the seed still
    training is stopped rather than left running."""
    import os
    import subprocess
    import sys
    import time

    fake = tmp_path / "python"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        'case "$*" in\n'
        '  *train.py*model.seed=1*) sleep 1; echo "seed one broke" >&2; exit 3 ;;\n'
        f"  *train.py*model.seed=0*) echo $$ > {tmp_path}/seed0.pid; exec sleep 120 ;;\n"
        "esac\n"
        f'exec {sys.executable} "$@"\n'
    )
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    t0 = time.monotonic()
    run = subprocess.run(
        ["bash", "benchmarks/skill_ncep_slp.sh", str(tmp_path / "out"), "--validation", "--seeds", "3"]
        + ["--jobs", "2", "--steps", "2", "--days", "2"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 1, run.stderr[-3000:]
    assert "seed 1 failed" in run.stderr and "seed one broke" in run.stderr
    assert "stopping the seeds still training" in run.stderr
    assert time.monotonic() - t0 < 110  # it did not wait for seed 0's two minutes
    pid = int((tmp_path / "seed0.pid").read_text())
    time.sleep(0.5)
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
    assert not (tmp_path / "out" / "seed2.train.log").exists()  # no seed started after the failure


@pytest.mark.skipif(not NCEP.exists(), reason="the NCEP sample is not in ../shared/data/real")
def test_the_regional_grid_is_weighted_and_patched_as_a_region_not_the_globe():
    """The NCEP job's loader serves the data's own latitudes (70 .. 30 N), the loss weights are cos of those
    rows normalised over them, and 3 x 3 patches pad the 17 rows to 18 and crop back exactly."""
    import torch

    from jigsaw_ext.mesh import Mesh
    from weathermixer.data.loader import ShardedSampleLoader
    from weathermixer.grid import Geometry
    from weathermixer.train.config import load_train_job
    from weathermixer.train.loss import latitude_weights

    job, _ = load_train_job(
        ROOT / "deepspeed_configs" / "ncep_slp_daily_cpu.json",
        settings=[
            f"data.path={NCEP}",
            "data.stats=null",
            "model.pixel_skip=0",
            "model.pixel_skip_init=null",
            "model.pixel_skip_zero_start=false",
        ],
    )
    loader = ShardedSampleLoader(job.data, job.model, Mesh.single(), "val", batch=1, shuffle=False, infinite=False)
    np.testing.assert_allclose(loader.lat, np.arange(70.0, 29.0, -2.5))
    np.testing.assert_allclose(loader.lon, np.arange(-70.0, 11.0, 2.5))
    w = latitude_weights(torch.as_tensor(loader.lat.copy())).double().numpy()
    cos = np.cos(np.deg2rad(loader.lat))
    np.testing.assert_allclose(w, cos / cos.mean(), rtol=1e-6)  # no pole rows, no global normalisation
    geo = Geometry(job.model, Mesh.single())
    assert geo.tokens == 6 * 11
    x = torch.randn(2, 1, 17, 33)
    np.testing.assert_array_equal(geo.unpatchify(geo.patchify(x)).numpy(), x.numpy())


@pytest.mark.skipif(not NCEP.exists(), reason="the NCEP sample is not in ../shared/data/real")
def test_edge_check_smoke_scores_every_edge_against_the_in_domain_forecast(tmp_path):
    """benchmarks/ncep_slp_edge_check.py --smoke: the in-domain field-wide forecast beats the climatology, each
    edge's oracle (its strip's next days as extra inputs) beats the in-domain forecast on the same interior, and
    the error profile has one value per longitude, below the spread at 1 day."""
    import json
    import os
    import subprocess
    import sys

    out, png = tmp_path / "edges.json", tmp_path / "edges.png"
    run = subprocess.run(
        [sys.executable, "benchmarks/ncep_slp_edge_check.py", "--smoke", "--out", str(out), "--plot", str(png)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res == json.loads(run.stdout) and png.stat().st_size > 0
    s = res["scores"]
    assert res["leads_days"] == [1, 2] and len(res["inits_2008"]) == 2
    for i in range(2):
        assert s["in_domain"][i] < 0.9 * s["climatology"][i]
        for edge in ("west", "east", "north", "south"):
            assert s[f"{edge}_oracle"][i] < s["in_domain"][i], (edge, i, s)
    profile = res["error_over_spread_by_longitude"]["1d"]
    assert len(profile) == len(res["longitude"]) == 33 and all(0 < v < 1 for v in profile)
