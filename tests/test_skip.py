"""The per-pixel linear skip head (model.pixel_skip): exact size, off by default, the plain tendency
model at initialisation, the regression baseline's form, and the same model on every mesh (outputs,
input and parameter gradients, parameters after 3 optimizer steps against the single-process twin)."""
import pytest
import torch

from jigsaw_ext.mesh import Mesh, MeshConfig
from jigsaw_ext.selfcheck import FP32_TOL
from jigsaw_ext.testing import run_workers
from tests import workers
from weathermixer.config import ChannelsConfig, ModelConfig
from weathermixer.model import WeatherMixer

STATIC = ["lsm", "sin_hour_of_day", "cos_hour_of_day"]  # on TP = 2/3 the time features sit on other ranks
UK = dict(grid=(33, 49), patch=(3, 7), hidden=16, blocks=1, history=1,
          channels=ChannelsConfig(surface=["t2m"], atmospheric=[], levels=[], static=STATIC))


def _inputs(cfg, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    fields = torch.randn(batch, cfg.history + 1, cfg.channels.n_fields, *cfg.grid, generator=gen)
    return fields, torch.randn(batch, cfg.channels.n_static, *cfg.grid, generator=gen)


def test_off_by_default_exact_size_and_the_tendency_model_at_initialisation():
    from weathermixer.data.config import TIME_FEATURES
    from weathermixer.model.skip import TIME_FEATURES as SKIP_TIME_FEATURES

    assert SKIP_TIME_FEATURES == TIME_FEATURES  # the model's copy of the loader's time-feature names
    assert ModelConfig().pixel_skip == 0 and WeatherMixer(ModelConfig()).skip is None
    plain = ModelConfig(**UK, rollout=3)
    cfg = plain.model_copy(update={"pixel_skip": 3})
    model = WeatherMixer(cfg)
    assert sum(p.numel() for p in model.parameters()) == model.num_parameters()
    F = 2 + 2 + 1  # x(t - dt), x(t), sin/cos hour, 1
    assert model.num_parameters() - WeatherMixer(plain).num_parameters() == 3 * F * 33 * 49
    fields, static = _inputs(cfg)
    with torch.no_grad():
        for a, b in zip(model.forecast_leads(fields, static), WeatherMixer(plain).forecast_leads(fields, static)):
            assert torch.equal(a, b)
    states = cfg.model_copy(update={"pixel_skip_inputs": "states"})  # x(t - dt), x(t): no hour, no constant
    assert WeatherMixer(states).num_parameters() - WeatherMixer(plain).num_parameters() == 3 * 2 * 33 * 49


def test_the_head_is_the_per_pixel_regression_of_each_lead():
    """With the tendency decoder zeroed the model is y_l = x(t) + w_l . (x(t - dt), x(t), sin h, cos h, 1)
    per pixel: the regression baseline's features (weathermixer.evaluation.baselines), one set per lead."""
    cfg = ModelConfig(**UK, rollout=2, pixel_skip=2)
    model = WeatherMixer(cfg)
    with torch.no_grad():
        for p in model.recovery.parameters():
            p.zero_()
        model.skip.weight.normal_()
    fields, static = _inputs(cfg)
    w = model.skip.weight.detach() * cfg.pixel_skip_scale  # (lead, F, C, lat, lon)
    feats = torch.stack([fields[:, 0], fields[:, 1], static[:, 1:2].expand_as(fields[:, 0]),
                         static[:, 2:3].expand_as(fields[:, 0]), torch.ones_like(fields[:, 0])], 1)
    with torch.no_grad():
        leads = model.forecast_leads(fields, static, 2)
    for lead, y in enumerate(leads):
        expected = fields[:, 1] + (w[lead] * feats).sum(1)
        assert torch.allclose(y, expected, atol=1e-5)
    # autoregressive: every step is lead 1 of its own input window
    with torch.no_grad():
        ar = model(fields, static, steps=2, every_lead=True, autoregressive=True)
    assert torch.allclose(ar[0], leads[0])


def test_a_lead_past_the_skip_coefficients_is_a_clear_error():
    cfg = ModelConfig(**UK, rollout=1, pixel_skip=2)
    fields, static = _inputs(cfg)
    with pytest.raises(ValueError, match=r"leads 1..2, asked for lead 3"):
        WeatherMixer(cfg).forecast_leads(fields, static, 3)


def test_the_coefficients_are_sharded_like_the_fields():
    cfg = ModelConfig(**UK, pixel_skip=1)
    serial = WeatherMixer(cfg).skip.weight
    mesh = MeshConfig(domain=3, tp=1)
    rows = [WeatherMixer(cfg, Mesh.virtual(mesh, r)).skip.weight.shape[3] for r in range(3)]
    assert rows == [12, 12, 9] and sum(rows) == serial.shape[3]  # 11 patch rows of 3: 4 + 4 + 3


SKIP = dict(pixel_skip=2, channels=ChannelsConfig(surface=["t2m", "u10"], atmospheric=["z", "t", "q"],
                                                  levels=[500, 850], static=STATIC))


@pytest.mark.parametrize("mesh,head", [((1, 1, 1), "blend"), ((1, 2, 2), "tendency"), ((1, 3, 1), "tendency"),
                                       ((1, 1, 3), "blend")], ids=lambda m: "x".join(map(str, m)) if
                         isinstance(m, tuple) else m)
def test_every_mesh_is_the_same_model_with_the_skip_head(mesh, head):
    """weathermixer.selfcheck's comparison (25 x 24 grid zero-padded, uneven shards, history 1, 2-step
    latent rollout) with the skip head on and hour-of-day inputs held by one TP rank only."""
    dp, domain, tp = mesh
    errors = run_workers(workers.selfcheck, dp * domain * tp, dict(dp=dp, domain=domain, tp=tp), "fp32",
                         dict(SKIP, head=head), timeout=300, preload=["weathermixer.model"])[0]
    assert max(errors.values()) <= FP32_TOL, errors


def test_initial_coefficients_from_a_fit_file_on_every_mesh(tmp_path):
    """model.pixel_skip_init: every rank keeps its block of the file's logical tensor; a file for another
    job is a clear error."""
    import numpy as np

    cfg = ModelConfig(**UK, pixel_skip=2)
    coef = np.random.default_rng(0).standard_normal((3, 5, 1, 33, 49)).astype(np.float32)  # 3 leads >= 2
    path = tmp_path / "fit.npz"
    np.savez(path, coef=coef, static=np.array(["sin_hour_of_day", "cos_hour_of_day"]))
    cfg = cfg.model_copy(update={"pixel_skip_init": str(path)})
    serial = WeatherMixer(cfg).skip
    assert torch.allclose(serial.weight * cfg.pixel_skip_scale, torch.from_numpy(coef[:2]), atol=1e-6)
    mesh = MeshConfig(domain=3, tp=1)
    for r in range(3):
        m = WeatherMixer(cfg, Mesh.virtual(mesh, r)).skip
        assert torch.equal(m.weight, m.weight.block_layout.shard(serial.weight.detach(), m.geo.mesh.coords))
    np.savez(path, coef=coef[:, :4], static=np.array(["sin_hour_of_day"]))
    with pytest.raises(ValueError, match="refit it for this job"):
        WeatherMixer(cfg)


def test_a_forecast_that_re_encodes_starts_each_segment_at_lead_1_with_its_own_hour():
    """weathermixer.inference.rollout: each segment of `per_encode` steps is leads 1..per_encode of the
    skip head, with the time features of the segment's start (static_at)."""
    from types import SimpleNamespace

    import numpy as np
    import pandas as pd

    from weathermixer.inference.rollout import rollout, static_at
    from weathermixer.model.mixer import next_window

    cfg = ModelConfig(**UK, pixel_skip=2)
    model = WeatherMixer(cfg)
    with torch.no_grad():
        model.skip.weight.normal_(std=0.01)
    fields, static = _inputs(cfg, batch=1)
    loader = SimpleNamespace(static_names=STATIC, lat=np.zeros(1), lon=np.zeros(1))
    init, dt = pd.Timestamp("2019-03-01T05"), pd.Timedelta(hours=1)
    with torch.no_grad():
        got = [y for _, y in rollout(model, fields, static, loader, [init], 4, 2, dt)]
        first = model.forecast_leads(fields, static_at(static, loader, [init]), 2)
        x = next_window(next_window(fields, first[0]), first[1])
        second = model.forecast_leads(x, static_at(static, loader, [init + 2 * dt]), 2)
    for a, b in zip(got, first + second):
        assert torch.equal(a, b)
    assert not torch.equal(static_at(static, loader, [init]), static_at(static, loader, [init + 2 * dt]))


def _rollout_variants(rank, world, mesh_kwargs):
    """The skip head in the autoregressive rollout and with activation checkpointing, in one spawn."""
    from weathermixer import selfcheck as sc

    out = {}
    for name, task in (("autoregressive_checkpoint", dict(autoregressive=True, checkpoint=True)),
                       ("latent_checkpoint", dict(checkpoint=True))):
        errors = sc.compare_with_serial(MeshConfig(**mesh_kwargs), sc.default_model_config(**SKIP, head="tendency"),
                                        **task)
        out[name] = {k: v for k, (v, _) in errors.items()}
    return out


def test_autoregressive_and_checkpointed_rollouts_with_the_skip_head_on_a_mesh():
    errors = run_workers(_rollout_variants, 4, dict(domain=2, tp=2), timeout=300, preload=["weathermixer.model"])[0]
    for name, errs in errors.items():
        assert max(errs.values()) <= FP32_TOL, (name, errs)


def test_the_least_squares_fit_is_the_regression_baseline_on_the_uk_sample(tmp_path):
    """weathermixer.model.skip_fit on the real UK sample: its coefficients (normalised units, one set per
    lead) forecast what weathermixer.evaluation.baselines.fit_linear fitted on the same samples does."""
    from pathlib import Path

    import numpy as np
    import pandas as pd
    import xarray as xr

    from weathermixer.data.__main__ import main as data_main
    from weathermixer.data.loader import ShardedSampleLoader
    from weathermixer.evaluation.baselines import ClimatologyPeriod, fit_linear
    from weathermixer.model.skip_fit import main as fit_main

    grib = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "era5-2mt-2019-03-uk.grib"
    pytest.importorskip("cfgrib", reason="cfgrib (the [grib] extra) is not installed: the GRIB sample cannot be read")
    if not grib.exists():
        pytest.skip(f"{grib} not found")
    job = str(Path(__file__).resolve().parents[1] / "deepspeed_configs" / "era5_uk_t2m_cpu.json")
    sets = ["--set", f"data.path={grib}", "--set", f"data.stats={tmp_path / 'stats.json'}",
            "--set", 'model.channels.static=["sin_hour_of_day", "cos_hour_of_day"]',
            "--set", 'data.splits={"train": ["2019-03-01T01", "2019-03-06T23"], "val": ["2019-03-08", "2019-03-09"]}']
    assert data_main(["stats", "--config", job, *sets, "--start", "2019-03-01", "--end", "2019-03-06T23",
                      "--out", str(tmp_path / "stats.json")]) == 0
    assert fit_main(["--config", job, *sets, "--leads", "3", "--out", str(tmp_path / "fit.npz"), "--ridge", "0"]) == 0
    coef = np.load(tmp_path / "fit.npz")["coef"]  # (lead, F = x(t - 1 h), x(t), sin, cos, 1; 1, lat, lon)

    from weathermixer.data.__main__ import _job

    cfg = _job(type("A", (), dict(config=job, set=[s for s in sets if s != "--set"], data=None)))
    loader = ShardedSampleLoader(cfg.data.model_copy(update={"leads": 3}), cfg.model, Mesh.single(), "val",
                                 batch=1, shuffle=False, infinite=False)
    s = loader.load_batch(range(4))
    mean, std = (float(a.ravel()[0]) for a in loader._norm)
    x = s.fields.double().numpy()[:, :, 0]  # (b, 2, lat, lon)
    X = np.stack([x[:, 0], x[:, 1], s.static[:, 0].double().numpy(), s.static[:, 1].double().numpy(),
                  np.ones_like(x[:, 1])], 1)
    ours = (x[:, 1][:, None] + np.einsum("lfhw,bfhw->blhw", coef[:, :, 0], X)) * std + mean

    truth = xr.open_dataset(grib, engine="cfgrib", backend_kwargs={"indexpath": ""})["t2m"]
    period = ClimatologyPeriod(pd.Timestamp("2019-03-01T00"), pd.Timestamp("2019-03-06T23"), False, False)
    lin = fit_linear(truth, period, pd.Timedelta(hours=1), pd.to_timedelta([1, 2, 3], unit="h"))
    now, before = x[:, 1] * std + mean, x[:, 0] * std + mean
    theirs = lin.forecast(now, before, pd.DatetimeIndex(s.times), ours.shape)

    assert np.abs(ours - theirs).max() < 1e-3  # K


def test_job_whose_rollout_outruns_the_skip_leads_fails_at_load():
    from weathermixer.config import ConfigError
    from weathermixer.train.config import load_train_job

    with pytest.raises(ConfigError, match=r"model.pixel_skip=3 has coefficients for leads 1..3.*set model.pixel_skip >= 6"):
        load_train_job("deepspeed_configs/era5_uk_t2m_cpu.json", settings=["model.pixel_skip=3"])
    load_train_job("deepspeed_configs/era5_uk_t2m_cpu.json", settings=["model.pixel_skip=6"])


def test_skip_head_knows_the_loaders_time_features():
    """skip.py repeats the names (the model does not import the data package): they must agree."""
    from weathermixer.data.config import TIME_FEATURES
    from weathermixer.model.skip import TIME_FEATURES as SKIP_TIME_FEATURES

    assert tuple(SKIP_TIME_FEATURES) == tuple(TIME_FEATURES)
