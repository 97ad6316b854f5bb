"""Reshard a checkpoint to another DP x DOMAIN x TP mesh and ZeRO stage (the engine behind
`python -m jigsaw_ext.checkpoint reshard`).

The source is consolidated first (streaming, see jigsaw_ext.checkpoint) unless it already is. Then
one CPU process per rank of the target mesh (gloo) builds the DeepSpeed engine of the target job,
loads the consolidated state into it (Trainer.load_consolidated: weights, AdamW moments and step,
schedule position, data position) and saves a normal checkpoint with its `latest` pointer, so
`train.py --resume OUT` (or a checkpoint.dir of OUT) continues on the target mesh. The global batch
size is kept (the target's micro batch is derived from it) so the run continues the same schedule
and sample order. What makes the checkpoint self-contained (normalisation statistics, the data
set's mapping, versions and git commit of the run that trained it) is carried over. Nothing is
unpickled: the consolidated form is safetensors + JSON, DeepSpeed's files are read with
weights_only=True and an allowlist (jigsaw_ext.safe_load).
"""
from __future__ import annotations

import shutil
from pathlib import Path

from jigsaw_ext.checkpoint import CheckpointFormatError, Consolidated, consolidate, is_consolidated, resolve

# what makes a checkpoint self-contained (job.json keys of the trainer), carried to the target
SELF_CONTAINED = ("stats", "data", "provenance")


def target_job(index: dict, dp: int, domain: int, tp: int, zero_stage: int | None, micro_batch: int | None,
               out: Path) -> tuple[dict, dict]:
    """(project section, DeepSpeed config) of the target run."""
    job = dict(index["app"]["weathermixer"])
    ds = dict(index["deepspeed"])
    src = job["mesh"]
    job["mesh"] = dict(src, dp=dp, domain=domain, tp=tp)
    job["checkpoint"] = dict(job.get("checkpoint", {}), dir=str(out), resume="never", init_from=None)
    gas = ds.get("gradient_accumulation_steps", 1)
    global_batch = ds["train_micro_batch_size_per_gpu"] * gas * src["dp"]
    if micro_batch is None:
        if global_batch % (gas * dp):
            raise CheckpointFormatError(
                f"global batch {global_batch} (= micro {ds['train_micro_batch_size_per_gpu']} x accumulation {gas} x "
                f"dp {src['dp']}) is not divisible by accumulation {gas} x target dp {dp}: pass --micro-batch")
        micro_batch = global_batch // (gas * dp)
    ds["train_micro_batch_size_per_gpu"] = micro_batch
    ds["train_batch_size"] = micro_batch * gas * dp
    ds.get("optimizer", {}).get("params", {}).pop("lr", None)  # check_job sets it from train.lr again
    if zero_stage is not None:
        ds["zero_optimization"] = dict(ds.get("zero_optimization") or {}, stage=zero_stage)
    return job, ds


def _worker(rank, world, job_dict, ds, consolidated, out, carried):
    import torch.distributed as dist

    from weathermixer.train.checkpointing import rng_state
    from weathermixer.train.config import TrainJobConfig
    from weathermixer.train.job import check_job
    from weathermixer.train.trainer import Trainer

    from ..config import parse

    job = parse(TrainJobConfig, job_dict, "reshard target")
    ds = check_job(job, ds, world, cuda=False)
    t = Trainer(job, ds, log=lambda *a, **k: None)
    t._setup_engine()
    got = t.load_consolidated(consolidated)
    loader = {"sampler": got["sampler"], "split": "train"}
    info = dict(t._job_info(), **{k: v for k, v in carried.items() if v is not None})
    t.ckpt.save(t.engine, got["step"], {"step": got["step"], "best": got["best"]},
                {"loader": loader, "rng": rng_state(), "step": got["step"]}, info, pointers=["latest"])
    dist.barrier()
    return got["step"]


def reshard(src: str | Path, out: str | Path, dp: int = 1, domain: int = 1, tp: int = 1,
            zero_stage: int | None = None, micro_batch: int | None = None, timeout: float = 1800.0,
            log=print) -> Path:
    from jigsaw_ext.testing import run_workers

    src, out = resolve(src), Path(out)
    if out.exists():
        raise CheckpointFormatError(f"{out} exists; choose a new output directory")
    tmp_cons = None
    if not is_consolidated(src):
        tmp_cons = out.with_name(out.name + ".consolidated.tmp")
        shutil.rmtree(tmp_cons, ignore_errors=True)
        consolidate(src, tmp_cons, log=None)
        cons = tmp_cons
    else:
        cons = src
    try:
        index = Consolidated(cons).index
        job, ds = target_job(index, dp, domain, tp, zero_stage, micro_batch, out.with_name(out.name + ".partial"))
        from weathermixer.model.geometry import Geometry, MeshMismatch
        from jigsaw_ext.mesh import Mesh, MeshConfig
        from weathermixer.config import ModelConfig

        try:
            Geometry(ModelConfig.model_validate(job["model"]), Mesh.virtual(MeshConfig.model_validate(job["mesh"])))
        except (MeshMismatch, ValueError) as err:
            raise CheckpointFormatError(f"target mesh {dp}x{domain}x{tp} cannot split the model: {err}") from None
        partial = out.with_name(out.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        if log:
            log(f"reshard: {dp * domain * tp} process(es) build the {dp}x{domain}x{tp} engine and load {cons}")
        carried = {k: index["app"].get(k) for k in SELF_CONTAINED}
        run_workers(_worker, dp * domain * tp, job, ds, str(cons), str(partial), carried, timeout=timeout,
                    preload=["deepspeed", "weathermixer.train.trainer"])
        partial.rename(out)
        # the pointer names a tag inside the directory: still valid after the rename
    finally:
        if tmp_cons is not None:
            shutil.rmtree(tmp_cons, ignore_errors=True)
    return out
