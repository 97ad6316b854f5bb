"""benchmarks/bench_plan_cpu.py: the planner's two predictions (the shipped profile, and the figures
measured in the same minutes as the runs) beside each mesh's measured step. --smoke runs every part
(the replayed rates, the call waits, the training loop's cost, train.py) at a tiny setting; --reprice
re-prices a results file, running nothing, and refuses a file that is not one. Timings are reported by
the benchmark, never asserted here."""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results_plan_cpu_2core.json"


def _bench(*args):
    return subprocess.run(
        [sys.executable, "benchmarks/bench_plan_cpu.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )


def test_reprice_puts_both_predictions_beside_the_measurements(tmp_path):
    doc = json.loads(RESULTS.read_text())
    for row in doc["meshes"].values():  # what --reprice must write back
        for key in [k for k in row if k.startswith(("predicted", "error"))]:
            del row[key]
    doc.pop("same_minute_medians", None)
    src, out = tmp_path / "in.json", tmp_path / "out.json"
    src.write_text(json.dumps(doc))
    run = _bench("--reprice", str(src), "--out", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(out.read_text())
    figures = doc["same_minute_figures"]
    med = got["same_minute_medians"]
    assert med["trainer_step_s"] == pytest.approx(statistics.median(f["trainer_step_s"] for f in figures), abs=1e-6)
    assert med["rates"]["gemm_GFLOPs"] == pytest.approx(
        statistics.median(f["rates"]["gemm_GFLOPs"] for f in figures), abs=1e-3
    )
    assert set(got["meshes"]) == {"1x1x1", "1x2x1", "1x1x2", "1x2x2", "2x2x1"}
    for name, row in got["meshes"].items():
        for suffix in ("", "_same_minute"):
            pred = row[f"predicted_step_s{suffix}"]
            assert pred > 0 and row[f"error{suffix}"] == pytest.approx(pred / row["measured_step_s"] - 1, abs=2e-3)
            assert sum(row[f"predicted_seconds{suffix}"].values()) == pytest.approx(pred, abs=1e-3)
        ranks = 1
        for n in name.split("x"):
            ranks *= int(n)
        # the training loop's cost per rank, stretched where ranks share the 2 cores
        trainer = row["predicted_seconds_same_minute"]["trainer"]
        assert trainer == pytest.approx(max(1, ranks / 2) * med["trainer_step_s"], abs=1e-4)


def test_smoke_measures_every_same_minute_figure_and_prices_with_it(tmp_path):
    out = tmp_path / "smoke.json"
    run = _bench("--smoke", "--out", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert json.loads(run.stdout) == doc
    (figures,) = doc["same_minute_figures"]
    assert figures["rates"]["gemm_GFLOPs"] > 0 and figures["rates"]["elementwise_GBps"] > 0
    assert set(figures["call_wait_s"]) == {"cores", "replicas", "one_group"}
    assert figures["tiny_model_step_s"] > 0 and figures["trainer_step_s"] >= 0
    (row,) = doc["meshes"].values()
    assert row["measured_step_s"] > 0 and row["predicted_step_s"] > 0 and row["predicted_step_s_same_minute"] > 0
    assert row["predicted_seconds_same_minute"]["trainer"] == pytest.approx(figures["trainer_step_s"], abs=1e-4)


def test_reprice_refuses_a_file_that_is_not_its_own(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"points": []}))
    run = _bench("--reprice", str(bad))
    assert run.returncode == 2 and f"--reprice {bad}: not a results file of this benchmark" in run.stderr
    missing = _bench("--reprice", str(tmp_path / "none.json"))
    assert missing.returncode == 2 and "none.json" in missing.stderr
