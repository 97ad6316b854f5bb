"""The training job end to end, through its launchers: the same loss curve on every mesh and ZeRO
stage, exact resume, and the failure paths (non-finite loss, a killed rank)."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "deepspeed_configs" / "quickstart_cpu.json"
ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
STEPS = 6


def small_job(tmp: Path, rollout: int, resume: str) -> Path:
    """The quickstart on two months of synthetic data written under tmp (once, shared by the runs
    that use this file), a step-by-step log, validation on 8 samples, no TensorBoard."""
    j = json.loads(CONFIG.read_text())
    w = j["weathermixer"]
    w["data"].update(path=str(tmp / "synthetic"), end="2020-02-29 18:00", val_start="2020-02-15")
    w["train"].update(steps=STEPS, rollout=rollout)
    w["validation"].update(samples=8, every=0)
    w["log"].update(every=1, tensorboard=False, plot=False)
    w["checkpoint"].update(every=0, resume=resume)
    path = tmp / "job.json"
    path.write_text(json.dumps(j))
    return path


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    return small_job(tmp_path_factory.mktemp("training"), rollout=3, resume="never")


def free_port() -> int:
    """A port nobody listens on now (fixed ports clash when test runs share a machine)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(job, out, nproc, *args, launcher="torchrun", port=None):
    port = port or free_port()
    if nproc == 1 and launcher == "python":
        cmd = [sys.executable, "train.py"]
    elif launcher == "deepspeed":
        cmd = [
            sys.executable,
            "-m",
            "deepspeed.launcher.runner",
            "--num_gpus",
            str(nproc),
            "--master_port",
            str(port),
            "train.py",
        ]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_port",
            str(port),
            "train.py",
        ]
    return cmd + ["--deepspeed_config", str(job), "--output-dir", str(out), *args]


def _run(cmd, timeout=300):
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def _losses(out) -> dict[int, float]:
    with open(Path(out) / "metrics.csv") as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f) if r["kind"] == "train"}


def _train(job, out, mesh, *settings, nproc=None, launcher="torchrun"):
    dp, domain, tp = mesh
    args = ["--dp", str(dp), "--domain", str(domain), "--tp", str(tp)]
    for s in settings:
        args += ["--set", s]
    run = _run(_launch(job, out, nproc or dp * domain * tp, *args, launcher=launcher))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return _losses(out), run


def _max_rel(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b), (sorted(a), sorted(b))
    return max(abs(a[s] - b[s]) / abs(b[s]) for s in a)


def test_loss_curve_is_the_same_on_every_mesh_and_zero_stage(job, tmp_path):
    """Same global batch (8) and seed, rollout k drawn from 1..3: 1x1x1 versus 1x2x2 (ZeRO-2),
    2x1x2 (ZeRO-3, bf16 off), 1x3x1 (uneven latitude bands, ZeRO-1, 2 accumulation steps), within
    fp32 tolerance. Also the single-process entry point (plain python) and the CSV/plot outputs."""
    ref, run = _train(job, tmp_path / "ref", (1, 1, 1), "log.plot=true", launcher="python")
    assert "final: model_rmse=" in run.stdout and (tmp_path / "ref" / "loss.png").stat().st_size > 5000
    assert json.loads((tmp_path / "ref" / "memory.json").read_text())["peak_bytes_per_rank"][0] > 1e8
    assert len(ref) == STEPS
    variants = {
        "1x2x2-zero2": ((1, 2, 2), ["ds.zero_optimization.stage=2"]),
        "2x1x2-zero3": ((2, 1, 2), ["ds.zero_optimization.stage=3", "ds.train_micro_batch_size_per_gpu=4"]),
        "1x3x1-zero1-gas2": (
            (1, 3, 1),
            ["ds.zero_optimization.stage=1", "ds.train_micro_batch_size_per_gpu=4", "ds.gradient_accumulation_steps=2"],
        ),
    }
    errs = {}
    for name, (mesh, settings) in variants.items():
        losses, _ = _train(job, tmp_path / name, mesh, *settings)
        errs[name] = _max_rel(losses, ref)
    assert max(errs.values()) <= 1e-5, errs


def test_resume_continues_the_same_loss_curve(job, tmp_path):
    """2N steps straight versus N steps, stop (checkpoint), resume, N steps: equal losses, on 1x2x1
    with ZeRO-1 and a checkpoint every 2 steps (the 'latest' pointer moves, older tags are pruned)."""
    mesh, common = (
        (2, 1, 1),
        [
            "ds.zero_optimization.stage=1",
            "ds.train_micro_batch_size_per_gpu=4",
            "checkpoint.every=2",
            "checkpoint.keep_last=1",
            "checkpoint.resume=auto",
            "validation.every=2",
        ],
    )  # validations mid-run too (a finite pass left early)
    straight, _ = _train(job, tmp_path / "straight", mesh, *common)
    first, run1 = _train(job, tmp_path / "split", mesh, *common, "train.stop_after=3")
    assert sorted(first) == [1, 2, 3] and "stopping after step 3" in run1.stdout
    ck = tmp_path / "split" / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step00000003"
    best = (ck / "best").read_text().strip()  # the best validation tag is kept beside keep_last=1
    assert sorted(p.name for p in ck.iterdir() if p.is_dir()) == sorted({"step00000003", best})
    both, run2 = _train(job, tmp_path / "split", mesh, *common)
    assert "resuming from" in run2.stdout and "(step 3)" in run2.stdout
    assert _max_rel(both, straight) <= 1e-6
    assert (ck / "latest").read_text().strip() == f"step{STEPS:08d}"


def test_nonfinite_loss_names_step_rank_and_checkpoint(job, tmp_path):
    run = _run(
        _launch(
            job,
            tmp_path / "nan",
            1,
            "--domain",
            "1",
            "--tp",
            "1",
            "--set",
            "train.lr=1e12",
            "--set",
            "train.warmup=0",
            "--set",
            "checkpoint.every=1",
            "--set",
            "train.steps=30",
            "--set",
            "checkpoint.resume=never",
            launcher="python",
        )
    )
    assert run.returncode == 1, run.stdout[-2000:] + run.stderr[-2000:]
    msg = run.stderr
    assert "non-finite loss at step" in msg and "on rank(s) [0]" in msg and "last good checkpoint:" in msg, msg[-2000:]
    assert "checkpoints/step" in msg


def test_killed_rank_brings_the_job_down_and_a_rerun_resumes(job, tmp_path):
    """deepspeed launcher through launchers/local_cpu.sh, 2 ranks: SIGKILL rank 1 after the step-4
    checkpoint; the job exits non-zero well within the distributed timeout, the survivor's message
    and the job's last line name the rank that died (and its host and pid); the same command then
    resumes from the latest complete checkpoint and finishes."""
    import socket

    out = tmp_path / "kill"
    args = [
        "--output-dir",
        str(out),
        "--domain",
        "2",
        "--tp",
        "1",
        "--set",
        "train.steps=400",
        "--set",
        "checkpoint.every=2",
        "--set",
        "checkpoint.resume=auto",
        "--set",
        "train.dist_timeout_s=60",
    ]
    env = dict(ENV, NPROC="2", MASTER_PORT=str(free_port()), CONFIG=str(job))
    proc = subprocess.Popen(
        ["bash", str(ROOT / "launchers" / "local_cpu.sh"), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    marker = out / "checkpoints" / "step00000004" / "COMPLETE"
    deadline = time.time() + 240
    while not marker.exists():
        assert proc.poll() is None and time.time() < deadline, "training ended or stalled before step 4"
        time.sleep(0.2)
    victim = _rank_pid(str(out), rank=1)
    os.kill(victim, signal.SIGKILL)
    t0 = time.time()
    try:
        output, _ = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the job did not exit within 90 s of a rank being killed")
    assert proc.returncode != 0 and time.time() - t0 < 60, output[-3000:]
    named = f"rank 1 (host {socket.gethostname()}, pid {victim}) died first"
    survivor = [line for line in output.splitlines() if "(rank 0)" in line and named in line]
    assert survivor and "this rank stops" in survivor[0], output[-3000:]
    last = output.strip().splitlines()[-1]
    assert last.startswith("weathermixer: the job failed") and named in last, output[-3000:]
    assert not (out / "RUN.lock").exists()  # the survivor released it
    latest = (out / "checkpoints" / "latest").read_text().strip()
    step = int(latest.removeprefix("step"))
    assert step >= 4
    rerun = _run(
        _launch(
            job,
            out,
            2,
            "--domain",
            "2",
            "--tp",
            "1",
            "--set",
            "train.steps=400",
            "--set",
            f"train.stop_after={2}",
            "--set",
            "checkpoint.every=2",
            "--set",
            "checkpoint.resume=auto",
            launcher="deepspeed",
        )
    )
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"resuming from {out / 'checkpoints' / latest} (step {step})" in rerun.stdout
    assert f"stopping after step {step + 2}" in rerun.stdout


def _rank_pid(marker: str, rank: int) -> int:
    """PID of the training process with RANK=rank whose command line mentions `marker`."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in cmdline and "train.py" in cmdline and f"RANK={rank}".encode() in env:
            return int(pid)
    raise AssertionError(f"no training process of rank {rank} found")
