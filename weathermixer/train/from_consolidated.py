"""Start a run from a consolidated (layout-free) checkpoint, on any mesh and any ZeRO stage:
weights and AdamW moments (each rank reads only its block), the optimizer step, the schedule
position, DeepSpeed's counters and the data position, in that order."""
from __future__ import annotations

import math

import torch

from .checkpointing import CheckpointError


def load_consolidated(trainer, path) -> dict:
    """Load `path` into the trainer's engine. Returns {"step", "best", "sampler"}, sampler being
    the data-loader state for this mesh."""
    from jigsaw_ext.checkpoint import CheckpointFormatError, Consolidated

    try:
        c = Consolidated(path)
    except CheckpointFormatError as err:
        raise CheckpointError(str(err)) from None
    idx = c.index
    _check_same_model(c, trainer.job, trainer.group_names)
    step = int(idx["optimizer"]["step"])
    _create_moments(trainer.engine)
    try:
        _load_blocks(c, trainer.engine, trainer.model, trainer.mesh.coords, step)
    except CheckpointFormatError as err:
        raise CheckpointError(str(err)) from None
    _restore_schedule_and_counters(trainer.engine, idx)
    best = idx.get("best")
    return {"step": int(idx["step"]), "best": math.inf if best is None else best,
            "sampler": sampler_state(c, trainer.micro, trainer.mesh.sizes["dp"])}


def _check_same_model(c, job, group_names) -> None:
    mine, theirs = job.model.model_dump(mode="json"), c.index["app"]["model"]
    diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    if diff:
        raise CheckpointError(f"{c.dir}: written for another model (model.{diff[0]}: checkpoint "
                              f"{theirs.get(diff[0])!r}, this run {mine.get(diff[0])!r})")
    want = [list(g["names"]) for g in c.index["optimizer"]["groups"]]
    if want != group_names:
        raise CheckpointError(f"{c.dir}: optimizer groups {[len(g) for g in want]} differ from this run's "
                              f"{[len(g) for g in group_names]} (train.param_groups changed?)")


def _base_optimizer(engine):
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def _create_moments(engine) -> None:
    """AdamW creates its moments at the first step: create them now so they can be set."""
    from jigsaw_ext.checkpoint import KINDS

    base = _base_optimizer(engine)
    if not isinstance(base, torch.optim.Optimizer):
        return
    # ZeRO-3 puts its flat fp32 partitions into the torch groups only around each step
    flats = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
    for q in flats if flats is not None else [q for g in base.param_groups for q in g["params"]]:
        st = base.state[q]
        st.setdefault("step", torch.tensor(0.0))
        for k in KINDS[1:]:
            if k not in st:
                st[k] = torch.zeros_like(q)
    if hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2, bf16: link the moments
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()


@torch.no_grad()
def _load_blocks(c, engine, model, coords, step: int) -> None:
    """Each parameter's block (weights and moments) into the engine, whatever its ZeRO stage."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    from jigsaw_ext.checkpoint import KINDS

    base = _base_optimizer(engine)
    for name, p in model.named_parameters():
        block = {k: c.block(name, k, p.block_layout, coords).contiguous() for k in KINDS}  # only this block is read
        if hasattr(p, "ds_id"):  # ZeRO-3: this rank's partition of the flattened block
            flat = block["param"].flatten().to(p.ds_tensor.dtype)
            pn, d = p.ds_tensor.numel(), coords["dp"]
            part = flat[d * pn:(d + 1) * pn]
            p.ds_tensor.zero_()
            p.ds_tensor[:part.numel()].copy_(part)
        else:
            p.copy_(block["param"].to(p.dtype))
        if engine.optimizer is base:  # ZeRO-0 fp32: the torch optimizer holds the parameter itself
            base.state[p] = {"step": torch.tensor(float(step)), **{k: block[k].clone() for k in KINDS[1:]}}
        elif hasattr(p, "ds_id") or getattr(p, "_hp_mapping", None) is not None:
            safe_set_full_fp32_param(p, block["param"])
            for k in KINDS[1:]:
                safe_set_full_optimizer_state(p, block[k], k)
        # else: ZeRO-1/2 and no part of p in this dp rank's partition (another rank sets it)
    if isinstance(base, torch.optim.Optimizer):
        for st in base.state.values():
            if "step" in st:
                st["step"] = torch.tensor(float(step)) if torch.is_tensor(st["step"]) else step


def _restore_schedule_and_counters(engine, idx: dict) -> None:
    sched = idx.get("lr_scheduler")
    if sched and engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(dict(sched, lr_lambdas=[None] * len(sched.get("base_lrs", []))))
        for g, lr in zip(engine.optimizer.param_groups, engine.lr_scheduler.get_last_lr()):
            g["lr"] = lr
    counters = idx.get("engine") or {}
    engine.global_steps = int(counters.get("global_steps") or idx["step"])
    engine.global_samples = int(counters.get("global_samples") or 0)
    engine.skipped_steps = int(counters.get("skipped_steps") or 0)


def sampler_state(c, micro: int, dp: int) -> dict:
    """The data position of the checkpoint (samples consumed in the epoch, independent of the mesh
    it was written on) as this mesh's sampler state."""
    st = c.index["trainer_state"]["loader"]["sampler"]
    samples, per_step = st["step"] * st["batch"] * st["dp"], micro * dp
    if samples % per_step:
        raise CheckpointError(f"{c.dir}: the data position ({samples} samples into epoch {st['epoch']}) is not a "
                              f"whole number of this run's global micro batches ({micro} x dp {dp}); keep the "
                              f"global batch size")
    return {"epoch": st["epoch"], "step": samples // per_step, "seed": st["seed"], "n": st["n"], "batch": micro,
            "dp": dp, "shuffle": st["shuffle"]}
