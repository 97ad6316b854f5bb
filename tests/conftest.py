"""Test tiers: tests/unit runs in-process in seconds; tests/integration starts processes (gloo ranks,
training jobs through their launchers, the packaged wheel) and is marked `slow` here. Modules that
start several ranks carry `pytestmark = pytest.mark.distributed`; tests that need a CUDA device carry
`gpu`. The markers are declared in pyproject.toml ([tool.pytest.ini_options], --strict-markers)."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the worker modules (tests.workers, ...) are imported by name in the spawned processes, which inherit
# this path; the repository root also makes `jigsaw_ext` and `weathermixer` importable uninstalled
sys.path.insert(0, os.fspath(ROOT))

INTEGRATION = ROOT / "tests" / "integration"


def pytest_configure(config):
    """The modules the workers of tests/integration import: the forkserver of jigsaw_ext.testing.run_workers
    imports them once, when the first test starts ranks, not every rank of every test (no cost to a
    run that starts no ranks)."""
    from jigsaw_ext.testing import preload_in_workers

    preload_in_workers(
        "deepspeed",
        "megatron.core.tensor_parallel",
        "megatron.core.dist_checkpointing",
        "megatron.core.hyper_comm_grid",
        "weathermixer.model",
        "weathermixer.baselines",
        "weathermixer.train.trainer",
        "weathermixer.forecast",
        "xarray",
        "zarr",
    )


def pytest_collection_modifyitems(items):
    for item in items:
        if INTEGRATION in Path(item.fspath).resolve().parents:
            item.add_marker(pytest.mark.slow)
