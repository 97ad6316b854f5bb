"""The training job before any process talks: checks of the job file against the launch (every
rank runs them, so a bad setting exits everywhere instead of leaving ranks in a collective), the
DeepSpeed config completed from the project section, and the data the job reads.

    job, ds = load_train_job("quickstart_cpu")
    ds = check_job(job, ds, world=4, cuda=False)
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import shutil
from pathlib import Path

from jigsaw_ext.files import atomic_write_text

from ..config import ConfigError
from ..config.train import TrainJobConfig
from .deepspeed_keys import check_deepspeed_keys
from .loss import channel_loss_weights, headline_channels


def resolve_batch(ds: dict, dp: int) -> tuple[int, int]:
    """(micro batch per model replica, gradient accumulation steps) from DeepSpeed's three batch
    keys, with the same rule DeepSpeed applies (train_batch = micro * accumulation * dp)."""
    tb = ds.get("train_batch_size")
    micro = ds.get("train_micro_batch_size_per_gpu")
    gas = ds.get("gradient_accumulation_steps")
    for key, v in (
        ("train_batch_size", tb),
        ("train_micro_batch_size_per_gpu", micro),
        ("gradient_accumulation_steps", gas),
    ):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ConfigError(f"{key}: must be a positive integer, got {v!r}")
    if micro is None and tb is None:
        raise ConfigError(
            "set train_micro_batch_size_per_gpu (samples per model replica per micro step) "
            "or train_batch_size in the DeepSpeed config"
        )
    if micro is None:
        gas = gas or 1
        micro, rem = divmod(tb, gas * dp)
        if rem or micro == 0:
            raise ConfigError(
                f"train_batch_size={tb} is not a positive multiple of gradient_accumulation_steps={gas} x dp={dp}"
            )
    gas = gas or (tb // (micro * dp) if tb is not None else 1)
    if tb is not None and tb != micro * gas * dp:
        raise ConfigError(
            f"train_batch_size={tb} != train_micro_batch_size_per_gpu={micro} x gradient_accumulation_steps={gas} "
            f"x dp={dp} (mesh.dp; one micro batch per model replica, shared by its domain x tp ranks): "
            f"remove train_batch_size or make it {micro * gas * dp}"
        )
    return micro, gas


def zero_stage(ds: dict) -> int:
    return int((ds.get("zero_optimization") or {}).get("stage", 0))


def check_job(job: TrainJobConfig, ds: dict, world: int, cuda: bool) -> dict:
    """Validate the job against the launch and return the DeepSpeed config to hand to initialize()."""
    _check_model_and_data(job, world)
    check_deepspeed_keys(ds)  # a misspelt DeepSpeed key would be ignored by DeepSpeed
    dp = job.mesh.dp
    micro, gas = resolve_batch(ds, dp)
    out = dict(
        ds,
        optimizer=_optimizer_section(ds, job.train.lr, cuda),
        train_micro_batch_size_per_gpu=micro,
        gradient_accumulation_steps=gas,
        train_batch_size=micro * gas * dp,
    )
    out.setdefault("steps_per_print", 10**9)
    out.update(monitor_sections(job, out))
    _check_precision_and_zero(out, job, cuda)
    return out


def _check_model_and_data(job: TrainJobConfig, world: int) -> None:
    """The mesh fits the world and the model, the loss and validation name real channels, the data exists."""
    from jigsaw_ext.mesh import Mesh, validate_world

    from ..grid import Geometry

    try:
        validate_world(job.mesh, world)
        Geometry(job.model, Mesh.virtual(job.mesh))
        channel_loss_weights(job.model.channels, job.loss.model_copy(update={"tendency": False}))
        headline_channels(job.model.channels.names, job.validation.variables)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if job.train.rollout_mode == "autoregressive" and job.model.rollout != 1:
        raise ConfigError(
            f"train.rollout_mode=autoregressive feeds each decoded lead back in; set model.rollout=1 "
            f"(it is {job.model.rollout})"
        )
    data = job.data
    if data.source == "gridded" and not data.fake and "://" not in data.path and not Path(data.path).exists():
        raise ConfigError(f"data.path: {data.path} does not exist")
    if data.source == "gridded" and data.stats and not data.fake and not Path(data.stats).exists():
        raise ConfigError(f"data.stats: {data.stats} does not exist (python -m weathermixer.data stats ...)")


def _optimizer_section(ds: dict, lr: float, cuda: bool) -> dict:
    """DeepSpeed's optimizer section: AdamW/Adam, the learning rate from weathermixer.train.lr."""
    opt = dict(ds.get("optimizer") or {"type": "AdamW"})
    if opt.get("type", "").lower() not in ("adamw", "adam"):
        raise ConfigError(f"optimizer.type: {opt.get('type')!r} not supported; allowed: AdamW, Adam")
    if "scheduler" in ds:
        raise ConfigError(
            "scheduler: remove it; the schedule is weathermixer.train.warmup/min_lr_ratio (linear "
            "warm-up + cosine decay)"
        )
    params = dict(opt.get("params") or {})
    if "lr" in params:
        raise ConfigError(
            "optimizer.params.lr: set weathermixer.train.lr instead (one source for the learning rate and its schedule)"
        )
    params["lr"] = lr
    if not cuda:
        params.setdefault("torch_adam", True)  # else DeepSpeed JIT-compiles fused Adam (~90 s on CPU)
    opt["params"] = params
    return opt


def _check_precision_and_zero(out: dict, job: TrainJobConfig, cuda: bool) -> None:
    """The ZeRO stage, one precision, and offloading only where it works."""
    zero = zero_stage(out)
    if zero not in (0, 1, 2, 3):
        raise ConfigError(f"zero_optimization.stage: {zero}; allowed: 0, 1, 2, 3")
    fp16 = (out.get("fp16") or {}).get("enabled", False)
    bf16 = (out.get("bf16") or {}).get("enabled", False)
    if fp16 and bf16:
        raise ConfigError("fp16.enabled and bf16.enabled are both true: choose one")
    if fp16 and not cuda:
        raise ConfigError("fp16.enabled: fp16 needs a GPU (DeepSpeed refuses it on CPU); use bf16 on CPU")
    zo = out.get("zero_optimization") or {}
    if zero == 3:
        if job.mesh.replicate_weights_over:
            raise ConfigError(
                "zero_optimization.stage=3 with mesh.replicate_weights_over: ZeRO-3 partitions "
                "the parameters over dp, replicated weights would be gathered twice; use stage "
                "1/2 or an empty replicate_weights_over"
            )
        for key in ("offload_param", "offload_optimizer"):
            if (zo.get(key) or {}).get("device", "none") not in ("none", None):
                raise ConfigError(
                    f"zero_optimization.{key}: offloading is not supported with block-sharded parameters yet; remove it"
                )
    if zero in (1, 2) and (zo.get("offload_optimizer") or {}).get("device", "none") not in ("none", None) and not cuda:
        raise ConfigError("zero_optimization.offload_optimizer: offloading is for GPU runs")


MONITORS = {"tensorboard": "tensorboard", "wandb": "wandb", "csv_monitor": None}


def monitor_sections(job: TrainJobConfig, ds: dict) -> dict:
    """DeepSpeed's monitor sections, completed: log.tensorboard=true (or auto, with tensorboard
    installed) is shorthand for an enabled `tensorboard` section (an explicit section in the job
    file wins); output paths default to
    log.dir; wandb runs are written under log.dir (WANDB_MODE=offline works without network)."""
    import importlib.util

    out, tb = {}, job.log.tensorboard
    if tb == "auto":
        tb = importlib.util.find_spec("tensorboard") is not None
    for key, package in MONITORS.items():
        sec = dict(ds.get(key) or ({"enabled": True} if key == "tensorboard" and tb else {}))
        if not sec.get("enabled"):
            continue
        if package:
            if importlib.util.find_spec(package) is None:
                raise ConfigError(
                    f"{key}.enabled"
                    + (" (log.tensorboard)" if key == "tensorboard" else "")
                    + f": the {package} package is not installed; pip install "
                    f"'jigsaw-weathermixer[monitor]' or disable it"
                )
        if key != "wandb":  # wandb's folder is WANDB_DIR (Trainer sets it to log.dir unless given)
            if not sec.get("output_path"):
                sec["output_path"] = str(job.log.dir)
            sec.setdefault("job_name", key)
        out[key] = sec
    return out


def monitor_note(job: TrainJobConfig, ds: dict) -> str | None:
    """What to say once (rank 0) when log.tensorboard="auto" found no tensorboard package: no
    TensorBoard files will be written. None when TensorBoard is on or was switched off on purpose."""
    if job.log.tensorboard != "auto" or (ds.get("tensorboard") or {}).get("enabled"):
        return None
    csv = f"; the metrics go to {Path(job.log.dir) / 'metrics.csv'} as always" if job.log.csv else ""
    return (
        'TensorBoard logging is off: log.tensorboard is "auto" and the tensorboard package is not installed '
        "(pip install 'jigsaw-weathermixer[monitor]' to turn it on, or set log.tensorboard=false to silence "
        f"this){csv}"
    )


_PRINT_FLUSHED = functools.partial(print, flush=True)


def prepare_data(job: TrainJobConfig, rank: int, log=_PRINT_FLUSHED):
    """The gridded data config to read. For the embedded synthetic default, rank 0 writes the store
    and its statistics once, under a lock on the store (two runs started at once from one folder share
    data.path: the second waits, then reads what the first wrote), into names of its own that are
    renamed when complete, so an interrupted run never leaves a half-written store behind; the other
    ranks wait. The log names the store's absolute path, written or reused."""
    if job.data.source != "synthetic":
        return job.data
    syn = job.data
    data_cfg = syn.gridded(job.model, job.rollout)
    store = syn.store_path(job.model)
    if rank != 0:
        return data_cfg
    with _store_lock(store, log):
        if store.exists() and Path(data_cfg.stats).exists():
            log(f"synthetic data: {store.resolve()} (data.path={syn.path}; written earlier, reused)")
            return data_cfg
        from ..data import GriddedDataset, compute_stats
        from ..data.synth import write_synthetic

        ch = job.model.channels
        log(f"writing the synthetic ERA5-like store {store.resolve()} (once; data.path={syn.path})")
        tmp = store.with_name(f"{store.name}.partial.{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        store.parent.mkdir(parents=True, exist_ok=True)
        write_synthetic(
            str(tmp),
            job.model.grid,
            syn.start,
            syn.end,
            syn.dt_hours,
            list(ch.surface) + list(ch.atmospheric),
            list(ch.levels) or None,
            seed=syn.seed,
            noise=syn.noise,
        )
        shutil.rmtree(store, ignore_errors=True)
        tmp.rename(store)
        train = data_cfg.splits["train"]
        stats = compute_stats(GriddedDataset(data_cfg.model_copy(update={"stats": None}), ch, job.model.grid), *train)
        atomic_write_text(Path(data_cfg.stats), json.dumps(stats, indent=1))
    return data_cfg


@contextlib.contextmanager
def _store_lock(store: Path, log):
    """An exclusive lock on `<store>.lock` (released by the kernel if the holder dies)."""
    store.parent.mkdir(parents=True, exist_ok=True)
    with open(store.with_name(store.name + ".lock"), "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another run writing the synthetic store {store.resolve()}")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
