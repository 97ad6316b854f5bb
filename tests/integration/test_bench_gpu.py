"""benchmarks/bench_gpu.py --smoke: every code path of the GPU benchmark on the CPU at tiny shapes,
through the command a user types, writing the JSON layout of the GPU run (CI never has a GPU)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PARTS = ("before", "after", "profile", "reference", "planner", "calibration")


def test_smoke_runs_every_part_and_writes_the_gpu_layout(tmp_path):
    out = tmp_path / "smoke.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/bench_gpu.py", "--smoke", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    for part in PARTS:
        assert "error" not in doc[part], (part, doc[part])
    for run in ("before", "after"):
        assert {"samples_per_s", "tflops", "mfu", "peak_mem_GB", "command"} <= set(doc[run])
        assert doc[run]["samples_per_s"] > 0
    # before restores the earlier settings; after runs the job file's options, checked for host syncs
    assert all(s in doc["before"]["settings"] for s in doc["before_overrides"])
    assert any("eager" in ln for ln in doc["before"]["log_lines"])
    assert any("fused AdamW" in ln and "compiled" in ln for ln in doc["after"]["log_lines"])
    assert doc["after"]["sync_warnings"]["count"] == 0
    prof = doc["profile"]
    assert set(prof["seconds"]) == {"gemm", "elementwise", "copies", "optimizer", "communication"}
    assert prof["seconds"]["gemm"] > 0 and prof["top"] and Path(prof["trace"]).is_file()
    assert doc["reference"]["step_s"] > 0 and doc["reference"]["optimizer"] == "torch AdamW fused=True"
    assert doc["planner"]["predicted"] and doc["planner"]["memory_GB"] > 0
    assert doc["calibration"]["gemm"] and doc["calibration"]["model_step"]["step_s"] > 0
    assert {"mfu", "samples_per_s", "after_over_reference", "after_over_before"} <= set(doc["summary"])


def test_without_a_gpu_and_without_smoke_it_says_so():
    proc = subprocess.run(
        [sys.executable, "benchmarks/bench_gpu.py", "--out", "/dev/null"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "--smoke" in proc.stderr


def test_a_failing_part_records_its_error_and_the_rest_still_run(tmp_path):
    """The after run fails at start-up (no such compiler backend): its error is kept, the same run with
    the blocks eager takes its place in the time left, and the profile comes from that run."""
    out = tmp_path / "fail.json"
    proc = subprocess.run(
        [
            sys.executable,
            "benchmarks/bench_gpu.py",
            "--smoke",
            "--out",
            str(out),
            "--parts",
            "after,profile,planner",
            "--set",
            "train.compile_backend=no_such_backend",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert "no_such_backend" in doc["after"]["stderr_tail"] and "error" in doc["after"]
    assert doc["after_eager"]["samples_per_s"] > 0
    assert "error" not in doc["profile"] and "error" not in doc["planner"]
