"""What a checkpoint was written with, read from a DeepSpeed tag's job.json (checked against its
manifest) or a consolidated checkpoint's index.json."""

from __future__ import annotations

from pathlib import Path

from .common import is_consolidated, read_index, read_json, resolve
from .errors import CheckpointFormatError
from .manifest import verify_file


def read_job_info(path: str | Path) -> dict:
    """What a checkpoint was written with: the keys this package reads (mesh, zero_stage, dtype, step,
    layouts, param_groups, deepspeed) and whatever the application recorded beside them (its job
    configuration, statistics, provenance), the same for a DeepSpeed tag and a consolidated copy."""
    path = resolve(path)
    if is_consolidated(path):
        idx = read_index(path)
        return dict(
            idx["app"],
            deepspeed=idx["deepspeed"],
            mesh=idx["source"]["mesh"],
            zero_stage=idx["source"]["zero_stage"],
            step=idx["step"],
            dtype=idx["source"].get("dtype", "float32"),
            layouts={n: t["layout"] for n, t in idx["tensors"].items()},
        )
    if not (path / "COMPLETE").is_file():
        raise CheckpointFormatError(f"{path}: no COMPLETE marker (an interrupted save?)")
    if (path / "job.json").is_file():
        verify_file(path / "job.json")
    return read_json(path / "job.json")
