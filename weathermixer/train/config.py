"""Loading a training job file: the "weathermixer" section of a DeepSpeed JSON file, validated against
the training-job schema (weathermixer.config.train), with the command line's flags and --set
KEY=VALUE settings applied.

    {"train_micro_batch_size_per_gpu": 4, "optimizer": {...}, ...,      <- DeepSpeed's own keys
     "weathermixer": {"mesh": {...}, "model": {...}, "train": {...}, "data": {...}}}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import ConfigError, apply_setting, parse, parse_value, read_job_file
from ..config.train import TrainJobConfig

# CLI flag -> path inside the "weathermixer" section
OVERRIDES = {
    "steps": ("train", "steps"),
    "dp": ("mesh", "dp"),
    "domain": ("mesh", "domain"),
    "tp": ("mesh", "tp"),
    "output_dir": ("log", "dir"),
    "data_path": ("data", "path"),
    "resume": ("checkpoint", "resume"),
    "init_from": ("checkpoint", "init_from"),
}


def load_train_job(
    path: str | Path, overrides: dict[str, Any] | None = None, settings: list[str] | None = None
) -> tuple[TrainJobConfig, dict[str, Any]]:
    """(validated project section with CLI overrides applied, DeepSpeed's part of the file).

    overrides: flag -> value for the OVERRIDES flags; settings: ["train.lr=1e-3",
    "ds.zero_optimization.stage=2", ...] (JSON values; "ds." addresses DeepSpeed's keys)."""
    path = Path(path)
    data = read_job_file(path)
    section = data.pop("weathermixer", {})
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: 'weathermixer' must be an object")
    for flag, value in (overrides or {}).items():
        if value is not None:
            apply_setting(section, ".".join(OVERRIDES[flag]), value, str(path))
    for item in settings or []:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.lr=1e-3 or ds.zero_optimization.stage=2")
        if key.startswith("ds."):
            apply_setting(data, key[3:], parse_value(text), "--set")
        else:
            apply_setting(section, key, parse_value(text), "--set")
    log = section.setdefault("log", {})
    if isinstance(log, dict):
        log.setdefault("dir", f"runs/{path.stem}")
    return parse(TrainJobConfig, section, str(path)), data
