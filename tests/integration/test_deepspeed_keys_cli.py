"""Misspelt DeepSpeed keys and bad values stop train.py with exit status 2 and one message, before any
process group or output folder exists (the checks themselves: tests/unit/test_deepspeed_keys.py)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_cli_exits_2_before_any_collective(tmp_path):
    cmd = [
        sys.executable,
        "train.py",
        "--deepspeed_config",
        "deepspeed_configs/quickstart_cpu.json",
        "--domain",
        "1",
        "--tp",
        "1",
        "--output-dir",
        str(tmp_path / "run"),
        "--set",
        "ds.zero_optimizaton.stage=1",
    ]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "zero_optimizaton: unknown DeepSpeed key" in res.stderr and "did you mean zero_optimization?" in res.stderr
    assert not (tmp_path / "run").exists()  # nothing started


@pytest.mark.parametrize(
    "setting, message",
    [
        ('ds.data_types.grad_accum_dtypee="fp32"', "data_types.grad_accum_dtypee: unknown DeepSpeed key"),
        ('ds.gradient_clipping="abc"', "gradient_clipping: 'abc'; a number >= 0"),
    ],
)
def test_cli_exits_2_before_setup_on_nested_keys_and_values(tmp_path, setting, message):
    cmd = [
        sys.executable,
        "train.py",
        "--deepspeed_config",
        "deepspeed_configs/quickstart_cpu.json",
        "--domain",
        "1",
        "--tp",
        "1",
        "--output-dir",
        str(tmp_path / "run"),
        "--set",
        setting,
    ]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "run").exists()
