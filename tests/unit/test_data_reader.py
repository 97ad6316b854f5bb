"""Reader, name mapping, statistics, CLI and error messages of weathermixer.data (single process)."""

import json

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from jigsaw_ext.mesh import Mesh, MeshConfig
from weathermixer.config import ChannelsConfig, ConfigError, ModelConfig, parse
from weathermixer.data import DataConfig, DataError, DataJobConfig, GriddedDataset, ShardedSampleLoader, load_data_job
from weathermixer.data.__main__ import main as cli
from weathermixer.data.reader import NonFiniteWarning
from weathermixer.data.synth import write_synthetic
from weathermixer.grid import MeshMismatch

CH = ChannelsConfig(
    surface=["2m_temperature", "mean_sea_level_pressure"],
    atmospheric=["geopotential", "temperature"],
    levels=[500, 850],
    static=["land_sea_mask", "orography"],
)
MODEL = ModelConfig(grid=(32, 64), channels=CH)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("era5") / "synth.zarr"
    write_synthetic(
        str(path),
        (32, 64),
        "2020-01-01",
        "2020-01-08",
        6.0,
        ["2m_temperature", "mean_sea_level_pressure", "geopotential", "temperature"],
        [500, 700, 850],
    )
    return str(path)


def test_wb2_layout_and_latitude_normalised_north_to_south(store, tmp_path):
    raw = xr.open_zarr(store, chunks=None, consolidated=False)
    assert raw.latitude.values[0] < raw.latitude.values[-1]  # written ascending like WB2
    assert 5.0e4 < float(raw.geopotential.sel(level=500).mean()) < 6.0e4
    assert 240 < float(raw.temperature.sel(level=850).mean()) < 290
    data = GriddedDataset(DataConfig(path=store), CH, (32, 64))
    assert data.flip and data.lat[0] == 90 and data.lat[-1] == -90 and data.k == 1
    x = data.read_fields(3, slice(4, 20), slice(None))
    ref = raw.temperature.isel(time=3).sel(level=850).values[::-1][4:20]
    np.testing.assert_array_equal(x[CH.names.index("temperature_850")], ref)
    # a descending store gives the same rows without flipping
    desc = tmp_path / "desc.zarr"
    raw.isel(latitude=slice(None, None, -1)).to_zarr(desc, consolidated=False)
    d2 = GriddedDataset(DataConfig(path=str(desc)), CH, (32, 64))
    assert not d2.flip
    np.testing.assert_array_equal(d2.read_fields(3, slice(4, 20), slice(None)), x)


@pytest.mark.parametrize("fmt", ["zarr", "netcdf"])
def test_any_gridded_dataset_via_mapping_hourly_odd_grid(tmp_path, fmt):
    times = pd.date_range("2021-06-01", periods=30, freq="1h")
    lat, lon = np.linspace(30, 54, 25), np.linspace(-10, 16, 53)
    val = np.random.default_rng(0).normal(280, 5, (30, 25, 53)).astype(np.float32)
    ds = xr.Dataset(
        {"tas": (("t", "y", "x"), val), "z_sfc": (("y", "x"), np.ones((25, 53), np.float32))},
        coords={"t": times, "y": lat, "x": lon},
    )
    if fmt == "netcdf":
        path = tmp_path / "regional.nc"
        ds.to_netcdf(path, engine="h5netcdf")  # netCDF4/HDF5, read back with the project's h5netcdf
    else:
        path = tmp_path / "regional.zarr"
        ds.to_zarr(path, consolidated=False)
    ch = ChannelsConfig(surface=["t2m"], atmospheric=[], levels=[], static=["orography", "cos_latitude"])
    model = ModelConfig(grid=(25, 53), patch=(1, 1), channels=ch)
    cfg = DataConfig(
        path=str(path),
        variables={"t2m": "tas", "orography": "z_sfc"},
        dims={"time": "t", "latitude": "y", "longitude": "x"},
        dt_hours=3,
        step_hours=1,
        leads=2,
    )
    loader = ShardedSampleLoader(cfg, model, Mesh.single(), split="train", batch=2, shuffle=False)
    f, s, tg, t = next(iter(loader))
    assert f.shape == (2, 1, 25, 53) and s.shape == (2, 2, 25, 53) and len(tg) == 2
    assert list(loader.lat) == sorted(lat, reverse=True) and np.allclose(loader.lon, lon)
    np.testing.assert_allclose(f[0, 0].numpy(), val[0, ::-1])
    np.testing.assert_allclose(tg[1][0, 0].numpy(), val[6, ::-1])  # t + 2 * 3 h
    np.testing.assert_allclose(s[0, 1, :, 0].numpy(), np.cos(np.deg2rad(lat[::-1])), rtol=1e-6)
    assert t[0] == times[0] and len(loader.starts) == 30 - 6


def test_stats_streaming_matches_numpy_and_cli(store, tmp_path):
    job = {
        "weathermixer": {
            "model": MODEL.model_dump(mode="json"),
            "train": {"steps": 1},
            "data": {"path": store, "dt_hours": 12},
        }
    }
    (tmp_path / "job.json").write_text(json.dumps(job))
    out = tmp_path / "stats.json"
    assert (
        cli(
            [
                "stats",
                "--config",
                str(tmp_path / "job.json"),
                "--start",
                "2020-01-02",
                "--end",
                "2020-01-05T18",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    stats = json.loads(out.read_text())
    raw = xr.open_zarr(store, chunks=None, consolidated=False).sel(time=slice("2020-01-02", "2020-01-05T18"))
    z = raw.geopotential.sel(level=850).values.astype(np.float64)
    s = stats["channels"]["geopotential_850"]
    assert s["variable"] == "geopotential" and s["level"] == 850 and stats["time_steps"] == 16
    np.testing.assert_allclose([s["mean"], s["std"]], [z.mean(), z.std()], rtol=1e-6)
    np.testing.assert_allclose(s["diff_std"], (z[2:] - z[:-2]).std(), rtol=1e-6)  # dt = 12 h = 2 steps
    oro = raw.geopotential_at_surface.values
    np.testing.assert_allclose(stats["static"]["orography"]["std"], oro.std(), rtol=1e-5)
    # the loader applies them: training-period fields come out ~ standardised
    cfg = DataConfig(path=store, dt_hours=12, stats=str(out), splits={"train": ["2020-01-02", "2020-01-05T18"]})
    loader = ShardedSampleLoader(cfg, MODEL, Mesh.single(), batch=4, shuffle=False)
    f = next(iter(loader)).fields
    assert abs(float(f.mean())) < 0.5 and 0.5 < float(f.std()) < 1.5
    # inspect prints the mapping
    assert cli(["inspect", "--config", str(tmp_path / "job.json")]) == 0


def test_synth_cli_variables_levels_step(tmp_path, capsys):
    out = tmp_path / "s.zarr"
    assert (
        cli(
            [
                "synth",
                "--out",
                str(out),
                "--grid",
                "8x16",
                "--start",
                "2020-01-01",
                "--end",
                "2020-01-02",
                "--step-hours",
                "3",
                "--variables",
                "2m_temperature",
                "specific_humidity",
                "--levels",
                "1000",
            ]
        )
        == 0
    )
    ds = xr.open_zarr(out, chunks=None, consolidated=False)
    assert dict(ds.sizes) == {"time": 9, "latitude": 8, "longitude": 16, "level": 1}
    assert ds.specific_humidity.encoding["chunks"] == (1, 1, 8, 16)
    with pytest.raises(SystemExit):
        cli(["synth", "--out", str(out), "--grid", "8by16"])
    assert "--grid '8by16'" in capsys.readouterr().err


# ---- errors ------------------------------------------------------------------------------------
def _err(store, match, channels=CH, grid=(32, 64), **cfg):
    with pytest.raises(DataError, match=match):
        GriddedDataset(DataConfig(path=store, **cfg), channels, grid)


def test_errors_name_variable_level_dimension(store):
    _err(
        store,
        r"variable 'tp' for model channel 'precip' \(data.variables maps",
        variables={"precip": "tp"},
        channels=ChannelsConfig(surface=["precip"], atmospheric=[], levels=[], static=[]),
    )
    _err(
        store,
        r"variable 'specific_humidity' for model channel 'specific_humidity' not found",
        channels=ChannelsConfig(surface=[], atmospheric=["specific_humidity"], static=[]),
    )
    _err(
        store,
        r"level 300 of variable 'geopotential' not in the level coordinate 'level' \[500.0, 700.0, 850.0\]",
        channels=ChannelsConfig(surface=[], levels=[300], static=[]),
    )
    _err(store, r"no dimension 'lat' \(data.dims.latitude\)", dims={"latitude": "lat"})
    _err(
        store,
        r"variable 'temperature' has dimensions .*missing \['level'\]|variable 'geopotential' has dim",
        channels=ChannelsConfig(surface=["geopotential"], atmospheric=[], levels=[], static=[]),
    )
    _err(store, r"grid \(latitude, longitude\) = \(32, 64\) but model.grid is \[16, 64\]", grid=(16, 64))
    with pytest.raises(DataError, match="data set not found"):
        GriddedDataset(DataConfig(path=store + "_missing"), CH, (32, 64))


def test_errors_time_axis(store, tmp_path):
    _err(store, r"time step is 6 h but data.step_hours=3", step_hours=3)
    _err(store, r"data.dt_hours=9 is not a multiple of the time step 6 h", dt_hours=9)
    with pytest.raises(ConfigError, match=r"data.dt_hours=9 is not a multiple of data.step_hours=6"):
        parse(DataConfig, {"path": store, "dt_hours": 9, "step_hours": 6})
    raw = xr.open_zarr(store, chunks=None, consolidated=False)
    gap = tmp_path / "gap.zarr"
    raw.drop_isel(time=[10, 11]).to_zarr(gap, consolidated=False)
    _err(
        str(gap), r"gap in the time axis between 2020-01-03 06:00:00 and 2020-01-04 00:00:00 \(18 h; the step is 6 h\)"
    )
    data = GriddedDataset(DataConfig(path=store, dt_hours=24), CH, (32, 64))
    with pytest.raises(DataError, match=r"29 time steps .* too few for 8 lead\(s\) .* need at least 33"):
        data.sample_starts("train", leads=8, history=0)
    with pytest.raises(DataError, match=r"split 'val' \(2021-01-01"):
        GriddedDataset(
            DataConfig(path=store, splits={"val": ["2021-01-01", "2021-02-01"]}), CH, (32, 64)
        ).sample_starts("val", 1, 0)


def test_nonfinite_named_or_masked(store, tmp_path):
    raw = xr.open_zarr(store, chunks=None, consolidated=False).load()
    raw["temperature"][5, 2, 31, 7] = np.nan  # time 5, level 850, store row 31 = latitude 90 (ascending)
    bad = tmp_path / "nan.zarr"
    raw.to_zarr(bad, consolidated=False)
    ld = ShardedSampleLoader(DataConfig(path=str(bad), prefetch=0), MODEL, Mesh.single(), batch=1, shuffle=False)
    with pytest.raises(
        DataError,
        match=r"non-finite value nan in 'temperature_850' at time 2020-01-02 06:00:00, "
        r"latitude 90, longitude 39.375",
    ):
        ld.load_batch([4])
    ld = ShardedSampleLoader(DataConfig(path=str(bad), nonfinite="zero"), MODEL, Mesh.single(), shuffle=False)
    with pytest.warns(NonFiniteWarning, match="'temperature_850' at time 2020-01-02T06:00, latitude 90"):
        assert ld.load_batch([4]).targets[0][0, CH.names.index("temperature_850"), 0, 7] == 0


def test_config_and_mesh_errors(store, tmp_path):
    with pytest.raises(ConfigError, match=r"data.bogus: unknown key; allowed keys here: .*dt_hours"):
        parse(DataJobConfig, {"data": {"path": store, "bogus": 1}})
    with pytest.raises(ConfigError, match="data.path is empty"):
        parse(DataConfig, {})
    (tmp_path / "j.json").write_text(json.dumps({"weathermixer": {"model": {}}}))
    with pytest.raises(ConfigError, match="weathermixer.data is missing"):
        load_data_job(tmp_path / "j.json")
    with pytest.raises(MeshMismatch, match="mesh.domain=8 exceeds the 4 patch rows"):
        ShardedSampleLoader(
            DataConfig(path=store),
            ModelConfig(grid=(32, 64), patch=(8, 8), channels=CH),
            Mesh.virtual(MeshConfig(domain=8)),
        )
    with pytest.raises(
        DataError, match=r"split 'train': 28 samples are fewer than one global batch \(batch 8 x dp 4\)"
    ):
        ShardedSampleLoader(DataConfig(path=store), MODEL, Mesh.virtual(MeshConfig(dp=4)), batch=8)


def test_remote_url_needs_fsspec_extras():
    with pytest.raises(DataError, match=r"cannot open gs://bucket/era5.zarr: .*gcsfs"):
        GriddedDataset(DataConfig(path="gs://bucket/era5.zarr"), CH, (32, 64))


def _daily_cycle_store(tmp_path):
    """Hourly 2 m temperature with a known per-pixel daily cycle (amplitude and phase vary by pixel)."""
    times = pd.date_range("2021-03-01", periods=24 * 6, freq="1h")
    lat, lon = np.linspace(50, 58, 5), np.linspace(-6, 2, 7)
    rng = np.random.default_rng(1)
    mean, a1, b1 = (rng.normal(280, 3, (5, 7)), rng.normal(0, 4, (5, 7)), rng.normal(0, 2, (5, 7)))
    om = 2 * np.pi * times.hour.values / 24
    val = (
        mean + a1 * np.cos(om)[:, None, None] + b1 * np.sin(om)[:, None, None] + rng.normal(0, 0.01, (len(times), 5, 7))
    )
    ds = xr.Dataset(
        {"t2m": (("time", "latitude", "longitude"), val.astype(np.float32))},
        coords={"time": times, "latitude": lat, "longitude": lon},
    )
    path = tmp_path / "hourly.zarr"
    ds.to_zarr(path, consolidated=False)
    # rows north to south, as the model sees them
    return str(path), mean[::-1], a1[::-1], b1[::-1]


def test_daily_cycle_static_inputs_from_training_period_stats(tmp_path):
    path, mean, a1, b1 = _daily_cycle_store(tmp_path)
    static = [
        "daily_cycle_mean_2m_temperature",
        "daily_cycle_cos1_2m_temperature",
        "daily_cycle_sin1_2m_temperature",
        "daily_cycle_cos2_2m_temperature",
        "cos_latitude",
    ]
    ch = ChannelsConfig(surface=["2m_temperature"], atmospheric=[], levels=[], static=static)
    model = ModelConfig(grid=(5, 7), patch=(1, 1), channels=ch)
    splits = {"train": ["2021-03-01", "2021-03-03T23"], "val": ["2021-03-05", "2021-03-05T12"]}
    job = {
        "weathermixer": {
            "model": model.model_dump(mode="json"),
            "data": {"path": path, "dt_hours": 1, "variables": {"2m_temperature": "t2m"}, "splits": splits},
        }
    }
    (tmp_path / "job.json").write_text(json.dumps(job))
    out = tmp_path / "stats.json"
    assert (
        cli(
            [
                "stats",
                "--config",
                str(tmp_path / "job.json"),
                "--start",
                "2021-03-01",
                "--end",
                "2021-03-03T23",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    stats = json.loads(out.read_text())
    dc = stats["daily_cycle"]
    assert (dc["start"], dc["end"]) == ("2021-03-01 00:00:00", "2021-03-03 23:00:00") and len(dc["hours_seen"]) == 24
    coef = dc["channels"]["2m_temperature"]
    np.testing.assert_allclose(coef["mean"], mean, atol=0.01)
    np.testing.assert_allclose(coef["cos1"], a1, atol=0.01)
    np.testing.assert_allclose(coef["sin1"], b1, atol=0.01)
    np.testing.assert_allclose(coef["cos2"], 0, atol=0.01)
    # the loader serves them normalised like the channel (mean term by mean and std, harmonics by std)
    cfg = DataConfig(path=path, dt_hours=1, variables={"2m_temperature": "t2m"}, stats=str(out), splits=splits, leads=2)
    s = next(iter(ShardedSampleLoader(cfg, model, Mesh.single(), batch=3, shuffle=False))).static
    m, sd = stats["channels"]["2m_temperature"]["mean"], stats["channels"]["2m_temperature"]["std"]
    assert s.shape == (3, 5, 5, 7)
    np.testing.assert_allclose(s[1, 0].numpy(), (mean - m) / sd, atol=0.01 / sd)
    np.testing.assert_allclose(s[2, 1].numpy(), a1 / sd, atol=0.01 / sd)
    np.testing.assert_allclose(s[0, 2].numpy(), b1 / sd, atol=0.01 / sd)
    # only from the stats file's period: one overlapping the validation split is refused
    late = tmp_path / "late.json"
    assert (
        cli(
            [
                "stats",
                "--config",
                str(tmp_path / "job.json"),
                "--start",
                "2021-03-01",
                "--end",
                "2021-03-05T06",
                "--out",
                str(late),
            ]
        )
        == 0
    )
    with pytest.raises(DataError, match="overlaps the validation split"):
        ShardedSampleLoader(cfg.model_copy(update={"stats": str(late)}), model, Mesh.single(), batch=1)
    # up to the first validation init (an input state, never a target) is allowed
    edge = tmp_path / "edge.json"
    assert (
        cli(
            [
                "stats",
                "--config",
                str(tmp_path / "job.json"),
                "--start",
                "2021-03-01",
                "--end",
                "2021-03-05T00",
                "--out",
                str(edge),
            ]
        )
        == 0
    )
    ShardedSampleLoader(cfg.model_copy(update={"stats": str(edge)}), model, Mesh.single(), batch=1)
    # a forecast's loader (only a test split of init times) has no validation split to check against
    fc = cfg.model_copy(update={"stats": str(late), "splits": {"test": ["2021-03-05", "2021-03-05"]}})
    ShardedSampleLoader(fc, model, Mesh.single(), "test", batch=1)
    # stats without the daily cycle, and a daily cycle of something that is not a predicted channel
    plain = {k: v for k, v in stats.items() if k != "daily_cycle"}
    (tmp_path / "plain.json").write_text(json.dumps(plain))
    with pytest.raises(ValueError, match="no per-pixel daily cycle of '2m_temperature'"):
        ShardedSampleLoader(cfg.model_copy(update={"stats": str(tmp_path / "plain.json")}), model, Mesh.single())
    bad = ModelConfig(grid=(5, 7), patch=(1, 1), channels=ch.model_copy(update={"static": ["daily_cycle_mean_u10"]}))
    with pytest.raises(DataError, match="'u10' is not a predicted channel"):
        ShardedSampleLoader(cfg, bad, Mesh.single())
