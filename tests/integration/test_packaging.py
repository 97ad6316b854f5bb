"""The project as an installed package: the wheel holds every module and the job files, the console
scripts run from any folder (the deepspeed launcher included), `--deepspeed_config NAME` finds a
packaged job file, and every third-party import is a declared dependency.

The wheel test builds from a copy of the sources (no build/ left in the checkout), installs with
`pip install --no-deps --target SITE` and imports every module in a subprocess started outside the
repository whose sys.path holds neither the repository nor the editable install's finder, checking
that each module came from SITE. No network: the build uses the environment's setuptools.
"""

import ast
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.integration.test_training_runs import free_port
from weathermixer.config import ConfigError, job_file_presets, read_job_file, resolve_job_file

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("jigsaw_ext", "weathermixer")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SCRIPTS = {
    "weathermixer-train": "weathermixer.train.main:cli",
    "weathermixer-data": "weathermixer.data.__main__:main",
    "weathermixer-forecast": "weathermixer.inference.forecast:main",
    "weathermixer-evaluate": "weathermixer.evaluation.evaluate:main",
    "weathermixer-scorecard": "weathermixer.evaluation.scorecard:main",
    "weathermixer-size": "weathermixer.model.size:main",
    "weathermixer-plan": "weathermixer.plan:main",
    "weathermixer-selfcheck": "weathermixer.selfcheck:main",
    "jigsaw-selfcheck": "jigsaw_ext.selfcheck:main",
    "jigsaw-checkpoint": "jigsaw_ext.checkpoint:main",
}
ENV = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
ENV.pop("PYTHONPATH", None)


def source_modules() -> set[str]:
    """Every module of the two packages in the checkout (symlinked folders, i.e. job_files, not followed)."""
    mods = set()
    for pkg in PACKAGES:
        for dirpath, dirnames, filenames in os.walk(ROOT / pkg):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            rel = Path(dirpath).relative_to(ROOT)
            for f in filenames:
                if f.endswith(".py"):
                    parts = rel.parts + (() if f == "__init__.py" else (f[:-3],))
                    mods.add(".".join(parts))
    return mods


def _pip(*args, cwd):
    run = subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q", *args],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, f"pip {' '.join(args)}:\n{run.stdout[-3000:]}{run.stderr[-3000:]}"


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory) -> Path:
    """Build the wheel from a copy of the sources and install it (no dependencies) into a folder."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    src.mkdir()
    for path in ROOT.iterdir():  # pyproject.toml, README.md, LICENSE, ...: whatever the metadata names
        if path.is_file():
            shutil.copy2(path, src / path.name)
    for name in (*PACKAGES, "deepspeed_configs"):
        shutil.copytree(ROOT / name, src / name, symlinks=True, ignore=ignore)  # job_files stays a symlink
    _pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(src), cwd=tmp)
    wheels = list((tmp / "dist").glob("jigsaw_weathermixer-*.whl"))
    assert len(wheels) == 1, wheels
    _pip("install", "--no-deps", "--target", str(tmp / "site"), str(wheels[0]), cwd=tmp)
    return tmp / "site"


def test_wheel_holds_every_module_and_job_file(installed_wheel):
    site = installed_wheel
    expected = source_modules()
    assert {"weathermixer.data", "weathermixer.data.reader", "weathermixer.train.main"} <= expected
    shipped = {
        m
        for m in (
            ".".join(p.relative_to(site).with_suffix("").parts).removesuffix(".__init__") for p in site.rglob("*.py")
        )
        if m.split(".")[0] in PACKAGES
    }
    assert not expected - shipped, f"modules missing from the wheel: {sorted(expected - shipped)}"
    jobs = sorted(p.name for p in (ROOT / "deepspeed_configs").glob("*.json"))
    assert sorted(p.name for p in (site / "weathermixer" / "job_files").glob("*.json")) == jobs
    profiles = sorted(p.name for p in (ROOT / "jigsaw_ext" / "plan" / "profiles").glob("*.json"))
    assert profiles and sorted(p.name for p in (site / "jigsaw_ext" / "plan" / "profiles").glob("*.json")) == profiles
    assert not (site / "deepspeed_configs").exists() and not (site / "tests").exists()

    # entry_points.txt of the wheel: exactly the documented console scripts
    (dist_info,) = site.glob("jigsaw_weathermixer-*.dist-info")
    text = (dist_info / "entry_points.txt").read_text()
    scripts = dict(re.findall(r"^([\w-]+) = (\S+)$", text.split("[console_scripts]")[1], re.M))
    assert scripts == SCRIPTS

    # import every module (and each script's target) from the installed folder only, outside the repo
    outside = site.parent / "elsewhere"
    outside.mkdir()
    code = f"""
import importlib, json, os, sys
site, root = {str(site)!r}, {str(ROOT)!r}
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
sys.path[:] = [p for p in sys.path if "__editable__" not in p and p not in ("", ".")
               and os.path.realpath(p) != os.path.realpath(root)]
assert not any(m.split(".")[0] in {PACKAGES!r} for m in sys.modules), "imported before the path was cleaned"
assert sys.path[0] == site, sys.path[:3]
wrong = {{}}
for name in {sorted(expected)!r}:
    mod = importlib.import_module(name)
    if not mod.__file__.startswith(site + "/"):
        wrong[name] = mod.__file__
for target in {sorted(SCRIPTS.values())!r}:
    mod, func = target.split(":")
    assert callable(getattr(importlib.import_module(mod), func)), target
from weathermixer.config import resolve_job_file
print(json.dumps({{"wrong": wrong, "preset": str(resolve_job_file("quickstart_cpu"))}}))
"""
    env = dict(ENV, PYTHONPATH=str(site))
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=outside, env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["wrong"] == {}, f"imported from outside the installed wheel: {out['wrong']}"
    assert out["preset"] == str(site / "weathermixer" / "job_files" / "quickstart_cpu.json")


def _bin(name: str) -> str:
    path = Path(sys.executable).parent / name
    assert path.exists(), (
        f"console script {name} is not installed in {path.parent}: reinstall the project "
        f'(pip install torch==2.13.0 -e ".[test]")'
    )
    return str(path)


def test_console_scripts_run_from_any_folder(tmp_path):
    for name in SCRIPTS:
        _bin(name)
    run = subprocess.run(
        [_bin("weathermixer-train"), "--help"], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0 and "--deepspeed_config" in run.stdout and "quickstart_cpu" in run.stdout, run.stderr
    # a preset name resolves from a folder that has no deepspeed_configs/ (the quickstart: 162,048 parameters)
    run = subprocess.run(
        [_bin("weathermixer-size"), "--config", "quickstart_cpu"],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout)["parameters"] == 162048


def test_deepspeed_launcher_starts_the_installed_entry(tmp_path):
    """`deepspeed --no_python weathermixer-train` starts the console script on every rank and passes it
    --local_rank=N; a bad preset name then stops every rank with exit code 2 before any collective."""
    deepspeed = _bin("deepspeed")
    run = subprocess.run(
        [
            deepspeed,
            "--num_gpus",
            "2",
            "--master_port",
            str(free_port()),
            "--no_python",
            "weathermixer-train",
            "--deepspeed_config",
            "no_such_preset",
            "--domain",
            "2",
            "--tp",
            "1",
        ],
        cwd=tmp_path,
        env=dict(ENV, PATH=f"{Path(sys.executable).parent}:{ENV['PATH']}"),
        capture_output=True,
        text=True,
        timeout=240,
    )
    log = run.stdout + run.stderr
    assert "spawned with command: ['weathermixer-train', '--local_rank=1'" in log, log[-3000:]
    assert "unrecognized arguments" not in log, log[-3000:]
    assert "weathermixer-train: 'no_such_preset' is neither a file nor a packaged job file" in log, log[-3000:]
    assert run.returncode == 2, log[-3000:]


def test_job_file_presets(tmp_path, monkeypatch):
    shipped = {p.stem for p in (ROOT / "deepspeed_configs").glob("*.json")}
    assert set(job_file_presets()) == shipped
    assert read_job_file("quickstart_cpu") == json.loads((ROOT / "deepspeed_configs/quickstart_cpu.json").read_text())
    with pytest.raises(ConfigError, match=r"'quickstart'.*presets: .*quickstart_cpu"):
        read_job_file("quickstart")
    with pytest.raises(ConfigError, match="config file not found"):  # a path (".json", "/") is never a preset
        read_job_file("missing.json")
    with pytest.raises(ConfigError, match="config file not found"):
        read_job_file("somewhere/quickstart_cpu")
    monkeypatch.chdir(tmp_path)  # an existing file of that name wins over the preset
    (tmp_path / "quickstart_cpu").write_text('{"train_micro_batch_size_per_gpu": 1}')
    assert resolve_job_file("quickstart_cpu") == Path("quickstart_cpu")
    assert read_job_file("quickstart_cpu") == {"train_micro_batch_size_per_gpu": 1}


def _requirement_names(reqs) -> set[str]:
    return {re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0].lower().replace("_", "-") for r in reqs}


def test_every_third_party_import_is_declared():
    """Each distribution the packages import (at any depth, e.g. inside a function) is a dependency, or
    belongs to an optional extra (monitor, remote) when imported only on demand."""
    project = PYPROJECT["project"]
    required = _requirement_names(project["dependencies"])
    extras = {k: _requirement_names(v) for k, v in project["optional-dependencies"].items()}
    optional = set().union(*(v for k, v in extras.items() if k != "test"))
    top_level = set()
    for mod in source_modules():
        parts = mod.split(".")
        path = ROOT.joinpath(*parts)
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                top_level |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                top_level.add(node.module.split(".")[0])
    third_party = top_level - set(sys.stdlib_module_names) - set(PACKAGES) - {"__future__"}
    dists = importlib.metadata.packages_distributions()
    undeclared = {}
    for name in sorted(third_party):
        owners = {d.lower().replace("_", "-") for d in dists.get(name, [name])}
        if not owners & (required | optional):
            undeclared[name] = sorted(owners)
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"
    assert "pandas" in required and "safetensors" in required
    assert {"tensorboard", "wandb"} <= extras["monitor"] and "jigsaw-weathermixer" in extras["test"]
