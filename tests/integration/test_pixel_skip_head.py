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

pytestmark = pytest.mark.distributed

STATIC = ["lsm", "sin_hour_of_day", "cos_hour_of_day"]  # on TP = 2/3 the time features sit on other ranks
UK = dict(
    grid=(33, 49),
    patch=(3, 7),
    hidden=16,
    blocks=1,
    history=1,
    channels=ChannelsConfig(surface=["t2m"], atmospheric=[], levels=[], static=STATIC),
)


def _inputs(cfg, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    fields = torch.randn(batch, cfg.history + 1, cfg.channels.n_fields, *cfg.grid, generator=gen)
    return fields, torch.randn(batch, cfg.channels.n_static, *cfg.grid, generator=gen)


def test_off_by_default_exact_size_and_the_tendency_model_at_initialisation():
    assert ModelConfig().pixel_skip == 0 and WeatherMixer(ModelConfig()).skip is None
    plain = ModelConfig(**UK, rollout=3)
    cfg = plain.model_copy(update={"pixel_skip": 3})
    model = WeatherMixer(cfg)
    assert sum(p.numel() for p in model.parameters()) == model.num_parameters()
    F = 2 + 2 + 1  # x(t - dt), x(t), sin/cos hour, 1
    assert model.num_parameters() - WeatherMixer(plain).num_parameters() == 3 * F * 33 * 49
    fields, static = _inputs(cfg)
    with torch.no_grad():
        for a, b in zip(
            model.forecast_leads(fields, static), WeatherMixer(plain).forecast_leads(fields, static), strict=True
        ):
            assert torch.equal(a, b)
    states = cfg.model_copy(update={"pixel_skip_inputs": "states"})  # x(t - dt), x(t): no hour, no constant
    assert WeatherMixer(states).num_parameters() - WeatherMixer(plain).num_parameters() == 3 * 2 * 33 * 49


def test_the_head_is_the_per_pixel_regression_of_each_lead():
    """With the tendency decoder zeroed the model is y_l = x(t) + w_l . (x(t - dt), x(t), sin h, cos h, 1)
    per pixel: the regression baseline's features (weathermixer.evaluation.baselines), one set per lead."""
    cfg = ModelConfig(**UK, rollout=2, pixel_skip=2)
    model = WeatherMixer(cfg)
    model.zero_tendency()
    with torch.no_grad():
        model.skip.weight.normal_()
    fields, static = _inputs(cfg)
    w = model.skip.weight.detach() * cfg.pixel_skip_scale  # (lead, F, C, lat, lon)
    feats = torch.stack(
        [
            fields[:, 0],
            fields[:, 1],
            static[:, 1:2].expand_as(fields[:, 0]),
            static[:, 2:3].expand_as(fields[:, 0]),
            torch.ones_like(fields[:, 0]),
        ],
        1,
    )
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


SKIP = dict(
    pixel_skip=2,
    channels=ChannelsConfig(surface=["t2m", "u10"], atmospheric=["z", "t", "q"], levels=[500, 850], static=STATIC),
)


@pytest.mark.parametrize(
    "mesh,head",
    [((1, 1, 1), "blend"), ((1, 2, 2), "tendency"), ((1, 3, 1), "tendency"), ((1, 1, 3), "blend")],
    ids=lambda m: "x".join(map(str, m)) if isinstance(m, tuple) else m,
)
def test_every_mesh_is_the_same_model_with_the_skip_head(mesh, head):
    """weathermixer.selfcheck's comparison (25 x 24 grid zero-padded, uneven shards, history 1, 2-step
    latent rollout) with the skip head on and hour-of-day inputs held by one TP rank only."""
    dp, domain, tp = mesh
    errors = run_workers(
        workers.selfcheck,
        dp * domain * tp,
        dict(dp=dp, domain=domain, tp=tp),
        "fp32",
        dict(SKIP, head=head),
        timeout=300,
        preload=["weathermixer.model"],
    )[0]
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


def test_zero_start_makes_the_model_its_fitted_head(tmp_path):
    """model.pixel_skip_zero_start: the decoder starts at 0, so every lead of the untrained model is the
    skip head's x(t) + w . features (the same forecast with the network's tendency removed by hand);
    without it the network adds its tendency; without a fit file it is a config error."""
    import numpy as np

    cfg = ModelConfig(**UK, pixel_skip=2)
    coef = 0.1 * np.random.default_rng(0).standard_normal((2, 5, 1, 33, 49)).astype(np.float32)
    path = tmp_path / "fit.npz"
    np.savez(path, coef=coef, static=np.array(["sin_hour_of_day", "cos_hour_of_day"]))
    g = torch.Generator().manual_seed(0)
    fields = torch.randn(2, cfg.history + 1, 1, 33, 49, generator=g)
    static = torch.randn(2, len(cfg.channels.static), 33, 49, generator=g)
    outs = {}
    for zero in (False, True):
        model = WeatherMixer(cfg.model_copy(update={"pixel_skip_init": str(path), "pixel_skip_zero_start": zero}))
        with torch.no_grad():
            outs[zero] = model(fields, static, steps=2, every_lead=True)
            model.zero_tendency()
            outs[(zero, "head")] = model(fields, static, steps=2, every_lead=True)
    for a, b in zip(outs[True], outs[(True, "head")], strict=True):
        assert torch.equal(a, b)
    assert not torch.allclose(outs[False][0], outs[(False, "head")][0])
    with pytest.raises(ValueError, match="pixel_skip_zero_start"):
        ModelConfig(**UK, pixel_skip=2, pixel_skip_zero_start=True)


def test_a_forecast_that_re_encodes_starts_each_segment_at_lead_1_with_its_own_hour():
    """weathermixer.inference.rollout: each segment of `per_encode` steps is leads 1..per_encode of the
    skip head, with the time features of the segment's start (static_at)."""
    from types import SimpleNamespace

    import numpy as np
    import pandas as pd

    from weathermixer.data.loader import static_at
    from weathermixer.inference.rollout import rollout
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
    for a, b in zip(got, first + second, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(static_at(static, loader, [init]), static_at(static, loader, [init + 2 * dt]))


def _rollout_variants(rank, world, mesh_kwargs):
    """The skip head in the autoregressive rollout and with activation checkpointing, in one spawn."""
    from weathermixer import selfcheck as sc

    out = {}
    for name, task in (
        ("autoregressive_checkpoint", dict(autoregressive=True, checkpoint=True)),
        ("latent_checkpoint", dict(checkpoint=True)),
    ):
        errors = sc.compare_with_serial(
            MeshConfig(**mesh_kwargs), sc.default_model_config(**SKIP, head="tendency"), **task
        )
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

    grib = Path(__file__).resolve().parents[3] / "shared" / "data" / "real" / "era5-2mt-2019-03-uk.grib"
    pytest.importorskip("cfgrib", reason="cfgrib (the [grib] extra) is not installed: the GRIB sample cannot be read")
    if not grib.exists():
        pytest.skip(f"{grib} not found")
    job = str(Path(__file__).resolve().parents[2] / "deepspeed_configs" / "era5_uk_t2m_cpu.json")
    sets = [
        "--set",
        f"data.path={grib}",
        "--set",
        f"data.stats={tmp_path / 'stats.json'}",
        "--set",
        'model.channels.static=["sin_hour_of_day", "cos_hour_of_day"]',
        "--set",
        "model.pixel_skip_inputs=all",  # the regression's features (the job file's head is `changes`)
        "--set",
        'data.splits={"train": ["2019-03-01T01", "2019-03-06T23"], "val": ["2019-03-08", "2019-03-09"]}',
    ]
    assert (
        data_main(
            [
                "stats",
                "--config",
                job,
                *sets,
                "--start",
                "2019-03-01",
                "--end",
                "2019-03-06T23",
                "--out",
                str(tmp_path / "stats.json"),
            ]
        )
        == 0
    )
    assert fit_main(["--config", job, *sets, "--leads", "3", "--out", str(tmp_path / "fit.npz"), "--ridge", "0"]) == 0
    coef = np.load(tmp_path / "fit.npz")["coef"]  # (lead, F = x(t - 1 h), x(t), sin, cos, 1; 1, lat, lon)

    from weathermixer.data import load_data_job

    cfg = load_data_job(job, [s for s in sets if s != "--set"])
    loader = ShardedSampleLoader(
        cfg.data.model_copy(update={"leads": 3}),
        cfg.model,
        Mesh.single(),
        "val",
        batch=1,
        shuffle=False,
        infinite=False,
    )
    s = loader.load_batch(range(4))
    mean, std = (float(a.ravel()[0]) for a in loader._norm)
    x = s.fields.double().numpy()[:, :, 0]  # (b, 2, lat, lon)
    X = np.stack(
        [x[:, 0], x[:, 1], s.static[:, 0].double().numpy(), s.static[:, 1].double().numpy(), np.ones_like(x[:, 1])], 1
    )
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

    with pytest.raises(
        ConfigError, match=r"model.pixel_skip=3 has coefficients for leads 1..3.*set model.pixel_skip >= 6"
    ):
        load_train_job("deepspeed_configs/era5_uk_t2m_cpu.json", settings=["model.pixel_skip=3"])
    load_train_job("deepspeed_configs/era5_uk_t2m_cpu.json", settings=["model.pixel_skip=6"])


def test_the_uk_job_file_starts_from_its_frozen_fitted_anchor_and_names_a_missing_fit(tmp_path):
    """deepspeed_configs/era5_uk_t2m_cpu.json is the recipe chosen on the UK validation days: the level-free
    anchor (`changes`, 6 leads) fitted beside the job's statistics, frozen (lr 0), the decoder starting at 0.
    Training it before the fit step is an error that names the command writing the fit."""
    import re
    from pathlib import Path

    from weathermixer.train.config import load_train_job

    job, _ = load_train_job("deepspeed_configs/era5_uk_t2m_cpu.json")
    m = job.model
    assert (m.pixel_skip, m.pixel_skip_inputs, m.pixel_skip_day, m.pixel_skip_zero_start) == (6, "changes", 24, True)
    assert Path(m.pixel_skip_init).parent == Path(job.data.stats).parent
    frozen = [g for g in job.train.param_groups if "skip.*" in g.match]
    assert len(frozen) == 1 and frozen[0].lr_scale == 0 and frozen[0].weight_decay == 0
    missing = re.escape(str(tmp_path / "fit.npz"))
    with pytest.raises(
        FileNotFoundError,
        match=rf"pixel_skip_init={missing}: no such fit file.*"
        rf"skip_fit --config JOB --leads 6 --out {missing}",
    ):
        WeatherMixer(m.model_copy(update={"pixel_skip_init": str(tmp_path / "fit.npz")}))


# the anchor inputs (model.pixel_skip_inputs = "anchor") -----------------------------------------------
DAY = 4  # model steps in a day: small, so history DAY - 1 = 3 keeps the test grids small
CYCLE = [f"daily_cycle_{t}_t2m" for t in ("mean", "cos1", "sin1", "cos2", "sin2")]
ANCHOR_STATIC = ["lsm", "sin_hour_of_day", CYCLE[0], "cos_hour_of_day", *CYCLE[1:]]


def _head_only(cfg):
    """The model with random skip coefficients and the decoder at 0: its forecast is the head's."""
    model = WeatherMixer(cfg)
    assert sum(p.numel() for p in model.parameters()) == model.num_parameters()
    model.zero_tendency()
    with torch.no_grad():
        model.skip.weight.normal_()
    return model


def _anchor_cfg(**kw):
    base = dict(
        UK,
        history=DAY - 1,
        pixel_skip=DAY,
        pixel_skip_inputs="anchor",
        pixel_skip_day=DAY,
        rollout=DAY,
        channels=ChannelsConfig(surface=["t2m"], atmospheric=[], levels=[], static=ANCHOR_STATIC),
    )
    base.update(kw)
    return ModelConfig(**base)


def _anchor_inputs(cfg, hour=5.0, batch=2, seed=0):
    import math

    fields, static = _inputs(cfg, batch, seed)
    static[:, 1] = math.sin(2 * math.pi * hour / 24)  # the start hour, as the loader computes it
    static[:, 3] = math.cos(2 * math.pi * hour / 24)
    return fields, static


def _head_forecast(cfg, hour):
    """(model, fields, static, coefficients, leads 1..DAY) of the head-only model from the start hour `hour`."""
    model = _head_only(cfg)
    fields, static = _anchor_inputs(cfg, hour)
    with torch.no_grad():
        leads = model.forecast_leads(fields, static, DAY)
    return model, fields, static, model.skip.weight.detach(), leads


def _climatology(static, hour):
    """The daily cycle (static terms mean, cos1, sin1, cos2, sin2) at `hour`, written out."""
    import math

    w = 2 * math.pi / 24
    m, c1, s1, c2, s2 = static[:, 2], static[:, 4], static[:, 5], static[:, 6], static[:, 7]
    return (
        m
        + c1 * math.cos(w * hour)
        + s1 * math.sin(w * hour)
        + c2 * math.cos(2 * w * hour)
        + s2 * math.sin(2 * w * hour)
    )


def test_the_anchor_features_are_persistence_yesterday_climatology_and_the_regression_ones():
    """y_l = x(t) + w_l . (x(t - dt), x(t), x(t + l dt - 1 day), clim(valid hour), sin h, cos h, 1), the
    climatology evaluated at the valid hour t + l dt (l x 24 / DAY hours after the start hour)."""
    from weathermixer.model.skip import skip_feature_names, skip_features

    cfg = _anchor_cfg()
    assert skip_features(cfg) == 7 and skip_feature_names(cfg) == [
        "x(t - dt)",
        "x(t)",
        "x(t + l dt - 1 day)",
        "daily-cycle climatology at t + l dt",
        "sin_hour_of_day",
        "cos_hour_of_day",
        "1",
    ]
    hour = 5.0
    model, fields, static, w, leads = _head_forecast(cfg, hour)
    x = fields[:, -1, 0]
    for lead, y in enumerate(leads, start=1):
        clim = _climatology(static, hour + lead * 24 / DAY)
        feats = [
            fields[:, -2, 0],
            x,
            fields[:, -1 - (DAY - lead), 0],
            clim,
            static[:, 1],
            static[:, 3],
            torch.ones_like(x),
        ]
        expected = x + sum(w[lead - 1, f, 0] * v for f, v in enumerate(feats))
        assert torch.allclose(y[:, 0], expected, atol=1e-5), lead

    # the three baselines are points of the anchor's space
    def with_weights(**named):
        with torch.no_grad():
            model.skip.weight.zero_()
            for f, v in named.items():
                model.skip.weight[:, ["xm1", "x", "yday", "clim"].index(f)] = v
            return model.forecast_leads(fields, static, DAY)

    for y in with_weights():  # persistence
        assert torch.equal(y[:, 0], x)
    for lead, y in enumerate(with_weights(x=-1.0, clim=1.0), start=1):  # the daily-cycle climatology
        assert torch.allclose(y[:, 0], _climatology(static, hour + lead * 24 / DAY), atol=1e-5)
    for lead, y in enumerate(with_weights(x=-1.0, yday=1.0), start=1):  # the same hour one day earlier
        assert torch.allclose(y[:, 0], fields[:, -1 - (DAY - lead), 0], atol=1e-6)


def test_anchor_settings_are_checked():
    from pydantic import ValidationError

    for kw, match in (
        (dict(pixel_skip_day=0), "needs model.pixel_skip_day"),
        (dict(history=0), r"needs model.history >= 1"),
        (dict(pixel_skip=DAY + 1, rollout=1), r"model.pixel_skip <= model.pixel_skip_day = 4"),
        (
            dict(channels=ChannelsConfig(surface=["t2m"], atmospheric=[], levels=[], static=CYCLE)),
            "add sin_hour_of_day and cos_hour_of_day",
        ),
    ):
        with pytest.raises(ValidationError, match=match):
            _anchor_cfg(**kw)


def test_a_fit_file_of_other_inputs_is_refused(tmp_path):
    import numpy as np

    cfg = _anchor_cfg()
    coef = np.zeros((DAY, 7, 1, 33, 49), np.float32)
    path = tmp_path / "fit.npz"
    np.savez(path, coef=coef, static=np.array(["sin_hour_of_day", "cos_hour_of_day"]), inputs="anchor", day=DAY)
    WeatherMixer(cfg.model_copy(update={"pixel_skip_init": str(path)}))
    np.savez(path, coef=coef, static=np.array(["sin_hour_of_day", "cos_hour_of_day"]), inputs="anchor", day=2 * DAY)
    with pytest.raises(ValueError, match=r"fitted for pixel_skip_inputs=anchor, pixel_skip_day=8"):
        WeatherMixer(cfg.model_copy(update={"pixel_skip_init": str(path)}))


# the anchor on every mesh: daily-cycle terms of some channels only, spread over the TP ranks with the hour
ANCHOR_SKIP = dict(
    pixel_skip=2,
    pixel_skip_inputs="anchor",
    pixel_skip_day=3,
    history=2,
    channels=ChannelsConfig(
        surface=["t2m", "u10"],
        atmospheric=["z", "t", "q"],
        levels=[500, 850],
        static=[
            "lsm",
            "sin_hour_of_day",
            "daily_cycle_mean_t2m",
            "daily_cycle_cos1_z_500",
            "cos_hour_of_day",
            "daily_cycle_sin1_t2m",
            "daily_cycle_mean_q_850",
            "daily_cycle_sin2_z_500",
        ],
    ),
)


@pytest.mark.parametrize(
    "mesh,head",
    [((1, 1, 1), "tendency"), ((1, 2, 2), "tendency"), ((1, 3, 1), "blend"), ((1, 1, 3), "tendency")],
    ids=lambda m: "x".join(map(str, m)) if isinstance(m, tuple) else m,
)
def test_every_mesh_is_the_same_model_with_the_anchor_head(mesh, head):
    """weathermixer.selfcheck's comparison (25 x 24 grid zero-padded, uneven shards, 2-step latent rollout)
    with the anchor: history 2, yesterday = t + l dt - 3 steps, daily-cycle terms of three of the eight
    channels, held by different TP ranks than the hour of day."""
    dp, domain, tp = mesh
    errors = run_workers(
        workers.selfcheck,
        dp * domain * tp,
        dict(dp=dp, domain=domain, tp=tp),
        "fp32",
        dict(ANCHOR_SKIP, head=head),
        timeout=300,
        preload=["weathermixer.model"],
    )[0]
    assert max(errors.values()) <= FP32_TOL, errors


def _anchor_rollout_variants(rank, world, mesh_kwargs):
    from weathermixer import selfcheck as sc

    out = {}
    for name, task in (
        ("autoregressive_checkpoint", dict(autoregressive=True, checkpoint=True)),
        ("latent_checkpoint", dict(checkpoint=True)),
    ):
        errors = sc.compare_with_serial(
            MeshConfig(**mesh_kwargs), sc.default_model_config(**ANCHOR_SKIP, head="tendency"), **task
        )
        out[name] = {k: v for k, (v, _) in errors.items()}
    return out


def test_autoregressive_and_checkpointed_rollouts_with_the_anchor_on_an_uneven_mesh():
    errors = run_workers(
        _anchor_rollout_variants, 3, dict(domain=1, tp=3), timeout=300, preload=["weathermixer.model"]
    )[0]
    for name, errs in errors.items():
        assert max(errs.values()) <= FP32_TOL, (name, errs)


def test_without_a_days_history_the_anchor_leaves_yesterday_out():
    """history < pixel_skip_day - 1: x(t - dt), x(t), the climatology at the valid hour, the hour, 1."""
    from weathermixer.model.skip import skip_feature_names

    cfg = _anchor_cfg(history=1, pixel_skip=DAY + 2, rollout=DAY + 2)  # no yesterday: leads past a day are fine
    assert skip_feature_names(cfg) == [
        "x(t - dt)",
        "x(t)",
        "daily-cycle climatology at t + l dt",
        "sin_hour_of_day",
        "cos_hour_of_day",
        "1",
    ]
    model = WeatherMixer(cfg)
    model.zero_tendency()
    with torch.no_grad():
        model.skip.weight.zero_()
        model.skip.weight[:, 1], model.skip.weight[:, 2] = -1.0, 1.0  # the climatology
    fields, static = _anchor_inputs(cfg, 7.0)
    with torch.no_grad():
        for lead, y in enumerate(model.forecast_leads(fields, static, DAY + 2), start=1):
            assert torch.allclose(y[:, 0], _climatology(static, 7.0 + lead * 24 / DAY), atol=1e-5)


def test_the_changes_anchor_is_level_free():
    """pixel_skip_inputs=changes: y_l = x(t) + w_l . (x(t - dt) - x(t), yesterday - x(t), clim(t + l dt) -
    clim(t), sin h, cos h), no constant; a uniform shift of the input states shifts the head by the same."""
    from weathermixer.model.skip import skip_feature_names

    cfg = _anchor_cfg(pixel_skip_inputs="changes")
    assert skip_feature_names(cfg) == [
        "x(t - dt) - x(t)",
        "x(t + l dt - 1 day) - x(t)",
        "daily-cycle climatology at t + l dt - at t",
        "sin_hour_of_day",
        "cos_hour_of_day",
    ]
    hour = 13.0
    model, fields, static, w, leads = _head_forecast(cfg, hour)
    with torch.no_grad():
        shifted = model.forecast_leads(fields + 3.0, static, DAY)
    x = fields[:, -1, 0]
    for lead, (y, z) in enumerate(zip(leads, shifted, strict=True), start=1):
        dclim = _climatology(static, hour + lead * 24 / DAY) - _climatology(static, hour)
        feats = [fields[:, -2, 0] - x, fields[:, -1 - (DAY - lead), 0] - x, dclim, static[:, 1], static[:, 3]]
        assert torch.allclose(y[:, 0], x + sum(w[lead - 1, f, 0] * v for f, v in enumerate(feats)), atol=1e-5)
        assert torch.allclose(z, y + 3.0, atol=1e-4)
    with torch.no_grad():  # the daily-cycle change: x(t) + clim(t + l dt) - clim(t)
        model.skip.weight.zero_()
        model.skip.weight[:, 2] = 1.0
        for lead, y in enumerate(model.forecast_leads(fields, static, DAY), start=1):
            expected = x + _climatology(static, hour + lead * 24 / DAY) - _climatology(static, hour)
            assert torch.allclose(y[:, 0], expected, atol=1e-5)


@pytest.mark.parametrize("mesh", [(1, 1, 1), (1, 2, 2), (1, 3, 1), (1, 1, 3)], ids=lambda m: "x".join(map(str, m)))
def test_every_mesh_is_the_same_model_with_the_changes_anchor(mesh):
    dp, domain, tp = mesh
    errors = run_workers(
        workers.selfcheck,
        dp * domain * tp,
        dict(dp=dp, domain=domain, tp=tp),
        "fp32",
        dict(ANCHOR_SKIP, pixel_skip_inputs="changes", head="tendency"),
        timeout=300,
        preload=["weathermixer.model"],
    )[0]
    assert max(errors.values()) <= FP32_TOL, errors
