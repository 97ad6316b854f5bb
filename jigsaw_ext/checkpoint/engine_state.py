"""The training state of a DeepSpeed engine as plain tensors and JSON, through DeepSpeed's public
accessors (deepspeed.utils.safe_get/set_full_fp32_param and _optimizer_state), never its files.

    state_fragment(engine, p)           the flat range of p's block whose master weights and moments this
                                        rank's optimizer partition holds, as views of the engine's own
                                        storage (no copy, no collective); None: use fp32_blocks
    fp32_blocks(engine, p)              {kind: this rank's fp32 block}: master weights and AdamW moments
    set_fp32_block(engine, p, kind, block)  one of them into the engine (any ZeRO stage, fp32 or bf16)
    needed_rows(engine, p, kind)        the rows of the block this rank keeps (a load reads only those)
    engine_info(engine) / restore_engine_info(engine, info)
                                        optimizer step, lr-scheduler state, the engine's counters (JSON)

Under ZeRO-1/2/3 with dp > 1 a block's master weights and moments are spread over the dp ranks:
reading a whole one (fp32_blocks) is a collective over the dp group (every dp rank calls it for
every parameter, in the same order). state_fragment reads only this rank's part, without
communicating: ZeRO-3 through DeepSpeed's public `safe_get_local_*` accessors; ZeRO-1/2 (and the bf16
optimizer) have no public local accessor in DeepSpeed 0.19, so `zero12_fragment` reads the
parameter's fragment mapping (`p._hp_mapping`, deepspeed/utils/tensor_fragment.py), the one place a
private attribute is used; where it is missing or changed it raises FragmentMappingError naming the
DeepSpeed version and the caller falls back to the accessors (fp32_blocks). With ZeRO-0 in fp32 the
torch optimizer holds the parameter itself and its state. With ZeRO-0 in bf16/fp16 DeepSpeed wraps the torch
optimizer in its FP16_Optimizer (flat fp32 masters, `fp32_groups_flat`) or FP16_UnfusedOptimizer (one fp32
master per parameter, `fp32_groups`): `_lp_master` finds p's master there, replicated on every dp rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

KINDS = ("param", "exp_avg", "exp_avg_sq")  # param = the fp32 master weights


def base_optimizer(engine):
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def _plain_torch(engine) -> bool:
    """ZeRO-0 in fp32: DeepSpeed hands the torch optimizer the parameters themselves."""
    return engine.optimizer is base_optimizer(engine)


def _lp_master(engine, p):
    """ZeRO-0 with bf16/fp16 parameters: (p's fp32 master weights as a 1-D view, the torch-optimizer key whose
    state holds its moments, p's offset in that key's flat state); None under any other optimizer.
    DeepSpeed 0.19's FP16_UnfusedOptimizer keeps `fp16_groups[i][j]` -> `fp32_groups[i][j]`, its
    FP16_Optimizer `fp16_groups[i]` laid out back to back in `fp32_groups_flat[i]`."""
    opt = engine.optimizer
    lp_groups = getattr(opt, "fp16_groups", None)
    per_param, flats = getattr(opt, "fp32_groups", None), getattr(opt, "fp32_groups_flat", None)
    if lp_groups is None or (per_param is None and flats is None):
        return None
    for i, group in enumerate(lp_groups):
        offset = 0
        for j, q in enumerate(group):
            if q is p:
                if per_param is not None:
                    master = per_param[i][j]
                    return master.detach().view(-1), master, 0
                assert flats is not None  # (checked above: one of the two is set)
                return flats[i].detach()[offset : offset + p.numel()], flats[i], offset
            offset += q.numel()
    return None


def _lp_moment(engine, p, kind: str):
    """p's `kind` moment as a 1-D view of the FP16 wrapper's torch-optimizer state (create_moments first)."""
    _, key, offset = _lp_master(engine, p)
    return base_optimizer(engine).state[key][kind].detach().view(-1)[offset : offset + p.numel()]


def create_moments(engine) -> None:
    """AdamW creates its moments at the first step: create them (zeros) if absent, so they can be
    read or set before it."""
    base = base_optimizer(engine)
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
    # ZeRO-1/2 and the bf16 optimizer link each parameter to its moments once, right after the FIRST
    # group's first step (DeepSpeed 0.19.8, stage_1_and_2.py _optimizer_step): the other groups' moments
    # do not exist yet then, and safe_get_full_optimizer_state on their parameters fails ("exp_avg not
    # found in optimizer state fragment"). Link again now that every group's moments exist.
    if hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()


class FragmentMappingError(RuntimeError):
    """DeepSpeed's per-parameter fragment mapping is not what this code was written for."""


@dataclass
class Fragment:
    """The flat range [start, start + numel) (row-major) of a parameter's block whose master weights
    and moments this rank holds; `views[kind]` are 1-D fp32 tensors of numel elements sharing the
    engine's storage (writing into them sets the state). dp_replicated: every dp rank holds the same
    range (ZeRO-0); otherwise the dp ranks hold disjoint ranges (ZeRO's partitions)."""

    start: int
    numel: int
    views: dict = field(default_factory=dict)
    dp_replicated: bool = False


def deepspeed_version() -> str:
    try:
        import deepspeed

        return deepspeed.__version__
    except Exception:  # noqa: BLE001
        return "unknown"


def zero12_fragment(p) -> Fragment:
    """This dp rank's fragment of a ZeRO-1/2 (or bf16-optimizer) parameter, from DeepSpeed's mapping
    `p._hp_mapping` (a tensor_fragment: `lp_fragment_address` = the flat range of p, `get_hp_fragment(key)`
    = the fp32 master weights (key None) or an optimizer state over that range, views of the flat
    partition). DeepSpeed 0.19 has no public accessor for it (its safe_get_local_* are ZeRO-3 only).
    Raises FragmentMappingError naming the DeepSpeed version if the mapping is not the one of 0.19.8."""
    if not hasattr(p, "_hp_mapping"):
        raise FragmentMappingError(
            f"parameter of shape {tuple(p.shape)} has no `_hp_mapping` (DeepSpeed "
            f"{deepspeed_version()}; written for 0.19.8's deepspeed/utils/tensor_fragment.py)"
        )
    m = p._hp_mapping
    if m is None:  # no part of p in this dp rank's partition
        return Fragment(0, 0)
    try:
        address = m.lp_fragment_address
        start, numel = int(address.start), int(address.numel)
        views = {"param": m.get_hp_fragment()}
        for k in KINDS[1:]:
            views[k] = m.get_hp_fragment(k)
    except Exception as err:  # noqa: BLE001 - an attribute or method changed, or the moments are not linked
        raise FragmentMappingError(
            f"parameter of shape {tuple(p.shape)}: DeepSpeed {deepspeed_version()}'s "
            f"`_hp_mapping` is not the fragment mapping of 0.19.8 ({type(err).__name__}: "
            f"{err})"
        ) from None
    for k, v in views.items():
        if (
            not (
                torch.is_tensor(v)
                and v.dtype == torch.float32
                and v.dim() == 1
                and v.numel() == numel
                and v.is_contiguous()
            )
            or not 0 <= start <= start + numel <= p.numel()
        ):
            raise FragmentMappingError(
                f"parameter of shape {tuple(p.shape)}: DeepSpeed {deepspeed_version()}'s `_hp_mapping` gives "
                f"{k} as {getattr(v, 'dtype', type(v))} {tuple(getattr(v, 'shape', ()))} for the flat range "
                f"[{start}, {start + numel}) (expected a contiguous 1-D fp32 view of it; written for 0.19.8)"
            )
    return Fragment(start, numel, {k: v.detach() for k, v in views.items()})


def state_fragment(engine, p) -> Fragment | None:
    """This rank's fragment of p's master weights and moments as views of the engine's storage (no
    copy, no collective); None where only the full-block accessors apply (then fp32_blocks /
    set_fp32_block). Raises FragmentMappingError (ZeRO-1/2: DeepSpeed's mapping not the expected one)."""
    shape = tuple(p.ds_shape) if hasattr(p, "ds_id") else tuple(p.shape)
    n = math.prod(shape)
    if _plain_torch(engine):
        st = base_optimizer(engine).state.get(p, {})
        views = {"param": p.detach()}
        views.update({k: st.get(k) for k in KINDS[1:]})
        if not all(
            torch.is_tensor(v) and v.dtype == torch.float32 and v.is_contiguous() and v.numel() == n
            for v in views.values()
        ):
            return None
        return Fragment(0, n, {k: v.detach().view(-1) for k, v in views.items()}, dp_replicated=True)
    if _lp_master(engine, p) is not None:  # ZeRO-0 bf16/fp16: the wrapper's fp32 master and its moments
        views = {"param": _lp_master(engine, p)[0], **{k: _lp_moment(engine, p, k) for k in KINDS[1:]}}
        return Fragment(0, n, views, dp_replicated=True)
    if hasattr(p, "ds_id"):
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

        if getattr(engine.optimizer, "offload_optimizer", False) or not p.requires_grad:
            return None  # offloaded (safe_get_local_* return copies on the device) or not the optimizer's
        pn = p.ds_tensor.numel()
        start = _dp_rank(engine) * pn
        numel = min(pn, max(0, n - start))
        if numel == 0:
            return Fragment(0, 0)
        views = {"param": safe_get_local_fp32_param(p)}
        views.update({k: safe_get_local_optimizer_state(p, k) for k in KINDS[1:]})
        if not all(
            torch.is_tensor(v) and v.dtype == torch.float32 and v.dim() == 1 and v.numel() >= numel
            for v in views.values()
        ):
            return None
        return Fragment(start, numel, {k: v.detach()[:numel] for k, v in views.items()})
    if not _managed(p):
        raise RuntimeError(f"parameter of shape {shape} is not managed by DeepSpeed's optimizer (frozen?)")
    return zero12_fragment(p)


def _managed(p) -> bool:
    return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")


@torch.no_grad()
def fp32_blocks(engine, p) -> dict:
    """{kind: fp32 tensor of p's block shape}. Collective over the dp group under ZeRO (every dp
    rank holds the same block shape, so all of them call it or none does)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    shape = tuple(p.ds_shape) if hasattr(p, "ds_id") else tuple(p.shape)
    if 0 in shape:
        return {k: torch.zeros(shape) for k in KINDS}
    if _plain_torch(engine):
        st = base_optimizer(engine).state.get(p, {})
        return {
            "param": p.detach().float(),
            **{k: st[k].detach().float() if k in st else torch.zeros(shape) for k in KINDS[1:]},
        }
    if _lp_master(engine, p) is not None:
        create_moments(engine)
        return {
            "param": _lp_master(engine, p)[0].clone().reshape(shape),
            **{k: _lp_moment(engine, p, k).clone().reshape(shape) for k in KINDS[1:]},
        }
    if not _managed(p):
        raise RuntimeError(f"parameter of shape {shape} is not managed by DeepSpeed's optimizer (frozen?)")
    out = {"param": safe_get_full_fp32_param(p)}
    for k in KINDS[1:]:
        out[k] = safe_get_full_optimizer_state(p, k)
    return {k: v.detach().float().reshape(shape) for k, v in out.items()}


@torch.no_grad()
def set_fp32_block(engine, p, kind: str, block: torch.Tensor) -> None:
    """Set one kind of p's state from its full block: "param" sets the master weights and the
    (low-precision) parameter, "exp_avg"/"exp_avg_sq" the AdamW moment."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    zero3 = hasattr(p, "ds_id")
    if (p.ds_numel if zero3 else p.numel()) == 0:
        return
    if kind == "param" and zero3:  # the parameter itself is this rank's partition of the flat block
        pn = p.ds_tensor.numel()
        part = block.flatten()[_dp_rank(engine) * pn :][:pn]
        p.ds_tensor.zero_()
        p.ds_tensor[: part.numel()].copy_(part)
    elif kind == "param":
        p.copy_(block)
    if _plain_torch(engine):  # the torch optimizer holds p itself (set above) and its state
        if kind != "param":
            base_optimizer(engine).state[p][kind] = block.to(p.dtype).clone()
    elif _lp_master(engine, p) is not None:  # ZeRO-0 bf16/fp16: the wrapper's fp32 master or moment
        create_moments(engine)
        target = _lp_master(engine, p)[0] if kind == "param" else _lp_moment(engine, p, kind)
        target.copy_(block.reshape(-1))
    elif zero3 or getattr(p, "_hp_mapping", None) is not None:
        if kind == "param":
            safe_set_full_fp32_param(p, block)
        else:
            safe_set_full_optimizer_state(p, block, kind)
    # else: ZeRO-1/2 and no part of p in this dp rank's partition (another rank sets it)


def set_fp32_blocks(engine, p, blocks: dict) -> None:
    """Set p's master weights, its (low-precision) parameter and AdamW moments from full blocks."""
    for kind in KINDS:
        set_fp32_block(engine, p, kind, blocks[kind])


def needed_rows(engine, p, kind: str) -> tuple[int, int] | None:
    """Rows [r0, r1) (first dimension) of p's block whose `kind` this rank needs to set; None: all of
    it. Under ZeRO a dp rank keeps only its partition of the master weights and moments, a flat range
    of the block (ZeRO-1/2: DeepSpeed's fragment address of p; ZeRO-3: its ds_tensor partition), so a
    load on a mesh with dp > 1 reads those rows instead of the dp-fold redundant whole block. Every
    dp rank needs the whole low-precision parameter under ZeRO-1/2."""
    shape = tuple(p.ds_shape) if hasattr(p, "ds_id") else tuple(p.shape)
    if len(shape) == 0 or _plain_torch(engine) or _lp_master(engine, p) is not None:
        return None
    if hasattr(p, "ds_id"):
        pn = p.ds_tensor.numel()
        start, numel = _dp_rank(engine) * pn, min(pn, max(0, p.ds_numel - _dp_rank(engine) * pn))
    elif kind == "param" or not hasattr(p, "_hp_mapping"):
        return None
    elif p._hp_mapping is None:  # no part of p in this rank's partition
        return 0, 0
    else:
        address = p._hp_mapping.lp_fragment_address
        start, numel = address.start, address.numel
    row = max(1, math.prod(shape[1:]))
    return (start // row, -(-(start + numel) // row)) if numel else (0, 0)


def _dp_rank(engine) -> int:
    import torch.distributed as dist

    group = getattr(engine, "data_parallel_group", None)
    return dist.get_rank(group) if group is not None and dist.is_initialized() else 0


def optimizer_step(engine) -> int:
    """The optimizer's step count (AdamW's bias correction)."""
    base = base_optimizer(engine)
    for st in base.state.values():
        if "step" in st:
            return int(st["step"])
    return 0


def set_optimizer_step(engine, step: int) -> None:
    for st in base_optimizer(engine).state.values():
        if "step" in st:
            st["step"] = torch.tensor(float(step)) if torch.is_tensor(st["step"]) else step


def jsonable(x):
    """Optimizer / scheduler state as JSON values (tensors to numbers or lists, callables dropped)."""
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items() if not callable(v)}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if torch.is_tensor(x):
        return x.item() if x.numel() == 1 else x.tolist()
    return x


def engine_info(engine) -> dict:
    """What the engine needs besides the tensors, as JSON: optimizer step and hyper-parameters per
    group, lr-scheduler state, DeepSpeed's counters."""
    keep = ("lr", "initial_lr", "betas", "eps", "weight_decay", "name")
    groups = [{k: jsonable(g[k]) for k in keep if k in g} for g in base_optimizer(engine).param_groups]
    sched = engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None
    return {
        "optimizer_step": optimizer_step(engine),
        "optimizer_groups": groups,
        "lr_scheduler": jsonable(sched),
        "counters": {
            "global_steps": engine.global_steps,
            "global_samples": engine.global_samples,
            "skipped_steps": engine.skipped_steps,
        },
    }


def restore_engine_info(engine, info: dict) -> None:
    """The optimizer step, the schedule position (and the lr it gives) and DeepSpeed's counters."""
    set_optimizer_step(engine, int(info["optimizer_step"]))
    sched = info.get("lr_scheduler")
    if sched and engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(dict(sched, lr_lambdas=[None] * len(sched.get("base_lrs", []))))
        for g, lr in zip(engine.optimizer.param_groups, engine.lr_scheduler.get_last_lr(), strict=True):
            g["lr"] = lr
    c = info["counters"]
    engine.global_steps = int(c["global_steps"])
    engine.global_samples = int(c["global_samples"])
    engine.skipped_steps = int(c["skipped_steps"])
