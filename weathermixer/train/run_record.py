"""What a checkpoint records about the run besides the model and optimizer state: the random
number generators' states, the job (mesh, model, layouts, statistics, data) and the provenance of
the code (package versions, git commit)."""

from __future__ import annotations

import functools
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@functools.lru_cache(maxsize=1)
def provenance() -> dict:
    """Package versions and the git commit of the code (None outside a git checkout; never fails)."""
    from importlib import metadata

    versions = {"python": sys.version.split()[0]}
    for pkg in ("torch", "deepspeed", "megatron-core", "jigsaw-weathermixer", "numpy", "safetensors"):
        try:
            versions[pkg] = metadata.version(pkg)
        except Exception:  # noqa: BLE001 - not installed, or broken metadata
            versions[pkg] = None
    commit = dirty = None
    try:
        here = Path(__file__).resolve().parent
        run = dict(cwd=here, capture_output=True, text=True, timeout=10)
        r = subprocess.run(["git", "rev-parse", "HEAD"], **run)
        if r.returncode == 0 and r.stdout.strip():
            commit = r.stdout.strip()
            d = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], **run)
            dirty = bool(d.stdout.strip()) if d.returncode == 0 else None
    except Exception:  # noqa: BLE001 - no git, a timeout: the commit is unknown
        commit = dirty = None
    return {"versions": versions, "git_commit": commit, "git_dirty": dirty}


def job_info(job, ds: dict, world: int, dtype, model, group_names, stats, data_cfg) -> dict:
    """What a checkpoint records besides DeepSpeed's files: enough to read it on any mesh
    (every parameter's block layout, the optimizer's groups by name) without the model code, and
    to forecast from it without the training config or stats file: the normalisation statistics
    the run trained with, the gridded data config it read (variables, levels and dims mapping,
    dt), package versions and the git commit."""
    from .job import zero_stage

    return {
        "mesh": job.mesh.model_dump(mode="json"),
        "model": job.model.model_dump(mode="json"),
        "zero_stage": zero_stage(ds),
        "world_size": world,
        "dtype": str(dtype).replace("torch.", ""),
        "weathermixer": job.model_dump(mode="json"),
        "deepspeed": ds,
        "layouts": {n: p.block_layout.to_json() for n, p in model.named_parameters()},
        "param_groups": group_names,
        "stats": stats,
        "data": None if data_cfg is None or data_cfg.fake else data_cfg.model_dump(mode="json"),
        "provenance": provenance(),
    }
