"""Weights only, for inference and sharing: one safetensors file, or a sharded set with an index.

    python -m jigsaw_ext.checkpoint export CKPT model.safetensors            # one file
    python -m jigsaw_ext.checkpoint export CKPT OUT_DIR --max-shard-gb 2     # OUT_DIR/model-00001-of-00003.safetensors,
                                                                              # OUT_DIR/model.safetensors.index.json
Tensors are the full logical fp32 master weights by parameter name (or bf16 with --dtype bfloat16).
The file's metadata (and the index's "metadata") holds the format, the step and, as JSON under
"job", what the application recorded beside the weights (its model configuration, statistics,
provenance), so a reader needs nothing else. The sharded set streams: at most one shard is in
memory. Every file is written under a temporary name and renamed; a set is renamed as a directory.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..files import atomic_write_text, replace_synced
from .common import app_keys, resolve
from .errors import CheckpointFormatError
from .job_info import read_job_info

EXPORT_FORMAT = "jigsaw-weights/1"
INDEX = "model.safetensors.index.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _metadata(info: dict, dtype: str) -> dict:
    job = app_keys(info)
    return {"format": EXPORT_FORMAT, "step": str(info.get("step")), "dtype": dtype, "job": json.dumps(job)}


def _save(tensors: dict, path: Path, meta: dict) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata=meta)
    replace_synced(tmp, path)


def export(src: str | Path, out: str | Path, max_shard_bytes: int | None = None, dtype: str = "float32") -> Path:
    """Write the weights of any checkpoint (layout-free tag, consolidated, old DeepSpeed tag) to `out`:
    one file if `max_shard_bytes` is None, else a directory of shards of at most that many bytes."""
    from .consolidated import full_tensors

    if dtype not in DTYPES:
        raise CheckpointFormatError(f"--dtype {dtype!r}: one of {sorted(DTYPES)}")
    src, out = resolve(src), Path(out)
    if out.exists():
        raise CheckpointFormatError(f"{out} exists; choose a new output path")
    info = read_job_info(src)
    meta = _metadata(info, dtype)
    cast = DTYPES[dtype]
    if max_shard_bytes is None:
        _save({n: t.to(cast).contiguous() for n, t in full_tensors(src)}, out, meta)
        return out
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        shards: list[tuple[list[str], str]] = []
        current: dict = {}
        size = 0
        for name, t in full_tensors(src):
            t = t.to(cast).contiguous()
            n = t.numel() * t.element_size()
            if current and size + n > max_shard_bytes:
                shards.append(_flush(current, tmp, len(shards), meta))
                current, size = {}, 0
            current[name], size = t, size + n
        if current:
            shards.append(_flush(current, tmp, len(shards), meta))
        total = len(shards)
        weight_map, nbytes = {}, 0
        for i, (names, part) in enumerate(shards):
            final = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
            os.replace(tmp / part, tmp / final)
            weight_map.update({n: final for n in names})
            nbytes += (tmp / final).stat().st_size
        atomic_write_text(
            tmp / INDEX, json.dumps({"metadata": dict(meta, total_size=nbytes), "weight_map": weight_map}, indent=1)
        )
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _flush(tensors: dict, tmp: Path, i: int, meta: dict) -> tuple[list[str], str]:
    name = f"part{i:05d}.safetensors"
    _save(tensors, tmp / name, meta)
    return list(tensors), name


def read_export(path: str | Path) -> tuple[dict, dict]:
    """(tensors, metadata) of an export (one file or a sharded set): tests and small models."""
    from safetensors import safe_open

    path = Path(path)
    files = (
        [path]
        if path.is_file()
        else sorted(set((path / f) for f in json.loads((path / INDEX).read_text())["weight_map"].values()))
    )
    tensors, meta = {}, {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            meta = h.metadata()
            tensors.update({k: h.get_tensor(k) for k in h.keys()})
    return tensors, meta
