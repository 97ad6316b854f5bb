"""The command lines as a user types them: no CLI takes an abbreviation of an option (argparse's default
would read `--deepspeed` as `--deepspeed_config`), train.py takes DeepSpeed's own `--deepspeed` flag, and
every CLI that writes a file makes the folder it writes into before doing any work (or stops, naming it)."""

import argparse
import ast
import importlib
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
SOURCES = ["jigsaw_ext", "weathermixer", "benchmarks", "docs", "launchers", "train.py"]
UK = ROOT / "deepspeed_configs" / "era5_uk_t2m_cpu.json"


def _run(cmd, timeout=300):
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def _parser_calls(tree: ast.AST):
    """Every `ArgumentParser(...)` and `<subparsers>.add_parser(...)` call in a module."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
            if name in ("ArgumentParser", "add_parser"):
                yield node


def test_every_argument_parser_in_the_source_refuses_abbreviations():
    """Scans the source (console scripts, `python -m` modules, benchmarks, figure scripts)."""
    files = [p for s in SOURCES for p in ([ROOT / s] if s.endswith(".py") else (ROOT / s).rglob("*.py"))]
    calls, missing = 0, []
    for path in files:
        for call in _parser_calls(ast.parse(path.read_text())):
            calls += 1
            ok = any(
                k.arg == "allow_abbrev" and isinstance(k.value, ast.Constant) and k.value.value is False
                for k in call.keywords
            )
            if not ok:
                missing.append(f"{path.relative_to(ROOT)}:{call.lineno}")
    assert calls >= 25, calls  # the scan sees the project's parsers
    assert not missing, f"argument parsers that take abbreviations: {missing}"


def _console_scripts() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def test_every_console_script_refuses_abbreviations(monkeypatch, capsys):
    """Each installed entry point's main(["--help"]), with every parser it builds recorded."""
    built = []
    init = argparse.ArgumentParser.__init__

    def record(self, *a, **k):
        init(self, *a, **k)
        built.append(self)

    monkeypatch.setattr(argparse.ArgumentParser, "__init__", record)
    monkeypatch.setattr("faulthandler.register", lambda *a, **k: None)  # train's; needs a real stderr
    scripts = _console_scripts()
    assert len(scripts) >= 10
    for name, target in scripts.items():
        module, func = target.split(":")
        built.clear()
        with pytest.raises(SystemExit) as exit_:
            getattr(importlib.import_module(module), func)(["--help"])
        assert exit_.value.code == 0, name
        assert built, f"{name}: no argument parser built"
        assert all(p.allow_abbrev is False for p in built), f"{name}: a parser takes abbreviations"
    capsys.readouterr()


def test_train_takes_deepspeeds_flags_refuses_abbreviations_and_a_finished_run_says_so(tmp_path):
    """`python train.py --deepspeed --deepspeed_config X` trains (and says once that TensorBoard is off
    where its package is missing); the same command again says the run is complete and exits 0 before
    any engine or data; with more --steps it resumes and trains on."""
    from tests.integration.test_training_runs import small_job

    job = small_job(tmp_path, rollout=1, resume="auto")
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "train.py",
        "--deepspeed",
        "--deepspeed_config",
        str(job),
        "--domain",
        "1",
        "--tp",
        "1",
        "--output-dir",
        str(out),
        "--set",
        "checkpoint.every=2",
        "--set",
        'log.tensorboard="auto"',
        "--steps",
        "2",
    ]
    hide = tmp_path / "no_tensorboard"  # a Python without the tensorboard package
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['tensorboard'] = None\n")
    run = subprocess.run(
        cmd, cwd=ROOT, env=dict(ENV, PYTHONPATH=f"{ROOT}:{hide}"), capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.count("TensorBoard logging is off") == 1, run.stdout[-3000:]  # said once, not silently skipped
    assert not (out / "tensorboard").exists()
    assert (out / "checkpoints" / "latest").read_text().strip() == "step00000002"
    again = _run(cmd)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "the run is complete at step 2" in again.stdout and "raise --steps" in again.stdout, again.stdout
    assert "mesh 1x1x1" not in again.stdout and "steps 3..2" not in again.stdout  # no engine, no start line
    more = _run(cmd[:-1] + ["3"])
    assert more.returncode == 0, more.stdout[-3000:] + more.stderr[-3000:]
    assert "(step 2)" in more.stdout and "steps 3..3" in more.stdout, more.stdout[-2000:]
    bad = _run([sys.executable, "train.py", "--deepspeed_conf", str(job)])
    assert bad.returncode == 2 and "unrecognized arguments: --deepspeed_conf" in bad.stderr, bad.stderr[-2000:]


@pytest.mark.skipif(
    not (ROOT / "../shared/data/real/era5-2mt-2019-03-uk.grib").exists(),
    reason="the real-data sample is not in ../shared/data/real",
)
def test_data_stats_creates_the_output_folder_or_stops_before_the_work(tmp_path):
    """The real-data recipe's statistics command into a folder that does not exist yet; then into a
    folder that cannot be made (a file in the way): exit 2 naming it, with no statistics computed."""
    out = tmp_path / "runs" / "era5_uk_t2m_cpu" / "stats.json"
    cmd = [
        sys.executable,
        "-m",
        "weathermixer.data",
        "stats",
        "--config",
        str(UK),
        "--start",
        "2019-03-01",
        "--end",
        "2019-03-16T23",
        "--out",
    ]
    run = _run(cmd + [str(out)])
    assert run.returncode == 0 and out.stat().st_size > 0, run.stderr[-2000:]
    (tmp_path / "blocked").write_text("")
    run = _run(cmd + [str(tmp_path / "blocked" / "stats.json")])
    assert run.returncode == 2, run.stderr[-2000:]
    assert f"--out {tmp_path / 'blocked' / 'stats.json'}: cannot create its folder" in run.stderr
    assert "a file is in the way" in run.stderr and "time steps" not in run.stderr


def test_other_writers_create_their_folders(tmp_path):
    """The planner's --json and --emit-config, and the synthetic store, into folders that do not exist."""
    from weathermixer import plan
    from weathermixer.data.__main__ import main as data_main

    js, cfg = tmp_path / "a" / "b" / "plan.json", tmp_path / "c" / "job.json"
    assert (
        plan.main(
            [
                "--preset",
                "paper_1b",
                "--hardware",
                "a100-40gb-4pernode-2xhdr200",
                "--world",
                "4",
                "--json",
                str(js),
                "--emit-config",
                str(cfg),
                "--top",
                "1",
            ]
        )
        == 0
    )
    assert js.stat().st_size > 0 and cfg.stat().st_size > 0
    store = tmp_path / "d" / "e" / "s.zarr"
    assert (
        data_main(["synth", "--out", str(store), "--grid", "4x8", "--start", "2020-01-01", "--end", "2020-01-02"]) == 0
    )
    assert (store / "zarr.json").is_file() or (store / ".zgroup").is_file()
