"""Pieces of the training job that need no processes: loss on shards, weights, schedule, groups,
rollout draws, config checks, checkpoint pointers, the run log."""

import csv
import json
import math
import os

import numpy as np
import pytest
import torch

from jigsaw_ext.mesh import Mesh, MeshConfig
from weathermixer import runtime
from weathermixer.config import ChannelsConfig, ConfigError, ModelConfig
from weathermixer.config.train import LossConfig, TrainConfig
from weathermixer.grid import Geometry
from weathermixer.model import WeatherMixer
from weathermixer.train.checkpointing import CheckpointError, CheckpointManager
from weathermixer.train.config import load_train_job
from weathermixer.train.engine import lr_lambda, param_groups
from weathermixer.train.job import check_job
from weathermixer.train.loss import channel_loss_weights, headline_channels, latitude_weights, weighted_loss_term
from weathermixer.train.runlog import RunLog

CONFIG = "deepspeed_configs/quickstart_cpu.json"
CH = ChannelsConfig(
    surface=["2m_temperature", "10m_u_component_of_wind"],
    atmospheric=["geopotential", "temperature"],
    levels=[500, 850, 1000],
    static=[],
)
STATS = {"channels": {n: {"mean": 0.0, "std": 2.0 + i, "diff_std": 0.5 + 0.1 * i} for i, n in enumerate(CH.names)}}


def wb2_area_weights(lat_deg: torch.Tensor) -> np.ndarray:
    """WeatherBench 2's get_lat_weights on ascending latitudes: cell bounds -90, the midpoints, 90; a row's
    weight is sin(upper) - sin(lower), here normalised to mean 1."""
    rad = np.deg2rad(lat_deg.double().numpy())
    area = np.diff(np.sin(np.concatenate([[-np.pi / 2], (rad[:-1] + rad[1:]) / 2, [np.pi / 2]])))
    return area / area.mean()


def test_channel_weights_variable_level_pressure_and_tendency():
    names = CH.names  # 2 surface + 2 x 3 levels = 8
    w = channel_loss_weights(CH, LossConfig())
    assert torch.allclose(w, torch.ones(8))
    w = channel_loss_weights(CH, LossConfig(variable_weights={"geopotential": 3.0}, level_weights={1000: 0.5}))
    raw = torch.tensor([1, 1, 3, 3, 1.5, 1, 1, 0.5])  # order: t2m, u10, z500, z850, z1000, t500, t850, t1000
    assert torch.allclose(w, raw * 8 / raw.sum())
    w = channel_loss_weights(CH, LossConfig(level_weights="pressure"))
    lev = torch.tensor([1, 1, 500, 850, 1000, 500, 850, 1000]) / torch.tensor(2350 / 3)
    lev[:2] = 1
    assert torch.allclose(w, lev * 8 / lev.sum())
    w = channel_loss_weights(CH, LossConfig(tendency=True), STATS)
    s = torch.tensor([(0.5 + 0.1 * i) / (2.0 + i) for i in range(8)])
    assert torch.allclose(w, 1 / s**2, rtol=1e-6)
    with pytest.raises(ValueError, match="loss.variable_weights.*humidity"):
        channel_loss_weights(CH, LossConfig(variable_weights={"humidity": 1.0}))
    with pytest.raises(ValueError, match="loss.level_weights.*700"):
        channel_loss_weights(CH, LossConfig(level_weights={700: 1.0}))
    with pytest.raises(ValueError, match="loss.tendency needs data statistics"):
        channel_loss_weights(CH, LossConfig(tendency=True), None)
    assert [lbl for lbl, _ in headline_channels(names, None)] == ["z500", "t850", "t2m", "u10"]
    assert headline_channels(names, ["t1000", "geopotential_850"]) == [("t1000", 7), ("geopotential_850", 3)]
    with pytest.raises(ValueError, match="q700"):
        headline_channels(names, ["q700"])


@pytest.mark.parametrize("domain,tp", [(1, 1), (2, 1), (1, 3), (3, 2), (4, 4)])
def test_loss_terms_on_shards_add_up_to_the_serial_loss(domain, tp):
    """Tendency loss with level weights on uneven shards (13 rows, 8 channels): the ranks' terms sum
    to the loss computed independently on the full field (numpy, float64)."""
    cfg = ModelConfig(grid=(13, 16), channels=CH, patch=(1, 4), hidden=8)
    lat = torch.linspace(-87.0, 87.0, 13)
    w_c = channel_loss_weights(CH, LossConfig(level_weights={500: 2.0}, tendency=True), STATS)
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 8, 13, 16, generator=g), torch.randn(3, 8, 13, 16, generator=g)
    count = pred.numel()
    total = 0.0
    for r in range(domain * tp):
        mesh = Mesh.virtual(MeshConfig(domain=domain, tp=tp), r)
        geo = Geometry(cfg, mesh)
        rows = geo.pixel_row_split.slice(mesh.coords["domain"])
        chans = geo.channel_split(8).slice(mesh.coords["tp"])
        total += weighted_loss_term(
            pred[:, chans, rows], target[:, chans, rows], latitude_weights(lat)[rows], w_c[chans], count
        ).item()
    area = wb2_area_weights(lat)
    ref = (
        area[None, None, :, None]
        * w_c.double().numpy()[None, :, None, None]
        * (pred.double().numpy() - target.double().numpy()) ** 2
    ).mean()
    assert abs(total - ref) <= 1e-6 * ref


@pytest.mark.parametrize("rows", [32, 721])  # the quickstart's grid, ERA5 at 0.25 deg: both hold the poles
def test_every_latitude_row_receives_gradient(rows):
    """The loss weights are WeatherBench 2's cell areas (bounds at +-90 and the midpoints, as evaluate
    scores), so the pole rows get a gradient; cos(latitude) would give them exactly none."""
    lat = torch.linspace(-90.0, 90.0, rows, dtype=torch.float64)
    w = latitude_weights(lat)
    np.testing.assert_allclose(w.double().numpy(), wb2_area_weights(lat), rtol=1e-6)
    pred = torch.randn(2, 3, rows, 4, requires_grad=True)
    weighted_loss_term(pred, torch.zeros_like(pred), w, torch.ones(3), pred.numel()).backward()
    per_row = pred.grad.abs().sum(dim=(0, 1, 3))
    assert bool((per_row > 0).all()), f"rows without gradient: {torch.nonzero(per_row == 0).flatten().tolist()}"


@pytest.mark.parametrize(
    "cores,env,expected",
    [
        ([0, 1], {"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}, [1]),
        ([4, 5, 6, 7], {"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}, [6, 7]),  # threads default: cores / ranks
        ([0, 1, 2, 3], {"LOCAL_RANK": "0", "LOCAL_SIZE": "2", "OMP_NUM_THREADS": "2"}, [0, 1]),  # deepspeed's name
        ([0, 1], {"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "2"}, None),  # would share cores
        ([0, 1], {"LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "3"}, None),  # more ranks than cores
        ([3], {"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "OMP_NUM_THREADS": "1"}, None),  # launcher bound it already
        ([0, 1], {"LOCAL_RANK": "0"}, None),  # one local rank
    ],
)
def test_bind_cores_gives_each_local_rank_its_own_cores(monkeypatch, cores, env, expected):
    for key in ("LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMP_NUM_THREADS"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    calls = []
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: set(cores))
    monkeypatch.setattr(runtime.os, "sched_setaffinity", lambda pid, cpus: calls.append((pid, list(cpus))))
    assert runtime.bind_cores() == expected
    if expected is None:
        assert not calls
    else:  # every thread of the process, so those it starts later inherit the binding
        assert {int(t) for t in os.listdir("/proc/self/task")} <= {pid for pid, _ in calls}
        assert all(cpus == expected for _, cpus in calls)
    assert runtime.bind_cores(enabled=False) is None


def test_schedule_groups_and_rollout_draws():
    tc = TrainConfig(steps=100, warmup=10, min_lr_ratio=0.1)
    f = lr_lambda(tc)
    assert f(0) == pytest.approx(1 / 11) and f(9) == pytest.approx(10 / 11)
    assert f(10) == pytest.approx(1.0) and f(100) == pytest.approx(0.1) and f(55) == pytest.approx(0.55)
    model = WeatherMixer(ModelConfig(grid=(8, 16), channels=CH, patch=(1, 4), hidden=8), device="meta")
    rules = TrainConfig.model_validate(
        {"param_groups": [{"match": ["embed.*"], "lr_scale": 0.5}, {"match": ["*.bias*", "*norm*"], "weight_decay": 0}]}
    ).param_groups
    groups = param_groups(model, rules, lr=1e-3)
    by_name = {g["name"]: g for g in groups}
    names = dict(model.named_parameters())
    embed = by_name["rule0:embed.*"]
    assert embed["lr"] == 5e-4 and "weight_decay" not in embed
    assert {id(p) for p in embed["params"]} == {id(p) for n, p in names.items() if n.startswith("embed.")}
    nd = by_name["rule1:*.bias*|*norm*"]
    assert nd["weight_decay"] == 0 and nd["lr"] == 1e-3
    assert sum(len(g["params"]) for g in groups) == len(names)
    assert all(("norm" in n or ".bias" in n) for n, p in names.items() if any(p is q for q in nd["params"]))

    from weathermixer.train.trainer import Trainer

    job, _ = load_train_job(CONFIG, settings=["train.rollout=4", "train.seed=3"])
    t = Trainer(job, {})
    draws = [t.rollout_length(s) for s in range(1, 401)]
    assert set(draws) == {1, 2, 3, 4} and draws == [Trainer(job, {}).rollout_length(s) for s in range(1, 401)]
    job2, _ = load_train_job(CONFIG, settings=["train.rollout=4", "train.random_rollout=false"])
    assert {Trainer(job2, {}).rollout_length(s) for s in range(1, 50)} == {4}


def _check(settings, world=4, cuda=False, overrides=None):
    job, ds = load_train_job(CONFIG, overrides, settings)
    return check_job(job, ds, world, cuda)


def test_bad_settings_name_the_key(tmp_path):
    ds = _check([])
    assert ds["optimizer"]["params"]["lr"] == 0.002 and ds["train_batch_size"] == 8
    cases = [
        (["train.lerning_rate=1"], "train.lerning_rate: unknown key"),
        (["mesh.tp=4"], "world size 4"),
        (
            [f"data={json.dumps({'source': 'gridded', 'path': str(tmp_path / 'nope.zarr')})}"],
            "data.path: .*nope.zarr does not exist",
        ),
        (
            ["ds.zero_optimization.stage=3", 'mesh.replicate_weights_over=["tp"]'],
            "stage=3 with mesh.replicate_weights_over",
        ),
        (["ds.zero_optimization.stage=3", 'ds.zero_optimization.offload_param={"device": "cpu"}'], "offload_param"),
        (["ds.fp16.enabled=true"], "fp16 needs a GPU"),
        (["ds.optimizer.params.lr=0.1"], "optimizer.params.lr: set weathermixer.train.lr"),
        (['ds.scheduler={"type": "WarmupLR"}'], "scheduler: remove it"),
        (["ds.train_batch_size=12"], "train_batch_size=12"),
        (['validation.variables=["q700"]'], "q700"),
        (["train.rollout_mode=autoregressive", "model.rollout=2"], "model.rollout=1"),
        (["train.steps"], "expected KEY=VALUE"),
    ]
    for settings, pattern in cases:
        with pytest.raises(ConfigError, match=pattern):
            _check(settings)
    with pytest.raises(ConfigError, match="world size 2"):
        _check([], world=2)


def test_checkpoint_pointers_resolve_and_prune(tmp_path):
    root = tmp_path / "ck"
    for step, complete in [(2, True), (4, True), (6, True), (8, False)]:
        d = root / f"step{step:08d}"
        d.mkdir(parents=True)
        if complete:
            (d / "COMPLETE").write_text(f"{step}\n")
    mgr = CheckpointManager(root, keep_last=1)
    assert mgr.resolve("auto") is None and mgr.describe() == "none"
    (root / "latest").write_text("step00000008\n")  # names an incomplete tag: refused, never loaded
    with pytest.raises(CheckpointError, match="step00000008 is not a complete checkpoint"):
        mgr.resolve("auto")
    (root / "latest").write_text("step00000006\n")
    (root / "best").write_text("step00000002\n")
    assert mgr.resolve("auto") == (root, "step00000006")
    assert mgr.resolve(str(root / "step00000004")) == (root, "step00000004")
    assert mgr.resolve(str(root)) == (root, "step00000006")
    assert mgr.resolve("never") is None
    with pytest.raises(CheckpointError, match="not a complete checkpoint tag directory"):
        mgr.resolve(str(tmp_path))
    mgr._prune()
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step00000002", "step00000006"]


def test_runlog_truncates_on_resume_feeds_the_monitor_and_plots(tmp_path):
    class Monitor:  # DeepSpeed's MonitorMaster interface
        enabled, events = True, []

        def write_events(self, events):
            self.events += events

    mon = Monitor()
    log = RunLog(tmp_path, monitor=mon)
    for s in range(1, 6):
        log.log(s, "train", {"loss": 1.0 / s, "lr": 1e-3}, samples=8 * s)
    log.log(4, "val", {"val_loss": 0.3, "rmse_z500@6h": float("nan")})
    log.close()
    assert ("train/loss", 0.5, 16) in mon.events  # x axis: samples seen, when given
    assert ("val/val_loss", 0.3, 4) in mon.events  # else the step
    assert not any(e[0] == "val/rmse_z500@6h" for e in mon.events)  # non-finite values are not sent
    log = RunLog(tmp_path, resume_step=3)  # crashed after step 5, resumed from step 3
    log.log(4, "train", {"loss": 0.2, "lr": 1e-3})
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [(int(r["step"]), r["kind"]) for r in rows] == [(1, "train"), (2, "train"), (3, "train"), (4, "train")]
    assert math.isclose(float(rows[-1]["loss"]), 0.2)
    png = log.plot()
    assert png.stat().st_size > 5000


def test_monitor_sections_default_to_the_run_folder_and_name_a_missing_package(tmp_path, monkeypatch):
    out = _check(
        [
            "log.tensorboard=true",
            f"log.dir={tmp_path}",
            'ds.csv_monitor={"enabled": true}',
            'ds.wandb={"enabled": false}',
        ]
    )
    assert out["tensorboard"] == {"enabled": True, "output_path": str(tmp_path), "job_name": "tensorboard"}
    assert out["csv_monitor"]["output_path"] == str(tmp_path) and not out["wandb"]["enabled"]
    mine = _check(["log.tensorboard=true", 'ds.tensorboard={"enabled": true, "output_path": "/x", "job_name": "j"}'])
    assert mine["tensorboard"] == {"enabled": True, "output_path": "/x", "job_name": "j"}  # the job file's wins
    assert "tensorboard" not in _check(["log.tensorboard=false"])
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(
        ConfigError,
        match=r"tensorboard.enabled \(log.tensorboard\): the tensorboard package is not "
        r"installed; pip install 'jigsaw-weathermixer\[monitor\]'",
    ):
        _check(["log.tensorboard=true"])
    assert "tensorboard" not in _check(['log.tensorboard="auto"'])  # auto: quietly off without the package


def test_peak_follows_dtype_and_tf32():
    """MFU is read against the peak the GEMMs run at: bf16, TF32 (fp32 with train.tf32) or plain fp32."""
    import torch

    from weathermixer.train.engine import apply_tf32, chip_peak_tflops, resolve_tf32

    assert chip_peak_tflops("NVIDIA A100-SXM4-40GB", torch.bfloat16, tf32=False) == 312.0
    assert chip_peak_tflops("NVIDIA A100-SXM4-40GB", torch.float32, tf32=True) == 156.0
    assert chip_peak_tflops("NVIDIA A100-SXM4-40GB", torch.float32, tf32=False) == 19.5
    assert chip_peak_tflops("NVIDIA H100 80GB HBM3", torch.float32, tf32=False) == 66.9
    assert chip_peak_tflops("Some Unknown GPU", torch.bfloat16, tf32=False) is None
    assert chip_peak_tflops("Tesla V100-SXM2-16GB", torch.float32, tf32=True) is None  # no TF32 units
    assert resolve_tf32(True, cuda=False) is False and apply_tf32(None, cuda=False) is False
    assert resolve_tf32(False, cuda=True) is False and resolve_tf32(True, cuda=True) is True


def test_loss_row_weights_choice_keeps_validation_on_cell_areas():
    """loss.latitude_weights changes the training loss's rows only: validation scores with cell areas."""
    import numpy as np
    import torch

    from weathermixer.latitudes import latitude_weights as evaluation_weights
    from weathermixer.train.loss import row_weights

    lat = np.linspace(-90, 90, 32)
    rows = slice(0, 16)
    area = torch.as_tensor(evaluation_weights(lat, "area")).float()[rows]
    for name in ("area", "cos", "uniform"):
        score, loss = row_weights(lat, rows, name, "cpu")
        torch.testing.assert_close(score, area)
        expected = {
            "area": area,
            "uniform": torch.ones(16),
            "cos": torch.as_tensor(evaluation_weights(lat, "cos")).float()[rows],
        }[name]
        torch.testing.assert_close(loss, expected)
    assert row_weights(lat, rows, "uniform", "cpu")[1][0] == 1.0 and area[0] < 0.05  # the pole row


def test_validator_is_due_at_every_nth_and_the_last_step():
    """The Validator decides when it runs from the job alone (no trainer): validation.every, and the last step."""
    from types import SimpleNamespace

    from weathermixer.train.validation import Validator

    def due(every, steps=10):
        job = SimpleNamespace(validation=SimpleNamespace(every=every), train=SimpleNamespace(steps=steps))
        none = dict.fromkeys(("mesh", "data_cfg", "engine", "forecast", "to_device", "dtype", "device", "chans"))
        v = Validator(job, **none, w_lat=None, w_chan=None, std=None, headline=[], defaults_dir=None, rank=0)
        return [s for s in range(1, steps + 1) if v.should_validate(s)]

    assert due(3) == [3, 6, 9, 10]
    assert due(0) == [10]
    assert due(5) == [5, 10]
