"""Start a run from a consolidated checkpoint (what `python -m jigsaw_ext.checkpoint consolidate`
makes of a checkpoint of the DeepSpeed 0.19 per-rank format), on any mesh and any ZeRO stage:
weights and AdamW moments (each rank reads only its block), the optimizer step, the schedule
position, DeepSpeed's counters and the data position, in that order. The run's own checkpoints are
layout-free from then on."""

from __future__ import annotations

import math

import torch

from .checkpointing import CheckpointError, sampler_for


def load_consolidated(path, engine, model, mesh, job, group_names: list[list[str]], micro: int) -> dict:
    """Load `path` into `engine` (wrapping `model`, on `mesh`; `group_names`: the parameter names of
    each optimizer group, `micro`: the micro batch). Returns {"step", "best", "sampler"}, sampler
    being the data-loader state for this mesh."""
    from jigsaw_ext.checkpoint import CheckpointFormatError, Consolidated
    from jigsaw_ext.checkpoint.engine_state import create_moments

    try:
        c = Consolidated(path)
    except CheckpointFormatError as err:
        raise CheckpointError(str(err)) from None
    idx = c.index
    _check_same_model(c, job, group_names)
    step = int(idx["optimizer"]["step"])
    create_moments(engine)
    try:
        _load_blocks(c, engine, model, mesh.coords, step)
    except CheckpointFormatError as err:
        raise CheckpointError(str(err)) from None
    _restore_schedule_and_counters(engine, idx)
    best = idx.get("best")
    return {
        "step": int(idx["step"]),
        "best": math.inf if best is None else best,
        "sampler": sampler_state(c, micro, mesh.sizes["dp"]),
    }


def _check_same_model(c, job, group_names) -> None:
    mine, theirs = job.model.model_dump(mode="json"), c.index["app"]["model"]
    diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    if diff:
        raise CheckpointError(
            f"{c.dir}: written for another model (model.{diff[0]}: checkpoint "
            f"{theirs.get(diff[0])!r}, this run {mine.get(diff[0])!r})"
        )
    want = [list(g["names"]) for g in c.index["optimizer"]["groups"]]
    if want != group_names:
        raise CheckpointError(
            f"{c.dir}: optimizer groups {[len(g) for g in want]} differ from this run's "
            f"{[len(g) for g in group_names]} (train.param_groups changed?)"
        )


@torch.no_grad()
def _load_blocks(c, engine, model, coords, step: int) -> None:
    """Each parameter's block (weights and moments) into the engine, whatever its ZeRO stage."""
    from jigsaw_ext.checkpoint import KINDS
    from jigsaw_ext.checkpoint.engine_state import set_fp32_blocks, set_optimizer_step

    for name, p in model.named_parameters():
        set_fp32_blocks(engine, p, {k: c.block(name, k, p.block_layout, coords).contiguous() for k in KINDS})
    set_optimizer_step(engine, step)


def _restore_schedule_and_counters(engine, idx: dict) -> None:
    sched = idx.get("lr_scheduler")
    if sched and engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(dict(sched, lr_lambdas=[None] * len(sched.get("base_lrs", []))))
        for g, lr in zip(engine.optimizer.param_groups, engine.lr_scheduler.get_last_lr(), strict=True):
            g["lr"] = lr
    counters = idx.get("engine") or {}
    engine.global_steps = int(counters.get("global_steps") or idx["step"])
    engine.global_samples = int(counters.get("global_samples") or 0)
    engine.skipped_steps = int(counters.get("skipped_steps") or 0)


def sampler_state(c, micro: int, dp: int) -> dict:
    """The data position of the checkpoint (samples consumed, whatever mesh wrote it) on this mesh."""
    return sampler_for(c.index["trainer_state"]["loader"], micro, dp, c.dir)
