"""The consolidated checkpoint (one directory of safetensors + index.json, one process): written
tensor by tensor from a layout-free tag or from a tag of the DeepSpeed 0.19 per-rank format (the
converter), read whole or one block at a time, loaded into a model on any mesh."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch

from ..layout import Layout, block_layout
from .common import (
    FORMAT,
    KINDS,
    ROOT_SIDE_FILES,
    app_keys,
    is_consolidated,
    is_layout_free,
    read_index,
    resolve,
)
from .deepspeed_files import DeepSpeedTag
from .engine_state import jsonable as _jsonable
from .errors import CheckpointFormatError
from .job_info import read_job_info
from .manifest import ALGORITHM, check, describe, expected, missing_digest, verify_tree

if TYPE_CHECKING:
    from ..mesh import Mesh
    from .layout_free import LayoutFreeTag


def consolidate(src: str | Path, out: str | Path, log=print) -> Path:
    """Write the layout-free checkpoint of `src` to `out` (tensor by tensor, atomically)."""
    src_dir, out = resolve(src), Path(out)
    if is_consolidated(src_dir):
        raise CheckpointFormatError(f"{src_dir} is already consolidated")
    if out.exists():
        raise CheckpointFormatError(f"{out} exists; choose a new output directory")
    if is_layout_free(src_dir):
        from .layout_free import LayoutFreeTag

        tag: LayoutFreeTag | DeepSpeedTag = LayoutFreeTag(src_dir)
    else:
        tag = DeepSpeedTag(src_dir)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write(tag, src_dir, tmp, log)
        os.replace(tmp, out)
    except BaseException as err:
        from safetensors import SafetensorError

        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, CheckpointFormatError) or not isinstance(err, (OSError, RuntimeError, SafetensorError)):
            raise
        from ..safe_load import write_failure

        raise CheckpointFormatError(
            f"writing {out} failed ({write_failure(err)}); nothing was left behind "
            f"({tmp} removed); free space there or choose another output folder"
        ) from None
    return out


def _write(tag, src_dir: Path, tmp: Path, log) -> None:
    """The consolidated checkpoint of `tag` into `tmp` (tensor by tensor, then index.json)."""
    (tmp / "tensors").mkdir(parents=True)
    from safetensors.torch import save_file

    tensors = {}
    t0 = time.perf_counter()
    names = list(tag.layouts)
    for i, name in enumerate(names):
        files, digests = {}, {}
        for kind in KINDS:
            full = tag.full(name, kind)
            rel = f"tensors/{i:05d}.{kind}.safetensors"
            save_file({kind: full.contiguous()}, str(tmp / rel), metadata={"name": name, "kind": kind})
            files[kind], digests[kind] = rel, describe(tmp / rel)
            del full
        tensors[name] = {
            "shape": list(tag.layouts[name].shape),
            "dtype": "float32",
            "files": files,
            "digests": digests,
            "layout": tag.info["layouts"][name],
        }
        if log and (i % 20 == 0 or i == len(names) - 1):
            log(f"consolidate: {i + 1}/{len(names)} tensors ({time.perf_counter() - t0:.1f} s)")
    st0 = tag.model_state[0]
    index = {
        "format": FORMAT,
        "step": tag.step,
        "best": st0.get("best"),
        "app": app_keys(tag.info),
        "deepspeed": tag.info["deepspeed"],
        "source": {
            "path": str(src_dir.resolve()),
            "mesh": tag.mesh,
            "zero_stage": tag.stage,
            "dtype": tag.info.get("dtype", "float32"),
        },
        "optimizer": {"step": tag.optimizer_step(), "groups": tag.optimizer_groups()},
        "lr_scheduler": _jsonable(st0.get("lr_scheduler")),
        "engine": {
            "global_steps": st0.get("global_steps"),
            "global_samples": st0.get("global_samples"),
            "skipped_steps": st0.get("skipped_steps"),
        },
        "trainer_state": tag.trainer_state(),
        "tensors": tensors,
    }
    for name in ROOT_SIDE_FILES:  # the application's files beside the tags (the tag's own first)
        side = next((d / name for d in (src_dir, src_dir.parent) if (d / name).is_file()), None)
        if side is not None:
            shutil.copyfile(side, tmp / name)
            if log:
                log(f"consolidate: copied {side}")
    (tmp / "index.json").write_text(json.dumps(index, indent=1))


class Consolidated:
    """Reader of a consolidated checkpoint: full tensors or one block, from safetensors files."""

    def __init__(self, path: str | Path):
        self.dir = resolve(path)
        if not is_consolidated(self.dir):
            raise CheckpointFormatError(f"{self.dir}: not a consolidated checkpoint (no index.json)")
        self.index = read_index(self.dir)

    def _slice(self, name: str, kind: str, read):
        """read(slice object of safetensors) on the tensor file of (name, kind), checked against the index."""
        from safetensors import SafetensorError, safe_open

        try:
            entry = self.index["tensors"][name]
            rel = entry["files"][kind]
        except KeyError:
            raise CheckpointFormatError(f"{self.dir}: no tensor {name!r} ({kind})") from None
        path = (self.dir / rel).resolve()
        if self.dir.resolve() not in path.parents:
            raise CheckpointFormatError(f"{self.dir / 'index.json'}: file {rel!r} of {name} is outside the checkpoint")
        if not path.is_file():
            raise CheckpointFormatError(f"{path}: missing (the consolidated checkpoint is incomplete)")
        digest = (entry.get("digests") or {}).get(kind)
        if not isinstance(digest, dict):
            raise missing_digest(self.dir, name, kind)
        check(path, digest, str(self.dir / "index.json"), f"tensor {name}, {kind}")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                if kind not in f.keys():
                    raise CheckpointFormatError(f"{path}: no entry {kind!r} (holds {list(f.keys())[:5]})")
                sl = f.get_slice(kind)
                shape, dtype = list(sl.get_shape()), sl.get_dtype()
                if shape != entry["shape"] or dtype != "F32":
                    raise CheckpointFormatError(
                        f"{path}: {dtype} tensor of shape {shape}, index.json expects F32 "
                        f"{entry['shape']} for {name} ({kind})"
                    )
                return read(sl)
        except SafetensorError as err:
            raise CheckpointFormatError(
                f"{path}: not a readable safetensors file ({err}); corrupt, truncated or not written by consolidate"
            ) from None

    def full(self, name: str, kind: str = "param") -> torch.Tensor:
        return self._slice(name, kind, lambda sl: sl[:])

    def block(self, name: str, kind: str, layout: Layout, coords) -> torch.Tensor:
        """This rank's block of (name, kind) under `layout`, reading only that block."""
        shape = self.index["tensors"].get(name, {}).get("shape")
        if shape is not None and list(layout.shape) != shape:
            raise CheckpointFormatError(
                f"{self.dir}: {name} has shape {shape}, this model expects {list(layout.shape)} (another model config?)"
            )
        sl = layout.local_slices(coords)
        out = self._slice(name, kind, lambda s: s[sl] if sl else s[:])
        return out.reshape(layout.local_shape(coords))


def full_tensors(path: str | Path, kind: str = "param"):
    """(name, full logical tensor) for every parameter of any checkpoint, one at a time."""
    path = resolve(path)
    if is_consolidated(path):
        c = Consolidated(path)
        for name in c.index["tensors"]:
            yield name, c.full(name, kind)
    elif is_layout_free(path):
        from .layout_free import read_weights

        desc = read_job_info(path)["state"]
        yield from read_weights(path / "state", desc, kind=kind)
    else:
        tag = DeepSpeedTag(path)
        for name in tag.layouts:
            yield name, tag.full(name, kind)


def load_into_model(model: torch.nn.Module, path: str | Path) -> dict:
    """Copy each parameter's block (of this rank's mesh coordinates) from any checkpoint into a
    model built on any mesh; returns the checkpoint's job info. Weights only."""
    path = resolve(path)
    info = read_job_info(path)
    mesh = cast("Mesh", model.mesh)
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(info["layouts"]))
    if missing:
        raise CheckpointFormatError(f"{path}: no tensors for parameters {missing[:5]} (another model config?)")
    for name, p in params.items():
        if list(block_layout(p).shape) != info["layouts"][name]["shape"]:
            raise CheckpointFormatError(
                f"{path}: {name} has shape {info['layouts'][name]['shape']}, this model "
                f"expects {list(block_layout(p).shape)} (another model config?)"
            )
    if is_layout_free(path):  # every rank reads the full tensors in batches, without collectives
        from .layout_free import read_weights

        with torch.no_grad():
            for name, full in read_weights(path / "state", info["state"], names=list(params)):
                p = params[name]
                p.copy_(block_layout(p).shard(full, mesh.coords).to(p.dtype))
        return info
    reader = Consolidated(path) if is_consolidated(path) else DeepSpeedTag(path)
    with torch.no_grad():
        for name, p in params.items():
            layout = block_layout(p)
            if isinstance(reader, Consolidated):
                block = reader.block(name, "param", layout, mesh.coords)
            else:
                block = layout.shard(reader.full(name, "param"), mesh.coords)
            p.copy_(block.to(p.dtype))
    return info


def verify(path: str | Path) -> dict:
    """Check every file of a checkpoint against its checksums: {"path", "kind", "verified", "files",
    "problems"}; problems: one line per damaged, missing or unlisted file (empty: intact); verified
    False: written before checksums existed (nothing could be checked) or no usable manifest."""
    path = resolve(path)
    out: dict = {
        "path": str(path),
        "kind": "consolidated" if is_consolidated(path) else "tag",
        "verified": False,
        "files": 0,
        "problems": [],
    }
    if out["kind"] == "tag" and not (path / "COMPLETE").is_file():
        return dict(out, problems=[f"{path}: no COMPLETE marker (an interrupted save?)"])
    try:
        files = expected(path)
        problems = verify_tree(path)
    except CheckpointFormatError as err:
        return dict(out, problems=[str(err)])
    if files is None:
        return out
    return dict(out, verified=True, files=len(files[0]), algorithm=ALGORITHM, problems=problems)


def inspect(path: str | Path) -> dict:
    path = resolve(path)
    info = read_job_info(path)
    layouts = info["layouts"]
    n = sum(math.prod(d["shape"]) for d in layouts.values())
    kind = (
        "consolidated"
        if is_consolidated(path)
        else "layout-free"
        if is_layout_free(path)
        else "deepspeed 0.19 per-rank"
    )
    files = [p for p in path.rglob("*") if p.is_file()]
    prov = info.get("provenance") or {}
    return {
        "path": str(path),
        "kind": kind,
        "mesh": info["mesh"],
        "zero_stage": info["zero_stage"],
        "step": info.get("step"),
        "dtype": info.get("dtype", "float32"),
        "parameters": n,
        "bytes_on_disk": sum(p.stat().st_size for p in files),
        "files": len(files),
        "largest_tensor_bytes": 4 * max((math.prod(d["shape"]) for d in layouts.values()), default=0),
        "batches": len((info.get("state") or {}).get("batches") or []),
        "optimizer_step": ((info.get("state") or {}).get("engine") or {}).get("optimizer_step"),
        "versions": prov.get("versions"),
        "git_commit": prov.get("git_commit"),
        "tensors": {
            k: {"shape": d["shape"], "split": [None if s is None else s["axis"] for s in d["splits"]]}
            for k, d in layouts.items()
        },
    }
