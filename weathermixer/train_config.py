"""Settings of the training job: the "weathermixer" section of a DeepSpeed JSON file, extended.

    {"train_micro_batch_size_per_gpu": 4, "optimizer": {...}, ...,      <- DeepSpeed's own keys
     "weathermixer": {"mesh": {...}, "model": {...}, "train": {...}, "data": {...}}}

Batch sizes are DeepSpeed's (train_micro_batch_size_per_gpu = samples per model replica per micro
step, gradient_accumulation_steps); the learning rate and its schedule are set here only (train.py
writes them into the optimizer and scheduler it hands DeepSpeed).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

import pandas as pd

from .config import ConfigError, JobConfig, parse, read_job_file
from .data.config import DataConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TrainConfig(_Strict):
    steps: int = Field(200, ge=1, description="optimizer steps")
    lr: float = Field(1e-3, gt=0, description="peak learning rate of AdamW")
    warmup: int = Field(20, ge=0, description="linear warm-up steps")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine decay ends at lr * min_lr_ratio")
    rollout: int | None = Field(None, ge=1, description="leads trained per sample (latent rollout); "
                                                        "null = model.rollout")
    seed: int = Field(0, description="sample-order seed")
    log_every: int = Field(10, ge=1, description="steps between loss log lines")
    val_samples: int = Field(32, ge=1, description="held-out samples in the final evaluation")
    val_batch: int = Field(8, ge=1, description="samples per evaluation forward pass")
    dist_timeout_s: float = Field(300.0, gt=0, description="timeout of every collective")


class SyntheticDataConfig(_Strict):
    """The embedded default: an ERA5-like WeatherBench 2 zarr store (weathermixer.data.synth) written
    once to `path` with its normalisation statistics, then read like any other data set (each rank
    reads only its block)."""

    source: Literal["synthetic"] = "synthetic"
    path: str = Field("runs/synthetic", description="directory for the generated store (reused if present)")
    seed: int = 0
    noise: float = Field(0.05, ge=0, description="std of the per-step noise in standardised units")
    start: str = "2020-01-01"
    end: str = "2020-06-30 18:00"
    val_start: str = Field("2020-05-16", description="first start time of the validation split")
    dt_hours: float = Field(6.0, gt=0)
    prefetch: int = Field(2, ge=0)

    def store_path(self, model) -> Path:
        h, w = model.grid
        return Path(self.path) / f"era5like_{h}x{w}_seed{self.seed}_{pd.Timestamp(self.start):%Y%m%d}.zarr"

    def gridded(self, model, leads: int) -> DataConfig:
        """The same data as a gridded data set, once it has been written."""
        store = self.store_path(model)
        last_train = pd.Timestamp(self.val_start) - pd.Timedelta(hours=self.dt_hours)
        return DataConfig(path=str(store), stats=str(store) + ".stats.json", dt_hours=self.dt_hours, leads=leads,
                          prefetch=self.prefetch,
                          splits={"train": (self.start, str(last_train)), "val": (self.val_start, self.end)})


class TrainJobConfig(JobConfig):
    train: TrainConfig = Field(default_factory=TrainConfig)
    data: SyntheticDataConfig | DataConfig = Field(default_factory=SyntheticDataConfig, discriminator="source")

    @property
    def rollout(self) -> int:
        return self.train.rollout or self.model.rollout


# CLI flag -> path inside the "weathermixer" section
OVERRIDES = {"steps": ("train", "steps"), "dp": ("mesh", "dp"), "domain": ("mesh", "domain"),
             "tp": ("mesh", "tp")}


def load_train_job(path: str | Path, overrides: dict[str, Any] | None = None
                   ) -> tuple[TrainJobConfig, dict[str, Any]]:
    """(validated project section with CLI overrides applied, DeepSpeed's part of the file)."""
    path = Path(path)
    data = read_job_file(path)
    section = data.pop("weathermixer", {})
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: 'weathermixer' must be an object")
    for flag, value in (overrides or {}).items():
        if value is None:
            continue
        group, key = OVERRIDES[flag]
        node = section.setdefault(group, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{path}: weathermixer.{group} must be an object")
        node[key] = value
    return parse(TrainJobConfig, section, str(path)), data
