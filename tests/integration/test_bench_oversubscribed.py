"""benchmarks/bench_oversubscribed.py (the CPU profile's call_wait_s) runs end to end at a tiny
setting, on the rank layouts it names. Timings are reported by the benchmark, never asserted here."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]


def _bench(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "benchmarks/bench_oversubscribed.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )


def _pairs(axis, rank):
    (pair,) = [p for p in axis if rank in p]
    return pair


def test_tiny_run_writes_every_figure_on_the_layouts_it_names(tmp_path):
    out = tmp_path / "o.json"
    args = ["--matmul-n", "32", "--shard-mb", "0.01", "--reps", "1", "--iters", "2", "--out", str(out)]
    run = _bench(*args)
    assert run.returncode == 0, run.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert json.loads(run.stdout) == doc
    (point,) = doc["points"]
    runs = ("cores", "cores_matmuls_alone", "cores_collectives_alone", "cores_async", "replicas", "one_group")
    assert sorted(point["ms_per_loop"]) == sorted(runs) and all(v > 0 for v in point["ms_per_loop"].values())
    assert all(math.isfinite(v) for v in doc["call_wait_s"].values())
    assert set(doc["call_wait_s"]) == {"cores", "replicas", "one_group"}
    assert math.isfinite(doc["cores_hidden_fraction"])
    # per call beyond the parts: with as many ranks as cores, beyond once; with twice as many, beyond twice
    ms, beyond = point["ms_per_loop"], point["call_ms_beyond_parts"]
    parts = ms["cores_matmuls_alone"] + ms["cores_collectives_alone"]
    assert beyond["cores"] == pytest.approx((ms["cores"] - parts) / 2, abs=2e-3)
    assert beyond["replicas"] == pytest.approx((ms["replicas"] - 2 * parts) / 2, abs=2e-3)
    # 2 cores: one pair; 4 ranks as two independent pairs; 4 ranks as one 2 x 2 group on two axes
    lay = doc["layouts"]
    assert lay["cores"] == lay["cores_matmuls_alone"] == lay["cores_collectives_alone"] == [[[0, 1]]]
    assert lay["cores_async"] == [[[0, 1]]]
    assert lay["replicas"] == [[[0, 1], [2, 3]]]
    first, second = lay["one_group"]
    for rank in range(4):
        a, b = _pairs(first, rank), _pairs(second, rank)
        assert set(a) & set(b) == {rank} and len(set(a) | set(b)) == 3


def test_layouts_restrict_the_run_and_its_figures(tmp_path):
    out = tmp_path / "o.json"
    args = ["--matmul-n", "32", "--shard-mb", "0.01", "--reps", "1", "--iters", "2", "--out", str(out)]
    run = _bench(*args, "--layouts", "cores", "cores_async", "cores_collectives_alone")
    assert run.returncode == 0, run.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert sorted(doc["layouts"]) == ["cores", "cores_async", "cores_collectives_alone"]
    assert doc["call_wait_s"] == {}  # (no loop of the matmuls alone: no parts to go beyond)
    assert math.isfinite(doc["cores_hidden_fraction"])
    bad = _bench("--layouts", "cores", "pairs", timeout=120)
    assert bad.returncode == 2 and "--layouts pairs: unknown" in bad.stderr


def test_refuses_an_odd_core_count():
    run = _bench("--cores", "3", timeout=120)
    assert run.returncode == 2 and "--cores 3" in run.stderr
