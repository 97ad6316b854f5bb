"""Layout-free training state of a block-sharded model under DeepSpeed: written by every rank in
parallel, loaded on any mesh, any ZeRO stage, any dp.

    desc = save_layout_free(engine, model, TAG / "state")   # collective; JSON-able description
    load_layout_free(engine, model, TAG / "state", desc)     # collective, on any mesh

What is written, per parameter (each a logical tensor of the parameter's global shape, fp32):
`param/<name>` (the master weights), `exp_avg/<name>`, `exp_avg_sq/<name>` (AdamW's moments), in
batches of about the largest tensor's size (sharded.batches), each a torch.distributed.checkpoint
directory (`state/00000/`, `state/00001/`, ...). The description (JSON, kept by the caller) lists the batches, every tensor's layout on
the mesh that wrote it, and the engine's optimizer step, lr-scheduler state and counters. The
low-precision parameters of a bf16 run are not written: they are the master weights rounded, which
is what loading sets them to.

The model's parameters carry their layout (`p.block_layout`); `model.mesh` gives the rank's
coordinates and the mesh sizes.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist

from . import sharded
from .common import CheckpointFormatError
from .engine_state import (KINDS, create_moments, engine_info, fp32_blocks, needed_rows, restore_engine_info,
                           set_fp32_block)

FORMAT = "jigsaw-layout-free/1"


def _barrier():
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def save_layout_free(engine, model, directory: str | Path, budget: int | None = None, sync: bool = False) -> dict:
    """Collective over the world: write this rank's parts of every parameter's master weights and
    moments; returns the description to keep beside them (JSON)."""
    mesh = model.mesh
    named = dict(model.named_parameters())
    layouts = {n: p.block_layout for n, p in named.items()}
    groups = sharded.batches(layouts, len(KINDS), budget)
    create_moments(engine)
    for i, names in enumerate(groups):
        d = sharded.batch_dir(directory, i)
        d.mkdir(parents=True, exist_ok=True)
        parts = {}
        for name in names:
            for kind, block in fp32_blocks(engine, named[name]).items():
                st = sharded.to_write(f"{kind}/{name}", block, layouts[name], mesh.sizes, mesh.coords)
                if st is not None:
                    parts[st.key] = st
        _barrier()  # every rank's directory exists before anyone plans into it
        sharded.save(parts, d, sync=sync)
        del parts
    return {"format": FORMAT, "kinds": list(KINDS), "batches": groups,
            "tensors": {n: {"shape": list(lay.shape), "layout": lay.to_json()} for n, lay in layouts.items()},
            "engine": engine_info(engine)}


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
        raise CheckpointFormatError(f"{where}: the checkpoint's parameters differ from this model's (missing "
                                    f"{missing[:3]}, unexpected {extra[:3]}; another model config?)")
    for n, p in named.items():
        if list(p.block_layout.shape) != list(tensors[n]["shape"]):
            raise CheckpointFormatError(f"{where}: {n} has shape {tensors[n]['shape']}, this model expects "
                                        f"{list(p.block_layout.shape)} (another model config?)")


def load_layout_free(engine, model, directory: str | Path, desc: dict) -> None:
    """Collective over the world: every rank reads the blocks of ITS layout and sets them into the
    engine (master weights, parameters, moments), then the optimizer step, schedule and counters."""
    check_model(desc, model, directory)
    mesh = model.mesh
    named = dict(model.named_parameters())
    create_moments(engine)
    largest = 4 * max((math.prod(p.block_layout.shape) for p in named.values()), default=0)
    for i, names in enumerate(desc["batches"]):
        needed = {(n, k): needed_rows(engine, named[n], k) for n in names for k in KINDS}
        needed = {nk: rows for nk, rows in needed.items() if rows is None or rows[1] > rows[0]}
        # all kinds in one read unless a rank's part of the batch exceeds the largest tensor: then one
        # kind at a time (a third of the memory, three times DCP's planning); the same on every rank
        mine = sum(4 * _numel(named[n].block_layout, mesh.coords, rows) for (n, _), rows in needed.items())
        for kinds in [KINDS] if _world_max(mine) <= largest else [(k,) for k in KINDS]:
            _read_into(engine, named, mesh, sharded.batch_dir(directory, i),
                       {nk: rows for nk, rows in needed.items() if nk[1] in kinds})
    restore_engine_info(engine, desc["engine"])


def _numel(layout, coords, rows) -> int:
    shape = layout.local_shape(coords)
    return math.prod(shape) if rows is None or not shape else (rows[1] - rows[0]) * math.prod(shape[1:])


def _world_max(n: int) -> int:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return n
    t = torch.tensor([n], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _read_into(engine, named, mesh, directory, needed: dict) -> None:
    """Collective (every rank calls it, possibly with nothing to read): read the rows each (name,
    kind) needs and set them into the engine."""
    bufs, specs = {}, {}
    for (n, k), rows in needed.items():
        layout = named[n].block_layout
        bufs[(n, k)] = torch.empty(layout.local_shape(mesh.coords), dtype=torch.float32)
        specs[f"{k}/{n}"] = sharded.to_read(f"{k}/{n}", layout, mesh.coords, rows, bufs[(n, k)])
    views = {key: st.data for key, st in specs.items()}
    got = sharded.load(specs, directory)
    del specs
    for (n, k), buf in bufs.items():
        key = f"{k}/{n}"
        if got[key].data_ptr() != views[key].data_ptr():  # loaded elsewhere: into the buffer's rows
            views[key].copy_(got[key])
        set_fp32_block(engine, named[n], k, buf)


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
        from .common import read_job_info

        self.dir = Path(tag_dir)
        self.info = read_job_info(tag_dir)
        self.desc = self.info.get("state")
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
        return [dict(g, names=names) for g, names in zip(self.desc["engine"]["optimizer_groups"],
                                                          self.info["param_groups"])]

    def trainer_state(self) -> dict:
        from .deepspeed_files import _without_tensors, read_trainer_state

        return _without_tensors(read_trainer_state(self.dir, 0))
