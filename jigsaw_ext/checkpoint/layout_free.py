"""Layout-free training state of a block-sharded model under DeepSpeed: written by every rank in
parallel, loaded on any mesh, any ZeRO stage, any dp.

    desc = save_layout_free(engine, model, TAG / "state")   # collective; JSON-able description
    load_layout_free(engine, model, TAG / "state", desc)     # collective, on any mesh

What is written, per parameter (each a logical tensor of the parameter's global shape, fp32):
`param/<name>` (the master weights), `exp_avg/<name>`, `exp_avg_sq/<name>` (AdamW's moments), each
rank writing the part in its own optimizer partition, as boxes of at most 64 MiB or a row
(sharded.fragment_parts), in batches of about the largest tensor's size (sharded.batches), each a
torch.distributed.checkpoint directory (`state/00000/`, `state/00001/`, ...). The description
(JSON, kept by the caller) lists the batches, every tensor's layout on the mesh that wrote it, and
the engine's optimizer step, lr-scheduler state and counters. The low-precision parameters of a
bf16 run are not written: they are the master weights rounded, which is what loading sets them to.

The model's parameters carry their layout (`p.block_layout`); `model.mesh` gives the rank's
coordinates and the mesh sizes.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import cast

import torch
import torch.distributed as dist

from . import sharded
from .common import agree as _agree
from .engine_state import (
    KINDS,
    FragmentMappingError,
    create_moments,
    engine_info,
    fp32_blocks,
    needed_rows,
    restore_engine_info,
    set_fp32_block,
    state_fragment,
)
from .errors import CheckpointFormatError

FORMAT = "jigsaw-layout-free/1"


def save_layout_free(engine, model, directory: str | Path, budget: int | None = None, sync: bool = False) -> dict:
    """Collective over the world: write this rank's parts of every parameter's master weights and
    moments; returns the description to keep beside them (JSON).

    Each rank writes, of every block, only what lies in its own optimizer partition (its ZeRO
    fragment; the whole block under ZeRO-0, shared with its replicas), straight from the engine's
    storage: no dp collective and no copy (engine_state.state_fragment, sharded.fragment_parts).
    Where DeepSpeed's fragment mapping is not available the dp ranks assemble each block with the
    public accessors first (fp32_blocks, a dp collective per tensor) as before. A rank failing
    outside DCP makes every rank raise before the next collective (_agree; DCP's own failures are
    reported to every rank by DCP)."""
    mesh = model.mesh
    named = dict(model.named_parameters())
    layouts = {n: p.block_layout for n, p in named.items()}
    groups = sharded.batches(layouts, len(KINDS), budget)
    frags = _fragments(engine, named, f"saving {directory}")
    empty = torch.empty(0)
    for i, names in enumerate(groups):
        d = sharded.batch_dir(directory, i)
        parts, err = {}, None
        try:
            d.mkdir(parents=True, exist_ok=True)
            for name in names:
                f = frags[name]
                if f is None:  # a dp collective per tensor: every rank takes this path for `name` or none does
                    for kind, block in fp32_blocks(engine, named[name]).items():
                        st = sharded.to_write(f"{kind}/{name}", block, layouts[name], mesh.sizes, mesh.coords)
                        if st is not None:
                            parts[st.key] = st
                    continue
                for kind in KINDS:
                    key = f"{kind}/{name}"
                    for j, st in enumerate(
                        sharded.fragment_parts(
                            key,
                            f.views.get(kind, empty),
                            f.start,
                            layouts[name],
                            mesh.sizes,
                            mesh.coords,
                            f.dp_replicated,
                        )
                    ):
                        parts[f"{key}#{j}"] = st
        except Exception as e:  # noqa: BLE001 - agreed on below: nobody waits in DCP for this rank
            err = e
        _agree(err, f"saving {d}")  # also: every rank's directory exists before anyone plans into it
        sharded.save(parts, d, sync=sync)
        del parts
    return {
        "format": FORMAT,
        "kinds": list(KINDS),
        "batches": groups,
        "tensors": {n: {"shape": list(lay.shape), "layout": lay.to_json()} for n, lay in layouts.items()},
        "engine": engine_info(engine),
    }


_WARNED: set[str] = set()


def _fragments(engine, named: dict, what: str, own: bool = True) -> dict:
    """{name: this rank's Fragment, or None where the block goes through the full-block accessors}
    (creating the moments first). Collective over the world: a parameter takes the fragment path on
    every rank or on none (the accessors' path is a dp collective), so a DeepSpeed whose mapping
    differs falls back everywhere, with a warning naming why."""
    frags, err, fallback = dict.fromkeys(named), None, None
    try:
        create_moments(engine)
        frags = {n: state_fragment(engine, p) for n, p in named.items()}
    except FragmentMappingError as e:
        fallback = e
    except Exception as e:  # noqa: BLE001 - agreed on below
        err = e
    _agree(err, what, own=own)
    ok = torch.tensor([f is not None for f in frags.values()], dtype=torch.int32)
    if dist.is_initialized() and dist.get_world_size() > 1 and ok.numel():
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if fallback is not None and str(fallback) not in _WARNED:
        _WARNED.add(str(fallback))
        warnings.warn(
            f"checkpoint: {fallback}; falling back to DeepSpeed's full-block accessors (a dp collective "
            f"per tensor: slower saves)",
            stacklevel=3,
        )
    return {n: f if k else None for (n, f), k in zip(frags.items(), ok.tolist(), strict=True)}


def check_description(desc: dict, where) -> None:
    if not isinstance(desc, dict) or desc.get("format") != FORMAT:
        got = desc.get("format") if isinstance(desc, dict) else None
        raise CheckpointFormatError(f"{where}: state format {got!r}, expected {FORMAT!r}")


def check_model(desc: dict, model, where) -> None:
    """Every parameter of `model` is in the checkpoint with its global shape, and nothing else."""
    check_description(desc, where)
    tensors = desc["tensors"]
    named = dict(model.named_parameters())
    missing, extra = sorted(set(named) - set(tensors)), sorted(set(tensors) - set(named))
    if missing or extra:
        raise CheckpointFormatError(
            f"{where}: the checkpoint's parameters differ from this model's (missing "
            f"{missing[:3]}, unexpected {extra[:3]}; another model config?)"
        )
    for n, p in named.items():
        if list(p.block_layout.shape) != list(tensors[n]["shape"]):
            raise CheckpointFormatError(
                f"{where}: {n} has shape {tensors[n]['shape']}, this model expects "
                f"{list(p.block_layout.shape)} (another model config?)"
            )


def load_layout_free(engine, model, directory: str | Path, desc: dict) -> None:
    """Collective over the world: every rank reads the blocks of ITS layout and sets them into the
    engine (master weights, parameters, moments), then the optimizer step, schedule and counters.

    What can be read straight into the engine's storage is (no buffer: the fp32 parameters, and the
    rank's fragment of the master weights and moments, engine_state.state_fragment); the rest (bf16
    parameters, or everything where the fragment mapping is unavailable) through a buffer of the
    rows the rank needs and the accessors. A rank failing outside DCP makes every rank raise
    RankFailure (a CheckpointFormatError) naming it, at the next collective."""
    check_model(desc, model, directory)
    mesh = model.mesh
    named = dict(model.named_parameters())
    what = f"loading {directory}"
    frags = _fragments(engine, named, what, own=False)
    largest = 4 * max((math.prod(p.block_layout.shape) for p in named.values()), default=0)
    pending = None  # a local failure, raised on every rank at the next agreement
    for i, names in enumerate(desc["batches"]):
        direct: dict = {}
        after: list = []
        needed: dict = {}
        mine = 0
        try:
            for n in names:
                _plan_reads(engine, n, named[n], frags[n], mesh, direct, after, needed)
            needed = {nk: rows for nk, rows in needed.items() if rows is None or rows[1] > rows[0]}
            mine = sum(4 * _numel(named[n].block_layout, mesh.coords, rows) for (n, _), rows in needed.items())
        except Exception as e:  # noqa: BLE001
            pending, direct, needed = pending or e, {}, {}
        # all buffered kinds in one read unless a rank's buffers exceed the largest tensor: then one
        # kind at a time (a third of the memory, three times DCP's planning); the same on every rank
        most = _agree(pending, what, mine, own=False)
        for r, kinds in enumerate([KINDS] if most <= largest else [(k,) for k in KINDS]):
            failed = _read_into(
                engine,
                named,
                mesh,
                sharded.batch_dir(directory, i),
                {nk: rows for nk, rows in needed.items() if nk[1] in kinds},
                direct if r == 0 else {},
            )
            pending = pending or failed
        try:
            with torch.no_grad():
                for fn in after:
                    fn()
        except Exception as e:  # noqa: BLE001
            pending = pending or e
    try:
        restore_engine_info(engine, desc["engine"])
    except Exception as e:  # noqa: BLE001
        pending = pending or e
    _agree(pending, what, own=False)


def _plan_reads(engine, name, p, f, mesh, direct: dict, after: list, needed: dict) -> None:
    """Add p's reads: `direct` {dict key: ShardedTensor viewing the engine's storage}, `after` (what
    to copy once they are read), `needed` {(name, kind): rows to read into a buffer}."""
    layout = p.block_layout
    if f is None:
        needed.update({(name, k): needed_rows(engine, p, k) for k in KINDS})
        return

    def add(kind, flat, start):
        for j, st in enumerate(sharded.fragment_reads(f"{kind}/{name}", flat, start, layout, mesh.coords)):
            direct[f"{kind}/{name}#{j}"] = st

    for k in KINDS[1:]:
        add(k, f.views.get(k, torch.empty(0)), f.start)
    if f.dp_replicated:  # ZeRO-0: the parameter itself (fp32), or its fp32 master (bf16/fp16) then the parameter
        master = f.views["param"]
        add("param", master, 0)
        if master.data_ptr() != p.data_ptr():
            after.append(lambda: p.copy_(master.view(p.shape)))
    elif hasattr(p, "ds_id"):  # ZeRO-3: the master partition, then the parameter's partition from it
        add("param", f.views.get("param", torch.empty(0)), f.start)
        after.append(lambda: _zero3_param_from_master(p, f))
    elif p.dtype == torch.float32 and p.is_contiguous():  # ZeRO-1/2 fp32: the whole parameter, then the master
        flat = p.detach().view(-1)
        add("param", flat, 0)
        if f.numel:
            after.append(lambda: f.views["param"].copy_(flat[f.start : f.start + f.numel]))
    else:  # a low-precision parameter: its whole fp32 block through a buffer
        needed[(name, "param")] = needed_rows(engine, p, "param")


@torch.no_grad()
def _zero3_param_from_master(p, f) -> None:
    p.ds_tensor.zero_()
    if f.numel:
        p.ds_tensor.view(-1)[: f.numel].copy_(f.views["param"])


def _numel(layout, coords, rows) -> int:
    shape = layout.local_shape(coords)
    return math.prod(shape) if rows is None or not shape else (rows[1] - rows[0]) * math.prod(shape[1:])


def _read_into(engine, named, mesh, directory, needed: dict, direct: dict | None = None):
    """Collective (every rank calls it, possibly with nothing to read): read the rows each (name,
    kind) of `needed` needs into a buffer and set them into the engine, and the `direct` reads (into
    the engine's storage: nothing to set). DCP's failures raise on every rank; returns a failure
    after it (setting the state), to be agreed on by the caller."""
    bufs, specs = {}, {}
    for (n, k), rows in needed.items():
        layout = named[n].block_layout
        bufs[(n, k)] = torch.empty(layout.local_shape(mesh.coords), dtype=torch.float32)
        specs[f"{k}/{n}"] = sharded.to_read(f"{k}/{n}", layout, mesh.coords, rows, bufs[(n, k)])
    specs.update(direct or {})
    views = {key: st.data for key, st in specs.items()}
    got = sharded.load(specs, directory)
    del specs
    try:
        for key in direct or {}:
            if got[key].data_ptr() != views[key].data_ptr():  # loaded elsewhere: into the engine's storage
                views[key].copy_(got[key])
        for (n, k), buf in bufs.items():
            key = f"{k}/{n}"
            if got[key].data_ptr() != views[key].data_ptr():  # loaded elsewhere: into the buffer's rows
                views[key].copy_(got[key])
            set_fp32_block(engine, named[n], k, buf)
    except Exception as e:  # noqa: BLE001
        return e
    return None


def read_weights(directory: str | Path, desc: dict, names=None, kind: str = "param"):
    """(name, full fp32 tensor of `kind`: the master weights by default) for every parameter (or
    `names`), batch by batch, without collectives: export, --init-from, forecast, tools."""
    check_description(desc, directory)
    if kind not in KINDS:
        raise CheckpointFormatError(f"{directory}: no tensors of kind {kind!r} (holds {list(KINDS)})")
    want = set(desc["tensors"] if names is None else names)
    for i, batch in enumerate(desc["batches"]):
        keys = [f"{kind}/{n}" for n in batch if n in want]
        if not keys:
            continue
        got = sharded.read_full(sharded.batch_dir(directory, i), keys)
        for n in batch:
            if n in want:
                yield n, got.pop(f"{kind}/{n}")


class LayoutFreeTag:
    """A layout-free tag read the way `consolidate` reads a DeepSpeed tag (one process, no collectives):
    full tensors by name and kind, the step, the optimizer's groups and step, schedule and counters."""

    def __init__(self, tag_dir: Path):
        from ..layout import Layout
        from .job_info import read_job_info

        self.dir = Path(tag_dir)
        self.info = read_job_info(tag_dir)
        self.desc = cast(dict, self.info.get("state"))  # check_description raises unless a dict
        check_description(self.desc, tag_dir / "job.json")
        self.layouts = {n: Layout.from_json(t["layout"]) for n, t in self.desc["tensors"].items()}
        self.mesh, self.stage, self.step = self.info["mesh"], int(self.info["zero_stage"]), int(self.info["step"])
        eng, client = self.desc["engine"], self.info.get("client_state") or {}
        self.model_state = [{"best": client.get("best"), "lr_scheduler": eng["lr_scheduler"], **eng["counters"]}]
        self._batch = {n: i for i, names in enumerate(self.desc["batches"]) for n in names}

    def full(self, name: str, kind: str):
        key = f"{kind}/{name}"
        return sharded.read_full(sharded.batch_dir(self.dir / "state", self._batch[name]), [key])[key]

    def optimizer_step(self) -> int:
        return int(self.desc["engine"]["optimizer_step"])

    def optimizer_groups(self) -> list[dict]:
        return [
            dict(g, names=names)
            for g, names in zip(self.desc["engine"]["optimizer_groups"], self.info["param_groups"], strict=True)
        ]

    def trainer_state(self) -> dict:
        from .deepspeed_files import _without_tensors, read_trainer_state

        return _without_tensors(read_trainer_state(self.dir, 0))
