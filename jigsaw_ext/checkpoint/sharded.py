"""Block-sharded tensors written layout-free, in parallel: megatron-core dist_checkpointing
ShardedTensors with explicit global offsets, stored by torch.distributed.checkpoint (DCP).

Saving: every rank describes the part of each logical tensor it writes. The ranks holding the same
block (its replicas: the dp axis and the model axes the block is not split over) share it: the
block is cut along its first dimension into as many row ranges as it has holders and holder r
writes range r. So no rank writes a whole block that others also hold, and each element is
written once. Loading: every rank describes the block its NEW layout needs (any mesh) and DCP
reads it from whichever saved pieces overlap it.

Large models are written in batches (`batches`): each batch is its own DCP directory
(`<dir>/NNNNN/`), so a rank never holds more than one batch of copies besides the largest tensor.

DCP keeps its `.metadata` as a pickle. It is never unpickled freely: `read_metadata` reads it
with `MetadataUnpickler`, which builds only the DCP metadata classes in METADATA_GLOBALS (and torch
dtypes); anything else is refused naming the file and the global. Tensor data is read by DCP with
torch.load(weights_only=True). megatron-core's `common.pt` (an empty dict here: every entry is a
ShardedTensor) is written by megatron-core's save and never read; the information around the tensors
is JSON (the caller's).

megatron-core 0.16's own torch_dist writer writes each bucket in a forked child process and waits
on a JoinableQueue: a writer child that dies (OOM killer, SIGKILL) leaves the rank waiting forever.
Saving therefore goes through megatron-core's `save` (validation, metadata.json) with a strategy
that hands megatron-core's own conversion of the ShardedTensors to DCP's in-process FileSystemWriter.
"""
from __future__ import annotations

import contextlib
import math
import pickle
from pathlib import Path
from typing import Mapping

import torch

from ..layout import Layout, even_split
from .common import CheckpointFormatError

BACKEND, BACKEND_VERSION = "torch_dist", 1
MIN_BATCH_BYTES = 64 << 20  # see `batches`

METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
     ("collections", "OrderedDict")}


class UnsafeMetadataError(CheckpointFormatError):
    """A DCP .metadata file that would build objects outside the allowlist."""


class MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata classes (METADATA_GLOBALS) and torch dtypes; refuses everything else."""

    path = "<stream>"

    def find_class(self, module: str, name: str):
        if (module, name) in METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeMetadataError(f"{self.path}: refused: the DCP metadata pickle asks for {module}.{name}, "
                                  f"outside the allowlist of DCP's metadata classes (jigsaw_ext.checkpoint.sharded); "
                                  f"it was not loaded and nothing in it ran")

    def persistent_load(self, pid):
        raise UnsafeMetadataError(f"{self.path}: refused: persistent id {pid!r} in a DCP metadata pickle")


def read_metadata(directory: str | Path):
    """DCP's Metadata of `directory`, unpickled with the allowlist."""
    from torch.distributed.checkpoint.metadata import StorageMeta

    path = Path(directory) / ".metadata"
    try:
        with open(path, "rb") as f:
            u = MetadataUnpickler(f)
            u.path = str(path)
            md = u.load()
    except FileNotFoundError:
        raise CheckpointFormatError(f"{path}: missing (the checkpoint is incomplete)") from None
    except UnsafeMetadataError:
        raise
    except Exception as err:  # noqa: BLE001 - a damaged pickle raises many types
        raise CheckpointFormatError(f"{path}: unreadable DCP metadata ({type(err).__name__}: {err})") from None
    if getattr(md, "storage_meta", None) is None:
        md.storage_meta = StorageMeta()
    return md


def _safe_reader_class():
    from megatron.core.dist_checkpointing.strategies.cached_metadata_filesystem_reader import \
        CachedMetadataFileSystemReader

    class SafeFileSystemReader(CachedMetadataFileSystemReader):
        """DCP's file reader with `.metadata` read through the allowlist."""

        def read_metadata(self, *args, **kwargs):
            if self._cached_metadata is None:
                md = read_metadata(self.path)
                md.storage_meta.load_id = self.load_id
                self._cached_metadata = md
            return self._cached_metadata

    return SafeFileSystemReader


@contextlib.contextmanager
def _safe_readers():
    """megatron-core's torch_dist load strategy builds its reader in one module-level function:
    point it at the safe reader while loading (megatron-core 0.16; pinned in pyproject.toml)."""
    from megatron.core.dist_checkpointing.strategies import torch as mstrat

    cls, saved = _safe_reader_class(), mstrat._get_filesystem_reader
    mstrat._get_filesystem_reader = lambda checkpoint_dir, cache_metadata=False: cls(checkpoint_dir)
    try:
        yield
    finally:
        mstrat._get_filesystem_reader = saved


# ------------------------------------------------------------------------------------------------
# which rank writes which part
def holders(layout: Layout, sizes: Mapping[str, int], coords: Mapping[str, int]) -> tuple[int, int]:
    """(r, R): this rank is holder r of the R ranks holding the same block of `layout` (dp and the
    model axes the layout does not split)."""
    r, count = 0, 1
    for axis in ("dp", "domain", "tp"):
        if axis == "dp" or axis not in layout.split_axes:
            r, count = r * sizes[axis] + coords[axis], count * sizes[axis]
    return r, count


def block_box(layout: Layout, coords: Mapping[str, int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(global offset, shape) of this rank's block."""
    offset = tuple(0 if s is None else s.offset(coords[s.axis]) for s in layout.splits)
    return offset, layout.local_shape(coords)


def write_range(layout: Layout, sizes, coords) -> tuple[int, int]:
    """Rows [start, stop) of this rank's block (first dimension) that this rank writes."""
    _, shape = block_box(layout, coords)
    r, count = holders(layout, sizes, coords)
    if not shape:  # a scalar: the first holder writes it
        return (0, 1) if r == 0 else (0, 0)
    parts = even_split(shape[0], count)
    start = sum(parts[:r])
    return start, start + parts[r]


def to_write(key: str, block: torch.Tensor, layout: Layout, sizes, coords):
    """The ShardedTensor of the part of `block` this rank writes, None if it writes nothing."""
    from megatron.core.dist_checkpointing import ShardedTensor

    offset, shape = block_box(layout, coords)
    if tuple(block.shape) != tuple(shape):
        raise CheckpointFormatError(f"{key}: this rank holds a block of shape {tuple(block.shape)}, its layout "
                                    f"says {tuple(shape)}")
    start, stop = write_range(layout, sizes, coords)
    if stop <= start:
        return None
    if not shape:
        return ShardedTensor(key, block.contiguous(), block.dtype, (), (), (), None)
    part = block[start:stop].contiguous()
    return ShardedTensor(key, part, part.dtype, tuple(part.shape), tuple(layout.shape),
                         (offset[0] + start, *offset[1:]), None)


def to_read(key: str, layout: Layout, coords, rows: tuple[int, int] | None = None, out=None):
    """The ShardedTensor of this rank's block (or of its rows [r0, r1) only), for loading into `out`
    (a new fp32 tensor of the block's shape if None; only those rows are written)."""
    from megatron.core.dist_checkpointing import ShardedTensor

    offset, shape = block_box(layout, coords)
    out = torch.empty(shape, dtype=torch.float32) if out is None else out
    data, offset = out, tuple(offset)
    if rows is not None and shape:
        data, offset = out[rows[0]:rows[1]], (offset[0] + rows[0], *offset[1:])
    return ShardedTensor(key, data, data.dtype, tuple(data.shape), tuple(layout.shape), offset, None)


def batches(layouts: Mapping[str, Layout], kinds: int, budget: int | None = None) -> list[list[str]]:
    """Consecutive groups of tensor names of at most `budget` global fp32 bytes (x kinds) each, a
    larger tensor alone; the same on every rank (global shapes only). Default budget: the largest
    tensor's bytes x kinds (at least MIN_BATCH_BYTES): a rank holding a 1/n share of a batch's blocks
    holds 3/n of the largest tensor's size in copies (half that budget measured no lower peak, and
    more DCP rounds; benchmarks/bench_checkpoint.py)."""
    if budget is None:
        budget = max(MIN_BATCH_BYTES, 4 * kinds * max((math.prod(v.shape) for v in layouts.values()), default=0))
    out, size = [[]], 0
    for name, layout in layouts.items():
        n = 4 * kinds * math.prod(layout.shape)
        if out[-1] and size + n > budget:
            out.append([])
            size = 0
        out[-1].append(name)
        size += n
    return [b for b in out if b]


def batch_dir(root: str | Path, i: int) -> Path:
    return Path(root) / f"{i:05d}"


# ------------------------------------------------------------------------------------------------
def _strategies(sync: bool = False):
    from megatron.core.dist_checkpointing.strategies.base import SaveShardedStrategy
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy

    class InProcessSave(SaveShardedStrategy):
        """megatron-core's conversion to DCP, written by DCP's in-process FileSystemWriter."""

        def save(self, sharded_state_dict, checkpoint_dir):
            import torch.distributed.checkpoint as dcp
            from megatron.core.dist_checkpointing.strategies.torch import (
                MCoreSavePlanner, _replace_state_dict_keys_with_sharded_keys, mcore_to_pyt_state_dict)

            sd, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, True)
            writer = dcp.FileSystemWriter(checkpoint_dir, single_file_per_rank=True, sync_files=sync,
                                          thread_count=1, overwrite=False)
            dcp.save(mcore_to_pyt_state_dict(sd, False), storage_writer=writer,
                     planner=MCoreSavePlanner(flatten_state_dict=False))

    class SafeLoad(TorchDistLoadShardedStrategy):
        def load(self, sharded_state_dict, checkpoint_dir):
            with _safe_readers():
                return super().load(sharded_state_dict, checkpoint_dir)

    return InProcessSave(BACKEND, BACKEND_VERSION), SafeLoad()


def verify_dir(directory: str | Path) -> None:
    """Check a DCP directory's files against its tag's MANIFEST.json before anything reads them
    (ChecksumError naming the file and, for a data file, the damaged tensor). Free after the trainer's
    collective `verify` of the whole tag (the digests are remembered)."""
    from .manifest import verify_file

    d = Path(directory)
    for path in sorted(d.iterdir()):
        if path.is_file() and (path.name == ".metadata" or path.suffix == ".distcp"):
            verify_file(path)


def failing_rank(err: BaseException) -> tuple[int | None, BaseException]:
    """(rank, its exception) of the lowest rank that failed: DCP raises one CheckpointException on
    EVERY rank when any rank failed to read or write (the exception of each failing rank inside);
    (None, err) for anything else."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        r = min(failures)
        exc = failures[r][0] if isinstance(failures[r], tuple) else failures[r]
        return r, exc
    return None, err


def save(tensors: dict, directory: str | Path, sync: bool = False) -> None:
    """Collective over the world: write {key: ShardedTensor} (this rank's parts) into `directory`
    (which must exist and be empty). sync: fsync every data file before returning. Off by default,
    like DeepSpeed's torch.save: a tag's MANIFEST.json records every file's sha256 and every load
    checks it, so data lost with the page cache (a power cut) is refused, naming the file and the
    older tag to resume from; fsync made a save 20-30 % slower here (benchmarks/bench_checkpoint.py)."""
    from megatron.core import dist_checkpointing

    from ..megatron_cpu import install

    install()
    dist_checkpointing.save(tensors, str(directory), sharded_strategy=_strategies(sync)[0])


def load(tensors: dict, directory: str | Path) -> dict:
    """Collective over the world: {key: this rank's block} for {key: ShardedTensor from to_read}."""
    from megatron.core.dist_checkpointing.core import CheckpointingException

    from ..megatron_cpu import install

    install()
    verify_dir(directory)
    missing = [k for k in tensors if k not in stored_keys(directory)]
    if missing:
        raise CheckpointFormatError(f"{directory}: holds no tensor {missing[0]!r} ({len(missing)} missing; "
                                    f"another model config?)")
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        return _strategies()[1].load(tensors, Path(directory))
    except CheckpointingException as err:
        raise CheckpointFormatError(f"{directory}: {err}") from None
    except CheckpointException as err:  # raised on every rank; BaseException, not Exception
        r, exc = failing_rank(err)
        raise CheckpointFormatError(f"{directory}: reading failed on rank {r} ({type(exc).__name__}: {exc}); "
                                    f"corrupt or truncated?") from None


_KEYS: dict[tuple, dict] = {}


def stored_keys(directory: str | Path) -> dict:
    """{key: (global shape, dtype)} of the tensors stored in a DCP directory (restricted read)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = Path(directory).resolve() / ".metadata"
    try:
        st = path.stat()
    except FileNotFoundError:
        raise CheckpointFormatError(f"{path}: missing (the checkpoint is incomplete)") from None
    d = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
    if d not in _KEYS:
        md = read_metadata(directory)
        _KEYS[d] = {k: (tuple(v.size), str(v.properties.dtype).replace("torch.", ""))
                    for k, v in md.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}
    return _KEYS[d]


def read_full(directory: str | Path, keys: list[str]) -> dict:
    """{key: full tensor} in one process (no process group needed): `export`, tools."""
    import torch.distributed.checkpoint as dcp

    verify_dir(directory)
    stored = stored_keys(directory)
    out = {}
    for k in keys:
        if k not in stored:
            raise CheckpointFormatError(f"{directory}: holds no tensor {k!r}")
        shape, dtype = stored[k]
        out[k] = torch.empty(shape, dtype=getattr(torch, dtype))
    from torch.distributed.checkpoint.api import CheckpointException

    reader = _safe_reader_class()(str(directory))
    try:
        dcp.load(out, storage_reader=reader, no_dist=True)
    except CheckpointException as err:
        _, exc = failing_rank(err)
        if isinstance(exc, CheckpointFormatError):
            raise exc from None
        raise CheckpointFormatError(f"{directory}: unreadable ({type(exc).__name__}: {exc}); corrupt or "
                                    f"truncated?") from None
    return out
