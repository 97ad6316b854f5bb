"""The README's main job runs end to end (short), and bad settings stop every rank with one message."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.test_training_runs import free_port

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "deepspeed_configs" / "quickstart_cpu.json"
ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")


def _run(cmd, timeout=300):
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def _small_config(tmp_path) -> Path:
    """The quickstart with two months of synthetic data written under tmp_path."""
    job = json.loads(CONFIG.read_text())
    job["weathermixer"]["data"].update(path=str(tmp_path / "synthetic"), end="2020-02-29 18:00", val_start="2020-02-15")
    job["weathermixer"]["validation"].update(samples=16, every=0)
    job["weathermixer"]["log"].update(dir=str(tmp_path / "run"))
    path = tmp_path / "job.json"
    path.write_text(json.dumps(job))
    return path


def test_two_process_domain_run_trains_and_reports_skill(tmp_path):
    config = _small_config(tmp_path)
    run = _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
            "train.py",
            "--deepspeed_config",
            str(config),
            "--domain",
            "2",
            "--tp",
            "1",
            "--steps",
            "6",
        ]
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "writing the synthetic ERA5-like store" in run.stdout
    assert list((tmp_path / "synthetic").glob("*.zarr")) and list((tmp_path / "synthetic").glob("*.stats.json"))
    final = re.search(r"final: model_rmse=(\S+) persistence_rmse=(\S+) ratio=(\S+)", run.stdout)
    assert final and all(float(v) > 0 for v in final.groups())
    # train.bind_cores: 2 ranks x 1 thread each get their own slice of the cores (when there are 2)
    cores = len(os.sched_getaffinity(0))
    assert (f"each local rank bound to {cores // 2} core(s)" in run.stdout) == (cores >= 2), run.stdout[-2000:]


def test_single_process_run_and_bad_key(tmp_path):
    config = _small_config(tmp_path)
    run = _run(
        [sys.executable, "train.py", "--deepspeed_config", str(config), "--domain", "1", "--tp", "1", "--steps", "2"]
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "final: model_rmse=" in run.stdout
    bad = json.loads(CONFIG.read_text())
    bad["weathermixer"]["model"]["hiden"] = 3
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    run = _run([sys.executable, "train.py", "--deepspeed_config", str(path), "--domain", "1", "--tp", "1"])
    assert run.returncode == 2 and "model.hiden: unknown key" in run.stderr, run.stderr[-2000:]
