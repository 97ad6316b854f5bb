"""The schema of a training job: the "weathermixer" section of a DeepSpeed JSON file, extended. Read
by training (weathermixer.train.config loads job files) and by inference (a checkpoint's job).

    {"train_micro_batch_size_per_gpu": 4, "optimizer": {...}, ...,      <- DeepSpeed's own keys
     "weathermixer": {"mesh": {...}, "model": {...}, "train": {...}, "data": {...}}}

Batch sizes are DeepSpeed's (train_micro_batch_size_per_gpu = samples per model replica per micro
step, gradient_accumulation_steps); the learning rate and its schedule are set here only (train.py
writes them into the optimizer and scheduler it hands DeepSpeed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, model_validator

from . import JobConfig
from .data import DataConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ParamGroupRule(_Strict):
    """Parameters whose name matches one of `match` (fnmatch patterns on the module path, e.g.
    "blocks.*.norm*", "*.bias") form one AdamW group; the first matching rule wins."""

    match: list[str] = Field(min_length=1)
    lr_scale: float = Field(1.0, ge=0, description="this group's peak lr = train.lr * lr_scale")
    weight_decay: float | None = Field(None, ge=0, description="null = the optimizer's weight_decay")


class TrainConfig(_Strict):
    steps: int = Field(200, ge=1, description="optimizer steps")
    lr: float = Field(1e-3, gt=0, description="peak learning rate of AdamW")
    warmup: int = Field(20, ge=0, description="linear warm-up steps")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine decay ends at lr * min_lr_ratio")
    rollout: int | None = Field(None, ge=1, description="K: leads trained per sample; null = model.rollout")
    random_rollout: bool = Field(
        True, description="draw k from 1..K each step (seeded, the same on every rank); false = always K"
    )
    rollout_mode: Literal["latent", "autoregressive"] = Field(
        "latent",
        description="latent: embed once, apply the block stack k times; autoregressive: feed each "
        "decoded forecast back in data space",
    )
    param_groups: list[ParamGroupRule] = Field(
        default_factory=lambda: [ParamGroupRule(match=["*.bias", "*norm*"], weight_decay=0.0)],
        description="AdamW groups (per-group lr scale, weight decay); unmatched parameters form the default group",
    )
    curriculum: list[tuple[int, int]] = Field(
        default_factory=list,
        description="rollout curriculum [[first step, K], ...]: from that step on, leads "
        "are drawn from 1..K (or K with random_rollout=false); the largest K "
        "is the rollout the data serves; [] = train.rollout throughout",
    )
    lead_weights: list[float] | None = Field(
        None,
        description="loss weight of lead 1..K (length = the largest K); a step with k leads averages "
        "them with weights w_1..w_k / sum(w_1..w_k); null = equal weights",
    )
    checkpoint_rollout: bool = Field(
        False,
        description="activation checkpointing across rollout steps: keep only each step's input "
        "for backward and recompute the block stack there (memory of one step; about "
        "+1 forward of the blocks per step in compute; ZeRO 0-2)",
    )
    stop_after: int | None = Field(
        None,
        ge=1,
        description="end this run after this many steps with a "
        "checkpoint (e.g. a batch-job time limit); "
        "rerun to continue the same schedule",
    )
    seed: int = Field(0, description="sample-order and rollout-length seed")
    dist_timeout_s: float = Field(
        300.0, gt=0, description="timeout of every collective: a dead rank stops the others after at most this"
    )
    bind_cores: bool = Field(
        True,
        description="CPU runs with several ranks per node: bind each rank to its own "
        "slice of the cores (skipped when the ranks' threads would not "
        "fit on the cores without sharing)",
    )
    tf32: bool | None = Field(
        None,
        description="fp32 matmuls and convolutions in TF32 on GPUs that have it (torch's "
        "allow_tf32 switches); null = on for compute capability 8.0 (Ampere) and newer. "
        "No effect on CPU or on bf16/fp16 GEMMs",
    )
    compile_blocks: bool = Field(
        False,
        description="regional torch.compile: each mixer block compiled on its own (one graph per block, "
        "compiled once and reused by every block of the same shapes), fusing its LayerNorm, "
        "GELU, bias and residual passes; the first steps pay the compilation",
    )
    compile_backend: str = Field("inductor", description="torch.compile backend of compile_blocks")
    sync_debug: Literal["warn", "error"] | None = Field(
        None,
        description="GPU: torch.cuda.set_sync_debug_mode during every training step after the first: "
        "'warn' prints each host-device synchronisation inside a step, 'error' raises; "
        "null = off",
    )


class LossConfig(_Strict):
    """Latitude-weighted MSE over channels with per-variable and per-level weights (normalised to
    mean 1 over the model's channels)."""

    variable_weights: dict[str, float] = Field(default_factory=dict, description="variable name -> weight (default 1)")
    level_weights: dict[int, float] | Literal["pressure"] = Field(
        default_factory=dict,
        description="pressure level -> weight of the atmospheric channels at that "
        'level (default 1); "pressure" = proportional to the level',
    )
    latitude_weights: Literal["area", "cos", "uniform"] = Field(
        "area",
        description="row weights of the training loss: WeatherBench 2 cell areas (as validation and "
        "evaluate score), cos(latitude) (pole rows get no gradient) or uniform (every row "
        "alike: pole rows, whose cells are tiny, train as fast as the others)",
    )
    tendency: bool = Field(
        False,
        description="loss on normalised tendencies (pred - x0) / std(x(t+dt) - "
        "x(t)) instead of normalised states (needs data stats)",
    )


class ValidationConfig(_Strict):
    every: int = Field(0, ge=0, description="steps between validations (0 = only at the end)")
    samples: int = Field(32, ge=1, description="held-out samples per validation")
    batch: int = Field(8, ge=1, description="samples per validation forward pass")
    reencode_candidates: list[int] | None = Field(
        None,
        description="latent steps per encode tried for the forecast's default at the end of training "
        "(null = 1, 2, 4, .. and K); the best is written to <checkpoint dir>/"
        "forecast_defaults.json",
    )
    reencode_steps: int | None = Field(
        None,
        ge=1,
        description="forecast steps the candidates are scored over (null = 4 K); [] candidates or 0 samples: off",
    )
    variables: list[str] | None = Field(
        None,
        description="headline channels reported in physical units (model channel names or z500, "
        "t850, t2m, u10...); null = those of z500, t850, t2m, u10 present, else the first 4",
    )


class CheckpointConfig(_Strict):
    dir: str | None = Field(None, description="null = <log.dir>/checkpoints")
    every: int = Field(0, ge=0, description="steps between checkpoints (0 = none during training)")
    at_end: bool = Field(True, description="save after the last step")
    best: bool = Field(True, description="keep the checkpoint with the best validation loss (tag pointer 'best')")
    keep_last: int = Field(
        2, ge=1, description="periodic checkpoints kept (older ones are deleted once a newer one is complete)"
    )
    resume: str = Field(
        "auto",
        description="auto: continue from <dir>/latest if present; never; a checkpoint "
        "root / tag directory (same mesh and ZeRO stage), or a consolidated "
        "checkpoint (any mesh)",
    )
    init_from: str | None = Field(
        None,
        description="weights only (fine-tuning) from any checkpoint: tag, root "
        "or consolidated directory; fresh optimizer and schedule",
    )


class LogConfig(_Strict):
    dir: str = Field("runs/default", description="output directory: metrics.csv, tensorboard/, loss.png, checkpoints/")
    every: int = Field(10, ge=1, description="steps between log lines / CSV rows")
    csv: bool = True
    tensorboard: bool | Literal["auto"] = Field(
        "auto",
        description="shorthand for DeepSpeed's tensorboard monitor section writing to dir/tensorboard; "
        "auto = on when the tensorboard package (extra [monitor]) is installed",
    )
    plot: bool = Field(True, description="loss curve PNG at the end")
    peak_tflops: float | None = Field(
        None, gt=0, description="device peak for MFU (null = known GPUs only; no MFU on CPU)"
    )
    profile_step: int | None = Field(
        None,
        ge=1,
        description="profile this training step with torch.profiler: "
        "<log.dir>/profile/ gets its trace (chrome format) and "
        "a breakdown (GEMM, elementwise, copies, optimizer, "
        "communication, idle; top kernels) per rank",
    )
    break_lock: bool = Field(
        False,
        description="take over the RUN.lock of log.dir / checkpoint.dir when its "
        "holder runs on another host (or container), whose liveness "
        "cannot be checked from here; only when that run is known to "
        "be gone. A live holder on this host is never taken over",
    )


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
        return DataConfig(
            path=str(store),
            stats=str(store) + ".stats.json",
            dt_hours=self.dt_hours,
            leads=leads,
            prefetch=self.prefetch,
            splits={"train": (self.start, str(last_train)), "val": (self.val_start, self.end)},
        )


class TrainJobConfig(JobConfig):
    train: TrainConfig = Field(default_factory=TrainConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    data: SyntheticDataConfig | DataConfig = Field(default_factory=SyntheticDataConfig, discriminator="source")

    @property
    def rollout(self) -> int:
        """The most leads trained from one sample (what the data serves and validation scores)."""
        if self.train.curriculum:
            return max(k for _, k in self.train.curriculum)
        return self.train.rollout or self.model.rollout

    def rollout_cap(self, step: int) -> int:
        """K at `step`: the curriculum stage's K (the last stage starting at or before it), else the rollout."""
        stages = [k for first, k in sorted(self.train.curriculum) if first <= step]
        return (
            stages[-1]
            if stages
            else (min(k for _, k in self.train.curriculum) if self.train.curriculum else self.rollout)
        )

    @model_validator(mode="after")
    def _check_rollout(self):
        tc = self.train
        if any(first < 1 or k < 1 for first, k in tc.curriculum):
            raise ValueError(f"train.curriculum {tc.curriculum}: every stage is [first step >= 1, K >= 1]")
        if tc.curriculum and tc.rollout and tc.rollout != self.rollout:
            raise ValueError(
                f"train.rollout={tc.rollout} but the largest K of train.curriculum is {self.rollout}: set one of them"
            )
        if tc.lead_weights is not None:
            if len(tc.lead_weights) != self.rollout or min(tc.lead_weights) < 0 or sum(tc.lead_weights) <= 0:
                raise ValueError(
                    f"train.lead_weights has {len(tc.lead_weights)} value(s); expected {self.rollout} "
                    f"non-negative weights (one per lead 1..{self.rollout}) with a positive sum"
                )
        skip = self.model.pixel_skip
        # an autoregressive rollout re-encodes every step: each of its steps is lead 1 of the skip head
        latent = self.rollout if tc.rollout_mode == "latent" else 1
        longest = max([latent] + list(self.validation.reencode_candidates or []))
        if skip and longest > skip:
            raise ValueError(
                f"model.pixel_skip={skip} has coefficients for leads 1..{skip}, but the job rolls out "
                f"or re-encodes every {longest} steps (train.curriculum / train.rollout / "
                f"validation.reencode_candidates): set model.pixel_skip >= {longest}"
            )
        return self
