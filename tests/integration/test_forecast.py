"""weathermixer.forecast end to end: a model trained by train.py beats persistence at 6 h and 24 h
(train -> forecast -> evaluate), the same forecast on the 1x2x2 and 2x1x2 meshes as on one process,
the WeatherBench 2 layout of the store, and every bad input named."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import zarr

from jigsaw_ext.checkpoint import consolidate
from jigsaw_ext.testing import run_workers
from weathermixer.data.synth import write_synthetic
from weathermixer.evaluation import evaluate
from weathermixer.inference import forecast

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "deepspeed_configs" / "quickstart_cpu.json"
ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="2", DS_ACCELERATOR="cpu")
STEPS = 80
VAL_START, END = "2020-02-15", "2020-02-29 18:00"
HEADLINE = {
    "z500": "geopotential@500",
    "t850": "temperature@850",
    "t2m": "2m_temperature",
    "u10": "10m_u_component_of_wind",
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """The quickstart model (32 x 64 grid, 1 x 8 patches, D = 64, 2 blocks, latent rollout of up to
    K = 2 leads) with hour-of-day features, trained for STEPS steps in one process on two months of
    synthetic data; validation (the forecasts' init times) from VAL_START."""
    tmp = tmp_path_factory.mktemp("forecast")
    j = json.loads(CONFIG.read_text())
    w = j["weathermixer"]
    w["model"]["channels"] = {"static": ["land_sea_mask", "orography", "sin_hour_of_day", "cos_hour_of_day"]}
    w["data"].update(path=str(tmp / "synthetic"), end=END, val_start=VAL_START)
    # the project's default loss rows (cell areas, as evaluate scores), not the quickstart's uniform rows:
    # after 80 steps uniform rows leave t850 at 24 h behind persistence in area-weighted scores
    w["loss"]["latitude_weights"] = "area"
    w["train"].update(steps=STEPS, lr=3e-3, warmup=10, rollout=2)
    w["validation"].update(samples=8, every=0)
    w["log"].update(every=STEPS, tensorboard=False, plot=False)
    w["checkpoint"].update(every=0, resume="never")
    (tmp / "job.json").write_text(json.dumps(j))
    run = subprocess.run(
        [
            sys.executable,
            "train.py",
            "--deepspeed_config",
            str(tmp / "job.json"),
            "--domain",
            "1",
            "--tp",
            "1",
            "--output-dir",
            str(tmp / "run"),
        ],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    store = next((tmp / "synthetic").glob("*.zarr"))
    return {"checkpoint": tmp / "run" / "checkpoints", "store": store, "tmp": tmp}


def _forecast(trained, out, *args, inits=f"{VAL_START}T00,2020-02-20T06,2020-02-25T18", lead=24) -> Path:
    argv = [
        "--checkpoint",
        str(trained["checkpoint"]),
        "--init-times",
        *inits.split(" "),
        "--lead-hours",
        str(lead),
        "--out",
        str(out),
        "--quiet",
        *args,
    ]
    assert forecast.main(argv) == 0
    return Path(out)


def test_trained_model_beats_persistence_end_to_end(trained, tmp_path):
    group = zarr.open_group(str(trained["store"]), mode="r+")  # attributes to be carried over
    group["2m_temperature"].attrs.update(units="K", long_name="2 metre temperature")
    group["latitude"].attrs.update(units="degrees_north")
    fc_path = _forecast(
        trained, tmp_path / "fc.zarr", "--init-every", "12", "--batch", "8", inits=f"{VAL_START} 2020-02-27T12"
    )
    assert not (tmp_path / "fc.zarr.partial").exists()

    # the WeatherBench 2 forecast layout, with the data set's names, latitude order and attributes
    fc = xr.open_zarr(fc_path, chunks=None, consolidated=False)
    truth = xr.open_zarr(trained["store"], chunks=None, consolidated=False)
    assert list(fc[evaluate.LEAD].values) == list(pd.to_timedelta([6, 12, 18, 24], "h"))
    assert list(fc.time.values) == list(pd.date_range(VAL_START, "2020-02-27T12", freq="12h"))
    assert set(fc.data_vars) == {
        "2m_temperature",
        "10m_u_component_of_wind",
        "10m_v_component_of_wind",
        "mean_sea_level_pressure",
        "geopotential",
        "temperature",
    }
    assert fc["geopotential"].dims == ("time", "prediction_timedelta", "level", "latitude", "longitude")
    assert fc["2m_temperature"].dims == ("time", "prediction_timedelta", "latitude", "longitude")
    np.testing.assert_array_equal(fc.latitude.values, truth.latitude.values)
    assert fc["2m_temperature"].attrs == {"units": "K", "long_name": "2 metre temperature"}
    assert fc.latitude.attrs["units"] == "degrees_north"
    np.testing.assert_array_equal(fc.level.values, [500, 850])
    assert fc.attrs["checkpoint_step"] == STEPS and fc.attrs["latent_steps_per_encode"] == 2
    assert bool(np.isfinite(fc["geopotential"].values).all())
    # physical units: 500 hPa geopotential near its synthetic mean of ~5.5e4 m^2/s^2
    assert 4e4 < float(fc["geopotential"].sel(level=500).mean()) < 7e4

    assert (
        evaluate.main(
            [
                "--forecast",
                str(fc_path),
                "--truth",
                str(trained["store"]),
                "--out",
                str(tmp_path / "report"),
                "--no-plots",
                "--quiet",
            ]
        )
        == 0
    )
    scores = json.loads((tmp_path / "report" / "metrics.json").read_text())["scores"]
    ratios = {
        f"{label}@{lead}h": scores[key][lead]["model"]["rmse"] / scores[key][lead]["persistence"]["rmse"]
        for label, key in HEADLINE.items()
        for lead in ("6", "24")
    }
    assert max(ratios.values()) < 1.0, ratios


def test_units_and_plain_progress_lines_in_a_log_file(trained, tmp_path):
    """`python -m weathermixer.forecast` and `python -m weathermixer.evaluate` with their output going to
    a log file (not a terminal): plain progress lines, no carriage-return redraws; every forecast
    variable has a `units` attribute, from the data set or, where it has none, from the known variables."""
    from weathermixer.data.units import KNOWN_UNITS

    store = tmp_path / "truth.zarr"
    xr.open_zarr(trained["store"], chunks=None, consolidated=False).to_zarr(store, consolidated=False)
    group = zarr.open_group(str(store), mode="r+")
    assert group["temperature"].attrs["units"] == "K"  # the synthetic data carry units
    del group["temperature"].attrs["units"]  # a data set without them
    group["2m_temperature"].attrs.update(units="kelvin")  # the data set's own spelling is kept
    fc_path, log = tmp_path / "fc.zarr", tmp_path / "forecast.log"
    with open(log, "w") as out:
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "weathermixer.forecast",
                "--checkpoint",
                str(trained["checkpoint"]),
                "--init-times",
                f"{VAL_START}T00,2020-02-20T06,2020-02-25T18",
                "--lead-hours",
                "12",
                "--data-path",
                str(store),
                "--out",
                str(fc_path),
            ],
            cwd=ROOT,
            env=ENV,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=600,
        )
    text = log.read_text()
    assert run.returncode == 0, text[-3000:]
    assert "\r" not in text and "forecast: 3/3 init(s)" in text, text[-2000:]
    fc = xr.open_zarr(fc_path, chunks=None, consolidated=False)
    units = {v: fc[v].attrs.get("units") for v in fc.data_vars}
    assert units == {**{v: KNOWN_UNITS[v] for v in fc.data_vars}, "2m_temperature": "kelvin"}, units
    log = tmp_path / "evaluate.log"
    with open(log, "w") as out:
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "weathermixer.evaluate",
                "--forecast",
                str(fc_path),
                "--truth",
                str(store),
                "--out",
                str(tmp_path / "report"),
                "--no-plots",
            ],
            cwd=ROOT,
            env=ENV,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=600,
        )
    text = log.read_text()
    assert run.returncode == 0, text[-3000:]
    assert "\r" not in text and f"evaluate: {len(fc.data_vars)}/{len(fc.data_vars)} variable(s)" in text, text[-2000:]


def test_forecast_equals_a_rollout_written_out_by_hand(trained, tmp_path):
    """One init, 24 h, against the model called directly on the store's fields: normalisation with
    the training statistics, rows north to south, hour-of-day features at the valid time of each
    encoding (00 UTC, then 12 UTC), two leads per encoding, de-normalisation, latitude order."""
    import torch

    from jigsaw_ext.checkpoint import load_into_model, read_job_info
    from weathermixer.config import ModelConfig
    from weathermixer.model import WeatherMixer

    init = pd.Timestamp("2020-02-20T00")
    fc = xr.open_zarr(_forecast(trained, tmp_path / "fc.zarr", inits="2020-02-20T00"), chunks=None, consolidated=False)
    cfg = ModelConfig(**read_job_info(trained["checkpoint"])["model"])
    model = WeatherMixer(cfg)
    load_into_model(model, trained["checkpoint"])
    stats = json.loads(Path(str(trained["store"]) + ".stats.json").read_text())
    truth = xr.open_zarr(trained["store"], chunks=None, consolidated=False).sortby("latitude", ascending=False)
    names = cfg.channels.names
    mean = np.array([stats["channels"][n]["mean"] for n in names])[:, None, None]
    std = np.array([stats["channels"][n]["std"] for n in names])[:, None, None]
    x0 = np.stack(
        [
            truth[n].sel(time=init).values
            if n in truth
            else truth[n.rsplit("_", 1)[0]].sel(time=init, level=int(n.rsplit("_", 1)[1])).values
            for n in names
        ]
    )
    x = torch.tensor((x0 - mean) / std, dtype=torch.float32)[None]

    def static(t):
        fixed = [
            (truth[v].values - stats["static"][n]["mean"]) / stats["static"][n]["std"]
            for n, v in (("land_sea_mask", "land_sea_mask"), ("orography", "geopotential_at_surface"))
        ]
        phase = 2 * np.pi * t.hour / 24
        hour = [np.full(x0.shape[1:], f(phase)) for f in (np.sin, np.cos)]
        return torch.tensor(np.stack(fixed + hour), dtype=torch.float32)[None]

    with torch.no_grad():
        leads = model.forecast_leads(x, static(init), 2)
        leads += model.forecast_leads(leads[-1], static(init + pd.Timedelta(hours=12)), 2)
    expect = np.stack([lead[0].numpy() for lead in leads])  # (lead, channel, north..south, lon), normalised
    got = np.stack(
        [
            fc[n].isel(time=0).values
            if n in fc
            else fc[n.rsplit("_", 1)[0]].sel(level=int(n.rsplit("_", 1)[1])).isel(time=0).values
            for n in names
        ],
        axis=1,
    )[:, :, ::-1]  # the store is south..north like the data set
    # in normalised units: float32 storage of ~1e5 Pa pressures alone rounds to ~7e-6 of their std
    np.testing.assert_allclose((got - mean) / std, expect, rtol=0, atol=2e-5)


def _on_meshes(rank, world, runs):
    return [forecast.main(argv) for argv in runs]


def test_forecast_is_the_same_on_every_mesh(trained, tmp_path):
    """1x2x2 (domain x tp: every rank reads a quarter of the initial state, rank 0 gathers and writes)
    and 2x1x2 (two replicas writing disjoint init times) against one process: three inits in
    batches of 2 (an uneven last batch), 24 h, re-encoding every 2 steps (hour-of-day features at
    the valid time of each encoding) and the latent rollout (its one-process reference loaded from
    the consolidated checkpoint)."""
    common = ["--batch", "2"]
    _forecast(trained, tmp_path / "ref-autoregressive.zarr", *common)
    # the latent reference reads the layout-free (consolidated) form of the same checkpoint
    consolidated = consolidate(trained["checkpoint"], tmp_path / "consolidated", log=None)
    _forecast({"checkpoint": consolidated}, tmp_path / "ref-latent.zarr", *common, "--mode", "latent")
    base = ["--checkpoint", str(trained["checkpoint"]), "--lead-hours", "24", "--quiet", *common, "--init-times"]
    inits = f"{VAL_START}T00,2020-02-20T06,2020-02-25T18"
    runs = [
        base + [inits, "--domain", "2", "--tp", "2", "--out", str(tmp_path / "1x2x2-autoregressive.zarr")],
        base + [inits, "--dp", "2", "--tp", "2", "--out", str(tmp_path / "2x1x2-latent.zarr"), "--mode", "latent"],
        # bad input on 4 ranks (found once the data set is open): exit code 2 on every rank, no hang
        base + ["2021-01-01T00", "--domain", "2", "--tp", "2", "--out", str(tmp_path / "bad.zarr")],
    ]
    codes = run_workers(
        _on_meshes,
        4,
        runs,
        timeout=240,
        preload=["weathermixer.forecast", "xarray", "zarr", "megatron.core.hyper_comm_grid"],
    )
    assert codes == [[0, 0, 2]] * 4
    for name, mode in (("1x2x2", "autoregressive"), ("2x1x2", "latent")):
        ref = xr.open_zarr(tmp_path / f"ref-{mode}.zarr", chunks=None, consolidated=False)
        got = xr.open_zarr(tmp_path / f"{name}-{mode}.zarr", chunks=None, consolidated=False)
        assert set(got.data_vars) == set(ref.data_vars)
        for v in ref.data_vars:
            a, b = got[v].values, ref[v].values
            assert np.isfinite(a).all(), (name, v)  # every chunk written
            # 1e-6 relative: a few float32 ulps of the stored value (mean sea level pressure ~1e5 Pa
            # is stored to 0.008 Pa); 1e-5 of the variable's spread for values near zero (winds)
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-5 * float(b.std()), err_msg=f"{name} {v}")
    assert not (tmp_path / "bad.zarr").exists()


@pytest.fixture(scope="module")
def mismatched(trained) -> dict:
    """A data set without 'temperature' on the model's grid, and statistics without any channel."""
    tmp = trained["tmp"]
    path = tmp / "no_temperature.zarr"
    write_synthetic(
        str(path),
        (32, 64),
        "2020-02-01",
        "2020-02-03",
        6.0,
        [
            "2m_temperature",
            "10m_u_component_of_wind",
            "10m_v_component_of_wind",
            "mean_sea_level_pressure",
            "geopotential",
        ],
        [500, 850],
    )
    (tmp / "empty_stats.json").write_text(json.dumps({"channels": {}, "static": {}}))
    return {"no_temperature": path, "empty_stats": tmp / "empty_stats.json"}


BAD = {
    "init-before-data": (
        ["--init-times", "2019-12-31T00,2020-02-20T00"],
        ["2019-12-31T00:00", "outside", "2020-01-01T00:00 .. "],
    ),
    "init-off-the-time-axis": (["--init-times", "2020-02-20T03"], ["2020-02-20T03:00", "every 6 h"]),
    "init-range-without-step": (["--init-times", "2020-02-20", "2020-02-21"], ["--init-every"]),
    "lead-not-a-multiple": (["--lead-hours", "10"], ["--lead-hours 10", "model step 6 h"]),
    "mesh-not-the-world": (["--dp", "2"], ["--dp 2", "= 2 ranks", "world size 1"]),
    "missing-variable": (
        ["--data-path", "{no_temperature}", "--stats", "{empty_stats}"],
        ["variable 'temperature' for model channel 'temperature' not found", "does not match the data set"],
    ),
    "statistics-without-channels": (["--stats", "{empty_stats}"], ["no channels statistics", "2m_temperature"]),
    "not-a-checkpoint": (["--checkpoint", "{tmp}"], ["--checkpoint", "neither a checkpoint"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_named(case, trained, mismatched, tmp_path, capsys):
    extra, expected = BAD[case]
    paths = {**{k: str(v) for k, v in mismatched.items()}, "tmp": str(tmp_path)}
    extra = [a.format(**paths) for a in extra]
    argv = [
        "--checkpoint",
        str(trained["checkpoint"]),
        "--init-times",
        "2020-02-20T00",
        "--lead-hours",
        "24",
        "--out",
        str(tmp_path / "fc.zarr"),
        "--quiet",
    ]
    for flag in ("--checkpoint", "--init-times", "--lead-hours"):  # the case's value replaces the default
        if flag in extra:
            i = argv.index(flag)
            del argv[i : i + 2]
    assert forecast.main(argv + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for text in expected:
        assert text in err, (text, err)
    assert not (tmp_path / "fc.zarr").exists()


def test_existing_output_is_kept(trained, tmp_path, capsys):
    out = tmp_path / "fc.zarr"
    out.mkdir()
    assert (
        forecast.main(
            [
                "--checkpoint",
                str(trained["checkpoint"]),
                "--init-times",
                "2020-02-20T00",
                "--lead-hours",
                "6",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 2
    )
    assert "exists" in capsys.readouterr().err and out.is_dir()
