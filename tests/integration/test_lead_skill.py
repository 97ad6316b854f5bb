"""Skill at every lead: history inputs on every mesh, the rollout curriculum and per-lead
weights, activation checkpointing across rollout steps, the re-encoding interval chosen on the
validation set, and the real ERA5 samples (GRIB reading, the irregular-time error)."""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from jigsaw_ext.selfcheck import FP32_TOL
from jigsaw_ext.testing import run_workers
from weathermixer.config import ChannelsConfig, ModelConfig
from weathermixer.inference.ensemble import main as ens_main
from weathermixer.model.mixer import WeatherMixer, num_parameters

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]
REAL = ROOT.parent / "shared" / "data" / "real"
UK_GRIB = REAL / "era5-2mt-2019-03-uk.grib"
GLOBAL_ZARR = REAL / "era5_global_1deg_2026-03_5var.zarr"


def _selfcheck_variants(rank, world, mesh_kwargs):
    """Every rollout form with history inputs against the serial twin, in one spawn."""
    from jigsaw_ext.mesh import MeshConfig
    from weathermixer import selfcheck as sc

    out = {}
    for name, overrides, task in (
        ("history2_latent", dict(history=2), {}),
        ("history1_autoregressive_checkpoint", dict(history=1, rollout=3), dict(autoregressive=True, checkpoint=True)),
        ("history1_latent_checkpoint", dict(history=1), dict(checkpoint=True)),
    ):
        errors = sc.compare_with_serial(MeshConfig(**mesh_kwargs), sc.default_model_config(**overrides), **task)
        out[name] = {k: v for k, (v, _) in errors.items()}
    return out


@pytest.mark.parametrize("mesh", [(1, 1, 1), (1, 2, 2)], ids=lambda m: "x".join(map(str, m)))
def test_history_inputs_on_the_mesh_equal_the_serial_twin(mesh):
    """25 x 24 grid, 2 x 3 patches padded to 13 patch rows (7 + 6 over DOMAIN=2), 7 channels (4 + 3
    over TP=2): uneven shards; history 1 and 2, latent and autoregressive, with checkpointing."""
    dp, domain, tp = mesh
    res = run_workers(
        _selfcheck_variants,
        dp * domain * tp,
        dict(dp=dp, domain=domain, tp=tp),
        timeout=300,
        preload=["weathermixer.model"],
    )[0]
    for name, errors in res.items():
        assert max(errors.values()) <= FP32_TOL, (name, errors)


def _cfg(**kw):
    base = dict(
        grid=(8, 12),
        patch=(2, 3),
        hidden=16,
        blocks=2,
        rollout=2,
        history=1,
        head="tendency",
        seed=3,
        channels=ChannelsConfig(surface=["t2m"], atmospheric=["z"], levels=[500], static=["lsm"]),
    )
    return ModelConfig(**{**base, **kw})


def test_history_is_used_and_checked():
    cfg = _cfg()
    model = WeatherMixer(cfg)
    assert num_parameters(cfg) == model.local_num_parameters()
    assert num_parameters(cfg) - num_parameters(_cfg(history=0)) == 2 * 6 * 16  # one more (C x patch) segment
    g = torch.Generator().manual_seed(0)
    window, static = torch.randn(2, 2, 2, 8, 12, generator=g), torch.randn(2, 1, 8, 12, generator=g)
    a = model(window, static)
    changed = window.clone()
    changed[:, 0] += 1.0  # the state at t - dt only
    assert (model(changed, static) - a).abs().max() > 1e-3  # the model reads its history input
    with pytest.raises(ValueError, match=r"model.history=1 expects fields of shape \(batch, 2 times"):
        model(window[:, -1], static)
    # autoregressive with history: the window moves on by the decoded state
    two = model(window, static, steps=2, every_lead=True, autoregressive=True)
    first = model(window, static, steps=1, autoregressive=True)
    second = model(torch.stack([window[:, -1], first], 1), static, steps=1, autoregressive=True)
    assert torch.equal(two[0], first) and torch.allclose(two[1], second, atol=1e-6)


@pytest.mark.parametrize("autoregressive", [False, True])
def test_activation_checkpointing_equals_no_checkpointing(autoregressive):
    cfg = _cfg(rollout=3)
    g = torch.Generator().manual_seed(1)
    window, static = torch.randn(2, 2, 2, 8, 12, generator=g), torch.randn(2, 1, 8, 12, generator=g)
    grads = []
    for checkpoint in (False, True):
        model = WeatherMixer(cfg)
        x = window.clone().requires_grad_(True)
        leads = model(x, static, steps=3, every_lead=True, autoregressive=autoregressive, checkpoint=checkpoint)
        loss = sum((w * p.square().mean()) for w, p in zip((0.2, 0.3, 0.5), leads, strict=True))
        loss.backward()
        grads.append([loss.detach(), x.grad] + [p.grad for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_curriculum_and_lead_weights():
    from weathermixer.config import ConfigError, parse
    from weathermixer.config.train import TrainJobConfig
    from weathermixer.train.loss import lead_weights

    job = parse(
        TrainJobConfig,
        {"train": {"curriculum": [[1, 1], [100, 4], [300, 20]], "lead_weights": [1.0] * 10 + [2.0] * 10}},
    )
    assert job.rollout == 20
    assert [job.rollout_cap(s) for s in (1, 99, 100, 299, 300, 5000)] == [1, 1, 4, 4, 20, 20]
    assert lead_weights(job.train.lead_weights, 4) == [0.25] * 4
    w = lead_weights(job.train.lead_weights, 12)
    assert math.isclose(sum(w), 1.0) and w[-1] == pytest.approx(2 * w[0])
    assert lead_weights(None, 3) == pytest.approx([1 / 3] * 3)
    with pytest.raises(ConfigError, match="train.lead_weights has 3 value"):
        parse(TrainJobConfig, {"train": {"rollout": 4, "lead_weights": [1, 1, 1]}})
    with pytest.raises(ConfigError, match="largest K of train.curriculum is 6"):
        parse(TrainJobConfig, {"train": {"rollout": 4, "curriculum": [[1, 2], [10, 6]]}})
    with pytest.raises(ConfigError, match="first step >= 1"):
        parse(TrainJobConfig, {"train": {"curriculum": [[0, 2]]}})


def test_trainer_loss_weights_the_leads(monkeypatch):
    """micro_step_loss = sum_k w_k loss_k with the normalised train.lead_weights (a fake engine)."""
    from types import SimpleNamespace

    from weathermixer.config import parse
    from weathermixer.config.train import TrainJobConfig
    from weathermixer.train.trainer import Trainer

    job = parse(
        TrainJobConfig, {"model": {"grid": [2, 2], "patch": [1, 1]}, "train": {"rollout": 3, "lead_weights": [1, 0, 3]}}
    )
    C = job.model.channels.n_fields
    t = Trainer(job, {})
    t.device, t.dtype, t.micro = torch.device("cpu"), torch.float32, 1
    t.w_lat, t.w_loss_lat, t.w_chan = torch.ones(2), torch.ones(2), torch.ones(C)
    preds = [torch.full((1, C, 2, 2), float(i + 1)) for i in range(3)]
    t.engine = lambda *a, steps, **kw: preds[:steps]  # k leads, as the model returns
    sample = SimpleNamespace(fields=torch.zeros(1, C, 2, 2), static=None, targets=[torch.zeros(1, C, 2, 2)] * 3)
    assert t.micro_step_loss(sample, 3).item() == pytest.approx((1 * 1 + 0 * 4 + 3 * 9) / 4)
    assert t.micro_step_loss(sample, 2).item() == pytest.approx(1.0)  # w_1..w_2 = 1, 0


def test_autoregressive_training_advances_the_hour_of_day():
    """rollout_mode=autoregressive: each step's static time features follow its input's valid time, as in
    the forecast (data.loader.static_at), instead of staying at the start time; latent unchanged."""
    from types import SimpleNamespace

    from weathermixer.config import parse
    from weathermixer.config.train import TrainJobConfig
    from weathermixer.data.loader import _computed
    from weathermixer.train.trainer import Trainer

    ch = {
        "surface": ["t2m"],
        "atmospheric": [],
        "levels": [],
        "static": ["cos_latitude", "sin_hour_of_day", "cos_hour_of_day"],
    }
    job = parse(
        TrainJobConfig,
        {
            "model": {"grid": [4, 8], "patch": [1, 2], "hidden": 16, "blocks": 1, "channels": ch},
            "train": {"rollout": 3, "rollout_mode": "autoregressive"},
        },
    )
    model = WeatherMixer(job.model).eval()
    lat, lon = np.linspace(60, 30, 4), np.arange(8) * 45.0
    t = Trainer(job, {})
    t.engine, t.data_cfg = model, SimpleNamespace(dt_hours=6.0)
    t.train_data = SimpleNamespace(static_names=ch["static"], lat=lat, lon=lon)
    times = [pd.Timestamp("2020-01-01T00"), pd.Timestamp("2020-01-01T06")]

    def static(ts):
        return torch.tensor(
            np.stack([[np.broadcast_to(_computed(n, lat, lon, x), (4, 8)) for n in ch["static"]] for x in ts]),
            dtype=torch.float32,
        )

    x = torch.randn(2, 1, 4, 8)
    with torch.no_grad():
        got = t.forecast(x, static(times), 3, times)
        ref, y = [], x
        for j in range(3):
            y = model(y, static([s + pd.Timedelta(hours=6 * j) for s in times]), steps=1)
            ref.append(y)
        frozen = model(x, static(times), steps=3, every_lead=True, autoregressive=True)
        for a, b in zip(got, ref, strict=True):
            torch.testing.assert_close(a, b)
        assert not torch.allclose(got[2], frozen[2])  # the start time's hour for every step differs
        t.job = job.model_copy(update={"train": job.train.model_copy(update={"rollout_mode": "latent"})})
        for a, b in zip(
            t.forecast(x, static(times), 3, times), model(x, static(times), steps=3, every_lead=True), strict=True
        ):
            torch.testing.assert_close(a, b)


# the real ERA5 samples -----------------------------------------------------------------------------
def _uk_data_config(**kw):
    from weathermixer.config.data import DataConfig

    return DataConfig(path=str(UK_GRIB), variables={"2m_temperature": "t2m"}, dt_hours=1, **kw)


UK_CHANNELS = ChannelsConfig(surface=["2m_temperature"], atmospheric=[], levels=[], static=["cos_latitude"])


def test_grib_reading_through_the_loader():
    pytest.importorskip("cfgrib", reason="cfgrib (the [grib] extra) is not installed: GRIB reading untested")
    if not UK_GRIB.exists():
        pytest.skip(f"{UK_GRIB} is missing (../shared/data/real)")
    import xarray as xr

    from jigsaw_ext.mesh import Mesh
    from weathermixer.data import ShardedSampleLoader

    cfg = _uk_data_config(splits={"train": ("2019-03-02T00", "2019-03-02T05")})
    model = ModelConfig(grid=(33, 49), patch=(3, 7), hidden=8, history=1, channels=UK_CHANNELS)
    loader = ShardedSampleLoader(cfg, model, Mesh.single(), "train", batch=2, shuffle=False, infinite=False)
    assert cfg.resolved_format() == "grib"
    sample = next(iter(loader))
    loader.stop()
    assert sample.fields.shape == (2, 2, 1, 33, 49)  # (batch, t - 1 h and t, channel, lat, lon)
    raw = xr.open_dataset(UK_GRIB, engine="cfgrib", backend_kwargs={"indexpath": ""}).t2m
    t0 = pd.Timestamp(sample.times[0])
    np.testing.assert_array_equal(sample.fields[0, 1, 0].numpy(), raw.sel(time=t0).values)  # rows north..south
    np.testing.assert_array_equal(sample.fields[0, 0, 0].numpy(), raw.sel(time=t0 - pd.Timedelta("1h")).values)
    np.testing.assert_array_equal(sample.targets[0][0, 0].numpy(), raw.sel(time=t0 + pd.Timedelta("1h")).values)
    assert not list(UK_GRIB.parent.glob("*.idx"))  # no index file written beside the shared sample


def test_irregular_and_integer_time_axes_are_clear_errors():
    if not GLOBAL_ZARR.exists():
        pytest.skip(f"{GLOBAL_ZARR} is missing (../shared/data/real)")
    from weathermixer.data import DataConfig, DataError, GriddedDataset

    ch = ChannelsConfig(surface=["t2m"], atmospheric=[], levels=[], static=[])
    cfg = DataConfig(path=str(GLOBAL_ZARR), dims={"time": "time_index"}, dt_hours=6)
    # the store's integer hours carry their units in a global attribute: decoded, then the gaps found
    with pytest.raises(DataError, match=r"irregular interval\(s\) \(steps seen: 7 h, 8 h\).*resample the data set"):
        GriddedDataset(cfg, ch, (181, 360))
    with pytest.raises(
        DataError, match="time coordinate 'time_index' has dtype int64 and no CF units; set data.time_units"
    ):
        GriddedDataset(cfg.model_copy(update={"time_units": "hours"}), ch, (181, 360))


# the linear baseline, the climatology's smoothing, regions and weights -------------------------------
def _linear_truth(times, seed=0):
    """x(t + dt) = 2 cos(0.3) x(t) - x(t - dt) + 0.5 sin(hour of t) + 2 per pixel, exactly (6-hourly): an
    undamped oscillation (it never settles onto the forcing, so the features stay independent)."""
    import xarray as xr

    rng = np.random.default_rng(seed)
    x = np.zeros((len(times), 3, 4))
    x[:2] = rng.normal(size=(2, 3, 4))
    hours = np.asarray(pd.DatetimeIndex(times).hour)
    for i in range(2, len(times)):
        x[i] = 2 * np.cos(0.3) * x[i - 1] - x[i - 2] + 0.5 * np.sin(2 * np.pi * hours[i - 1] / 24) + 2.0
    return xr.DataArray(
        x,
        dims=("time", "latitude", "longitude"),
        coords={"time": times, "latitude": [10.0, 0.0, -10.0], "longitude": [0.0, 90, 180, 270]},
    )


def test_linear_baseline_recovers_a_linear_process_and_never_sees_the_test_period():
    from weathermixer.evaluation.baselines import ClimatologyPeriod, fit_linear

    times = pd.date_range("2019-01-01", "2019-03-31T18", freq="6h")
    truth = _linear_truth(times)
    period = ClimatologyPeriod(pd.Timestamp("2019-01-01"), pd.Timestamp("2019-02-28T18"), False, False)
    dt, leads = pd.Timedelta("6h"), pd.to_timedelta([6, 12, 48], "h")
    lin = fit_linear(truth, period, dt, leads)
    assert not lin.annual and lin.features == ["x(t)", "x(t - dt)", "sin hour", "cos hour", "1"]
    inits = pd.date_range("2019-03-05", "2019-03-20", freq="6h")  # the test period
    now, before = truth.sel(time=inits).values, truth.sel(time=inits - dt).values
    fc = lin.forecast(now, before, inits, (len(inits), len(leads), 3, 4))
    for i, lead in enumerate(leads):  # the process is linear in these features at every lead
        np.testing.assert_allclose(fc[:, i], truth.sel(time=inits + lead).values, rtol=1e-6, atol=1e-6)
    # the fit reads nothing outside the training period: garbage there changes no coefficient
    spoiled = truth.copy()
    spoiled.loc[{"time": slice("2019-03-01", None)}] = 1e6
    assert np.array_equal(fit_linear(spoiled, period, dt, leads).coef, lin.coef)
    daily = truth.sel(time=truth.time.dt.hour == 0)  # sin(hour) = 0, cos(hour) = 1: a singular system
    assert np.isfinite(fit_linear(daily, period, pd.Timedelta("24h"), pd.to_timedelta([24], "h")).coef).all()
    spoiled = truth.copy()
    spoiled.loc[{"time": slice("2019-02-28T12", None)}] = 1e6  # inside the period: it must change
    assert not np.allclose(fit_linear(spoiled, period, dt, leads).coef, lin.coef)


def test_climatology_window_regions_and_area_weights():
    from weathermixer.evaluation import metrics as M
    from weathermixer.evaluation.baselines import ClimatologyPeriod, region_rows
    from weathermixer.evaluation.evaluate import climatology_window

    short = ClimatologyPeriod(pd.Timestamp("2019-03-01"), pd.Timestamp("2019-03-21T23"), False, False)
    long = ClimatologyPeriod(pd.Timestamp("1990-01-01"), pd.Timestamp("2005-12-31"), False, False)
    assert (
        climatology_window(short, None)[0] == 15
        and "automatic: 0.057 training year" in climatology_window(short, None)[1]
    )
    assert climatology_window(long, None) == (0, "automatic: 16 training years >= 10, no smoothing")
    assert climatology_window(short, 3) == (3, "given")
    glob = np.linspace(90, -90, 181)
    rows = region_rows(glob)
    assert set(rows) == {"global", "tropics", "extratropics", "northern_hemisphere", "southern_hemisphere"}
    assert glob[rows["tropics"]].min() == -20 and glob[rows["tropics"]].max() == 20
    assert np.all(np.abs(glob[rows["extratropics"]]) >= 20) and len(rows["northern_hemisphere"]) == 90
    assert region_rows(np.linspace(58, 50, 33)) == {}  # a regional grid covers none of them
    assert set(region_rows(np.linspace(-87.1875, 87.1875, 32))) == set(rows)
    # WeatherBench 2's get_lat_weights on a global grid: bounds -90, midpoints, 90
    for lat in (glob[::-1], np.linspace(-87.1875, 87.1875, 32)):
        b = np.deg2rad(np.concatenate([[-90], (lat[:-1] + lat[1:]) / 2, [90]]))
        wb2 = np.sin(b[1:]) - np.sin(b[:-1])
        np.testing.assert_allclose(M.latitude_weights(lat, "area"), wb2 / wb2.mean(), rtol=1e-12)
        np.testing.assert_allclose(M.latitude_weights(lat[::-1], "area"), (wb2 / wb2.mean())[::-1], rtol=1e-12)
    with pytest.raises(ValueError, match="latitude weighting 'x'"):
        M.latitude_weights(glob, "x")


# usability -----------------------------------------------------------------------------------------
def test_data_cli_set_and_computed_static_and_size_honours_the_mesh(capsys):
    from weathermixer.data.__main__ import main as data_main
    from weathermixer.model.size import main as size_main

    if not UK_GRIB.exists() or pytest.importorskip("cfgrib") is None:
        pytest.skip("the UK GRIB sample or cfgrib is missing")
    job = str(ROOT / "deepspeed_configs" / "era5_uk_t2m_cpu.json")
    assert data_main(["inspect", "--config", job, "--set", f"data.path={UK_GRIB}", "--set", "model.history=2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["history"] == 2 and out["n_times"] == 744 and out["channels"] == {"2m_temperature": "t2m"}
    assert set(out["static_computed"]) == {"sin_hour_of_day", "cos_hour_of_day", "cos_latitude", "sin_longitude"} | {
        f"daily_cycle_{term}_2m_temperature" for term in ("mean", "cos1", "sin1", "cos2", "sin2")
    }
    assert data_main(["inspect", "--config", job, "--set", "data.nope=1"]) == 2
    assert "data.nope: unknown key" in capsys.readouterr().err
    assert size_main(["--config", "quickstart_cpu"]) == 0  # the job's mesh: 1 x 2 x 2
    assert json.loads(capsys.readouterr().out)["mesh"] == "1x2x2 (dp x domain x tp)"
    assert size_main(["--config", "quickstart_cpu", "--tp", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["mesh"] == "1x2x1 (dp x domain x tp)"


# end to end on the real UK sample: the chosen re-encoding interval, the WB2-clean store, the report ----
@pytest.fixture(scope="module")
def uk_run(tmp_path_factory):
    """The UK job's whole workflow, tiny: statistics and the anchor's fit (ridge chosen on validation) over the training
    split, 6 steps (curriculum 1 -> 2 leads, fit frozen, decoder from 0), the re-encoding chosen on validation."""
    import subprocess
    import sys

    from weathermixer.data.__main__ import main as data_main
    from weathermixer.model.skip_fit import main as fit_main

    pytest.importorskip("cfgrib", reason="cfgrib (the [grib] extra) is not installed: the GRIB sample cannot be read")
    if not UK_GRIB.exists():
        pytest.skip(f"{UK_GRIB} is missing (../shared/data/real)")
    d = tmp_path_factory.mktemp("uk")
    job = json.loads((ROOT / "deepspeed_configs" / "era5_uk_t2m_cpu.json").read_text())
    wm = job["weathermixer"]
    assert wm["model"]["pixel_skip_zero_start"] and wm["model"]["pixel_skip"] == 6  # the job file's recipe
    wm["model"].update(hidden=16, blocks=1, pixel_skip_init=str(d / "fit.npz"))
    wm["train"].update(steps=6, warmup=1, curriculum=[[1, 1], [4, 2]], lead_weights=[1, 2])
    wm["data"].update(
        path=str(UK_GRIB),
        stats=str(d / "stats.json"),
        splits={"train": ["2019-03-01T01", "2019-03-05T23"], "val": ["2019-03-18T00", "2019-03-18T11"]},
    )
    wm["validation"].update(samples=4, batch=4, every=0, reencode_candidates=[1, 2], reencode_steps=3)
    wm["log"].update(dir=str(d / "run"), plot=False)
    (d / "job.json").write_text(json.dumps(job))
    env = dict(__import__("os").environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    assert (
        data_main(
            [
                "stats",
                "--config",
                str(d / "job.json"),
                "--start",
                "2019-03-01",
                "--end",
                "2019-03-05T23",
                "--out",
                str(d / "stats.json"),
            ]
        )
        == 0
    )
    assert (
        fit_main(["--config", str(d / "job.json"), "--leads", "6", "--ridge", "1e-3,1", "--out", str(d / "fit.npz")])
        == 0
    )
    run = subprocess.run(
        [sys.executable, "train.py", "--deepspeed_config", str(d / "job.json")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return {"dir": d, "stdout": run.stdout, "checkpoints": d / "run" / "checkpoints"}


def test_reencode_interval_is_chosen_on_validation_and_used_by_forecast(uk_run, tmp_path):
    import xarray as xr
    import zarr

    from weathermixer.inference import forecast

    chosen = json.loads((uk_run["checkpoints"] / "forecast_defaults.json").read_text())
    assert chosen["reencode_every"] in (1, 2) and set(chosen["mean_mse_normalised"]) == {"1", "2"}
    best = min(chosen["mean_mse_normalised"], key=chosen["mean_mse_normalised"].get)
    assert chosen["reencode_every"] == int(best) and chosen["forecast_steps"] == 3
    assert f"forecast default: re-encode every {best} step(s)" in uk_run["stdout"]
    stores = {}
    for fmt in (2, 3):
        out = tmp_path / f"fc{fmt}.zarr"
        assert (
            forecast.main(
                [
                    "--checkpoint",
                    str(uk_run["checkpoints"]),
                    "--init-times",
                    "2019-03-25T00,2019-03-25T06",
                    "--lead-hours",
                    "3",
                    "--out",
                    str(out),
                    "--zarr-format",
                    str(fmt),
                    "--quiet",
                ]
            )
            == 0
        )
        assert zarr.open_group(str(out), mode="r").metadata.zarr_format == fmt
        ds = xr.open_zarr(out, consolidated=True)  # consolidated metadata: fails if absent
        assert ds.attrs["latent_steps_per_encode"] == chosen["reencode_every"]
        assert ds.attrs["reencode_default_from"].endswith("forecast_defaults.json")
        np.testing.assert_array_equal(ds.valid_time.values, ds.time.values[:, None] + ds.prediction_timedelta.values)
        assert ds["t2m"].attrs["units"] == "K" and not any(k.startswith("GRIB_") for k in ds["t2m"].attrs)
        stores[fmt] = ds.load()
    xr.testing.assert_identical(stores[2], stores[3])


def test_ensemble_mean_of_forecast_stores(tmp_path, capsys):
    """weathermixer.inference.ensemble: the member-wise mean in the same layout; mismatched members are refused."""
    import xarray as xr

    def store(name, inits=None, leads=None):
        inits = pd.date_range("2019-03-18", periods=2, freq="3h") if inits is None else inits
        leads = pd.to_timedelta([1, 2, 3], "h") if leads is None else leads
        coords = {
            "time": inits,
            "prediction_timedelta": leads,
            "latitude": [60.0, 55, 50],
            "longitude": [-8.0, 2],
            "valid_time": (("time", "prediction_timedelta"), np.add.outer(inits.values, leads.values)),
        }
        t2m = (tuple(coords)[:4], np.random.default_rng(ord(name)).normal(280, 3, (2, 3, 3, 2)), {"units": "K"})
        ds = xr.Dataset({"t2m": t2m}, coords=coords, attrs={"latent_steps_per_encode": 6})
        ds.to_zarr(tmp_path / name, consolidated=True)
        return ds, str(tmp_path / name)

    (a, pa), (b, pb), (_, pc) = store("a"), store("b"), store("c", pd.date_range("2019-03-18T01", periods=2, freq="3h"))
    assert ens_main(["--members", pa, pb, "--out", str(tmp_path / "mean")]) == 0
    mean = xr.open_zarr(tmp_path / "mean", consolidated=True).load()
    np.testing.assert_allclose(mean["t2m"], (a["t2m"].astype(np.float64) + b["t2m"]) / 2, rtol=0, atol=1e-4)
    assert mean["t2m"].dtype == np.float32 and mean["t2m"].attrs["units"] == "K" and mean.attrs["ensemble_size"] == 2
    assert mean.valid_time.equals(a.valid_time) and mean.attrs["latent_steps_per_encode"] == 6
    assert ens_main(["--members", pa, pc, "--out", str(tmp_path / "bad")]) == 2 and not (tmp_path / "bad").exists()
    assert "coordinate 'time' differs" in capsys.readouterr().err and ens_main(["--members", pa, "--out", pb]) == 2


def test_store_drops_attributes_that_describe_the_truths_values():
    from weathermixer.inference.store import STALE_ATTRS, _attrs

    attrs = {
        "units": "K",
        "long_name": "2 metre temperature",
        "actual_range": np.array([200.0, 320.0]),
        "valid_min": 150,
        "_FillValue": np.nan,
        "GRIB_paramId": 167,
    }
    assert _attrs(attrs, STALE_ATTRS) == {"units": "K", "long_name": "2 metre temperature"}


def test_report_has_the_linear_anchor_regions_and_the_climatology_choice(uk_run, tmp_path, capsys):
    from weathermixer.evaluation import evaluate
    from weathermixer.inference import forecast

    fc = tmp_path / "fc.zarr"
    assert (
        forecast.main(
            [
                "--checkpoint",
                str(uk_run["checkpoints"]),
                "--init-times",
                "2019-03-25T00",
                "2019-03-25T12",
                "--init-every",
                "6",
                "--lead-hours",
                "6",
                "--out",
                str(fc),
                "--quiet",
            ]
        )
        == 0
    )
    out = tmp_path / "report"
    assert (
        evaluate.main(
            [
                "--forecast",
                str(fc),
                "--truth",
                str(UK_GRIB),
                "--out",
                str(out),
                "--clim-start",
                "2019-03-01",
                "--clim-end",
                "2019-03-21T23",
                "--lat-weights",
                "area",
                "--quiet",
                "--no-plots",
            ]
        )
        == 0
    )
    m = json.loads((out / "metrics.json").read_text())
    assert m["climatology"]["window_days"] == 15 and m["climatology"]["window_choice"].startswith("automatic")
    assert m["definitions"]["latitude_weighting"] == "area" and m["regions"] == {}  # the UK covers no region
    assert m["linear_baseline"]["fitted_on"] == "2019-03-01T00:00 .. 2019-03-21T23:00"
    assert m["linear_baseline"]["dt_hours"] == 1.0 and m["linear_baseline"]["samples_per_lead"]["6"] == 504 - 1 - 6
    cell = m["scores"]["t2m"]["6"]
    assert set(cell) == {"model", "persistence", "climatology", "linear"}
    summary = (out / "summary.txt").read_text()
    assert "+-15 days (automatic" in summary and "linear" in summary and "model beats all" in summary
    assert summary in capsys.readouterr().out


# the level-free anchor end to end: skip_fit (ridge chosen on validation) -> train.py with the head frozen ->
# forecast --skip-only is the fitted per-pixel linear forecast --------------------------------------------
def test_the_anchor_fit_trains_frozen_and_forecasts_alone(tmp_path):
    import subprocess
    import sys

    import xarray as xr

    from weathermixer.data.__main__ import main as data_main
    from weathermixer.data.stats import Normalizer, daily_cycle_basis
    from weathermixer.inference import forecast
    from weathermixer.model.skip_fit import main as fit_main

    pytest.importorskip("cfgrib", reason="cfgrib (the [grib] extra) is not installed: the GRIB sample cannot be read")
    if not UK_GRIB.exists():
        pytest.skip(f"{UK_GRIB} is missing (../shared/data/real)")
    job = json.loads((ROOT / "deepspeed_configs" / "era5_uk_t2m_cpu.json").read_text())
    wm = job["weathermixer"]
    wm["model"].update(hidden=16, blocks=1, pixel_skip=2, pixel_skip_inputs="changes", pixel_skip_day=24)
    wm["train"].update(
        steps=2,
        warmup=0,
        curriculum=[[1, 2]],
        lead_weights=[1, 1],
        param_groups=[
            {"match": ["skip.*"], "lr_scale": 0, "weight_decay": 0},
            {"match": ["*.bias", "*norm*"], "weight_decay": 0},
        ],
    )
    wm["data"].update(
        path=str(UK_GRIB),
        stats=str(tmp_path / "stats.json"),
        splits={"train": ["2019-03-01T01", "2019-03-05T23"], "val": ["2019-03-08T00", "2019-03-08T23"]},
    )
    wm["validation"].update(samples=4, batch=4, every=0, reencode_candidates=[2], reencode_steps=2)
    wm["log"].update(dir=str(tmp_path / "run"), plot=False)
    (tmp_path / "job.json").write_text(json.dumps(job))
    assert (
        data_main(
            [
                "stats",
                "--config",
                str(tmp_path / "job.json"),
                "--start",
                "2019-03-01",
                "--end",
                "2019-03-05T23",
                "--out",
                str(tmp_path / "stats.json"),
            ]
        )
        == 0
    )
    fit = tmp_path / "fit.npz"
    assert (
        fit_main(["--config", str(tmp_path / "job.json"), "--leads", "2", "--ridge", "1e-3,10", "--out", str(fit)]) == 0
    )
    f = np.load(fit)
    assert f["val_mse"].shape == (2, 2) and float(f["ridge"]) == [1e-3, 10][int(np.argmin(f["val_mse"].mean(1)))]
    assert list(f["features"]) == [
        "x(t - dt) - x(t)",
        "daily-cycle climatology at t + l dt - at t",
        "sin_hour_of_day",
        "cos_hour_of_day",
    ]
    wm["model"]["pixel_skip_init"] = str(fit)
    (tmp_path / "job.json").write_text(json.dumps(job))
    env = dict(__import__("os").environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    run = subprocess.run(
        [sys.executable, "train.py", "--deepspeed_config", str(tmp_path / "job.json")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = tmp_path / "fc.zarr"
    inits = pd.DatetimeIndex(["2019-03-25T05", "2019-03-25T17"])
    assert (
        forecast.main(
            [
                "--checkpoint",
                str(tmp_path / "run" / "checkpoints"),
                "--init-times",
                ",".join(f"{t:%Y-%m-%dT%H}" for t in inits),
                "--lead-hours",
                "2",
                "--out",
                str(out),
                "--skip-only",
                "--quiet",
            ]
        )
        == 0
    )
    fc = xr.open_zarr(out)
    assert fc.attrs["model_part"].startswith("the per-pixel skip head alone")

    # the same forecast written out: x(t) + w_l . features, in the model's normalised units
    truth = xr.open_dataset(UK_GRIB, engine="cfgrib", backend_kwargs={"indexpath": ""})["t2m"]
    norm = Normalizer.load(str(tmp_path / "stats.json"))
    mean, std = (float(a[0]) for a in norm.fields(["2m_temperature"]))
    cycle = np.stack(
        [norm.daily_cycle("2m_temperature", t, (33, 49))[0] for t in ("mean", "cos1", "sin1", "cos2", "sin2")]
    )  # physical, rows as the data's
    assert np.all(np.diff(truth.latitude.values) < 0)  # north first, as the loader and the stats hold it
    coef = f["coef"][:, :, 0]  # (lead, F, lat, lon)
    for i, t in enumerate(inits):
        x, xm1 = (truth.sel(time=s).values.astype(np.float64) for s in (t, t - pd.Timedelta(hours=1)))
        hour = 2 * np.pi * t.hour / 24
        for lead in (1, 2):
            clim = [np.einsum("k,khw->hw", daily_cycle_basis([s])[0], cycle) for s in (t + pd.Timedelta(hours=lead), t)]
            feats = [
                (xm1 - x) / std,
                (clim[0] - clim[1]) / std,
                np.full_like(x, np.sin(hour)),
                np.full_like(x, np.cos(hour)),
            ]
            expected = x + std * sum(c * v for c, v in zip(coef[lead - 1], feats, strict=True))
            got = fc["t2m"].isel(time=i, prediction_timedelta=lead - 1).values
            np.testing.assert_allclose(got, expected, atol=2e-3)  # K; float32 model
    assert mean > 0  # the stats are physical (K)
