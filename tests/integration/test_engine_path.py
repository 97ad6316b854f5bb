"""Training goes through DeepSpeed's engine: ZeRO-3 gradient accumulation, clipping on every
ZeRO stage, ZeRO-3 prefetch, DeepSpeed's profilers and monitors. Checked against an independent
serial twin (plain PyTorch AdamW on one process), not against the trainer's own 1x1x1 run."""

import json
from pathlib import Path

import pytest

from jigsaw_ext.testing import run_workers
from tests import engine_workers
from tests.integration.test_training_runs import small_job

pytestmark = pytest.mark.distributed

STEPS = 3
# global batch 8 = micro 2 x accumulation 2 x dp 2; rollout 2 (latent, both leads in the loss)
COMMON = [
    "train.steps=3",
    "train.rollout=2",
    "train.random_rollout=false",
    "train.warmup=1",
    "train.lr=3e-3",
    "validation.every=0",
    "checkpoint.every=0",
    "checkpoint.at_end=false",
    "checkpoint.best=false",
    "log.every=1",
    "log.csv=false",
    "log.plot=false",
    "ds.train_micro_batch_size_per_gpu=2",
    "ds.gradient_accumulation_steps=2",
    "ds.gradient_clipping=0.05",
]


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("engine")
    path = small_job(tmp, rollout=2, resume="never")
    j = json.loads(path.read_text())
    j["weathermixer"]["log"]["dir"] = str(tmp / "out")
    path.write_text(json.dumps(j))
    return path


@pytest.mark.parametrize(
    "mesh,stage", [((2, 1, 2), 3), ((2, 2, 1), 1), ((2, 1, 2), 2)], ids=["2x1x2-zero3", "2x2x1-zero1", "2x1x2-zero2"]
)
def test_accumulation_and_clipping_match_the_serial_twin(job, mesh, stage):
    """Parameters after 3 steps of 2 accumulated micro batches with global-norm clipping equal
    the serial twin that accumulates both micro batches (<= 1e-5). Before the forward went through
    engine(...), ZeRO-3 kept only the last micro batch's gradient."""
    dp, domain, tp = mesh
    settings = COMMON + [
        f"mesh.dp={dp}",
        f"mesh.domain={domain}",
        f"mesh.tp={tp}",
        f"ds.zero_optimization.stage={stage}",
    ]
    twin = engine_workers.serial_twin(str(job), settings, STEPS)
    assert min(twin["grad_norms"]) > 0.05, f"the test must clip: {twin['grad_norms']}"
    res = run_workers(
        engine_workers.trainer_against_twin,
        dp * domain * tp,
        str(job),
        settings,
        twin["params"],
        timeout=300,
        preload=["deepspeed", "weathermixer.train.trainer"],
    )
    for rank, r in enumerate(res):
        assert r["max_err"] <= 1e-5, f"rank {rank}: {r['max_err']:.2e} on {r['worst']}"
        assert r["global_steps"] == STEPS and r["micro_steps"] == 2 * STEPS, r
    if stage == 3:
        assert all(r["zero3_trace_complete"] for r in res), "ZeRO-3 never completed its module trace: no prefetch"


def _cli(job, out, *settings, env=None):
    from tests.integration.test_training_runs import ENV, _launch

    args = ["--domain", "1", "--tp", "1"] + [a for s in settings for a in ("--set", s)]
    import subprocess

    return subprocess.run(
        _launch(job, out, 1, *args, launcher="python"),
        cwd=Path(__file__).parents[2],
        env=dict(ENV, **(env or {})),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_profilers_and_monitors_work_through_the_cli(job, tmp_path):
    """wall_clock_breakdown and flops_profiler print their reports (they crashed at step 1 while the
    forward bypassed the engine); the job file's tensorboard, csv_monitor and wandb (offline, no
    network) sections receive the project's rows; a log file gets plain lines, no carriage returns."""
    out = tmp_path / "run"
    run = _cli(
        job,
        out,
        "train.steps=4",
        "log.every=2",
        "validation.every=2",
        "log.tensorboard=false",
        "ds.wall_clock_breakdown=true",
        'ds.flops_profiler={"enabled": true, "profile_step": 2}',
        "ds.steps_per_print=2",
        'ds.tensorboard={"enabled": true}',
        'ds.csv_monitor={"enabled": true}',
        'ds.wandb={"enabled": true, "project": "jigsaw-test"}',
        env={"WANDB_MODE": "offline"},
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    text = run.stdout + run.stderr
    assert "DeepSpeed Flops Profiler" in text and "fwd_microstep" in text, text[-3000:]
    assert "\r" not in run.stdout and "step 4/4 loss" in run.stdout

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in (
        "train/loss",
        "train/samples_per_s",
        "train/tflops_per_rank",
        "train/peak_mem_gb_max",
        "val/val_loss",
        "val/rmse_z500@6h",
        "val/rmse_t850@12h",
    ):
        assert tag in tags, (tag, sorted(tags))
    import csv

    with open(out / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["kind"] == "train"]
    tb = [e.value for e in acc.Scalars("train/loss")]
    assert [float(r["loss"]) for r in rows] == pytest.approx(tb, rel=1e-6)
    assert [e.step for e in acc.Scalars("train/loss")] == [16, 32]  # samples seen (global batch 8)
    assert (out / "csv_monitor" / "train_loss.csv").is_file() and (
        out / "csv_monitor" / "val_rmse_u10@6h.csv"
    ).is_file()
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb")), sorted(p.name for p in (out / "wandb").iterdir())


def test_nonfinite_loss_is_found_within_the_log_interval_and_never_saved(job, tmp_path):
    """No host round trip per micro step: the loss is checked on the device and collected every
    log.every steps and before every validation and checkpoint. The job stops within that bound,
    names the first non-finite step and rank, and no checkpoint holds a non-finite state."""
    import re

    pattern = r"non-finite loss at step (\d+) on rank\(s\) \[0\] \(found at step (\d+);"
    for every_log, every_ckpt in ((5, 0), (5, 1)):
        out = tmp_path / f"nan{every_ckpt}"
        run = _cli(
            job,
            out,
            "train.lr=1e12",
            "train.warmup=0",
            "train.steps=40",
            f"log.every={every_log}",
            f"checkpoint.every={every_ckpt}",
            "validation.every=0",
            "checkpoint.resume=never",
        )
        assert run.returncode == 1, run.stdout[-2000:] + run.stderr[-2000:]
        m = re.search(pattern, run.stderr)
        assert m, run.stderr[-2000:]
        first, found = int(m.group(1)), int(m.group(2))
        if every_ckpt:  # checked before every save: the step that went non-finite is never saved
            assert found == first, (first, found)
            latest = (out / "checkpoints" / "latest").read_text().strip()
            assert int(latest.removeprefix("step")) == first - 1 and f"checkpoints/{latest}" in run.stderr
        else:  # found at the next log line
            assert first <= found < first + every_log and found % every_log == 0, (first, found)
            assert "last good checkpoint: none" in run.stderr
