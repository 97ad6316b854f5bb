"""Block-sharded tensors written layout-free, in parallel: megatron-core dist_checkpointing
ShardedTensors with explicit global offsets, stored by torch.distributed.checkpoint (DCP).

Saving (fragment_parts): every rank writes, of each block it holds, the flat range its optimizer
partition holds (its ZeRO fragment; the whole block under ZeRO-0), straight from the engine's
storage: the block is cut into chunks of rows (chunk_rows, at most CHUNK_MAX elements) and the
ranks holding the same fragment (the model axes the block is not split over; dp too under ZeRO-0)
take the chunks in turn; a rank's part of a chunk is written as boxes of the global tensor
(flat_boxes: a partial first row, whole rows, a partial last row), so rows straddling two ZeRO
partitions need no exchange and every element is written once. `tight` hands DCP views that it
writes without copying. Where the fragments are unavailable (to_write), the holders of a block cut
it into row ranges instead. Loading: every rank describes the block (or the flat range) its NEW
layout needs (any mesh) and DCP reads it from whichever saved pieces overlap it, into the engine's
storage where it can (fragment_reads).

Large models are written in batches (`batches`): each batch is its own DCP directory
(`<dir>/NNNNN/`).

DCP keeps its `.metadata` as a pickle, read only through dcp_metadata's allowlist. Tensor data is
read by DCP with torch.load(weights_only=True). megatron-core's `common.pt` (an empty dict here: every entry is a
ShardedTensor) is written by megatron-core's save and never read; the information around the tensors
is JSON (the caller's).

megatron-core 0.16's own torch_dist writer writes each bucket in a forked child process and waits
on a JoinableQueue: a writer child that dies (OOM killer, SIGKILL) leaves the rank waiting forever.
Saving therefore goes through megatron-core's `save` (validation, metadata.json) with a strategy
that hands megatron-core's own conversion of the ShardedTensors to DCP's in-process FileSystemWriter.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import torch

from ..layout import Layout, even_split
from .common import agree
from .dcp_metadata import read_metadata, safe_reader_class, safe_readers
from .errors import CheckpointFormatError
from .manifest import verify_file

BACKEND, BACKEND_VERSION = "torch_dist", 1
MIN_BATCH_BYTES = 64 << 20  # see `batches`


# ------------------------------------------------------------------------------------------------
# which rank writes which part
def holders(
    layout: Layout, sizes: Mapping[str, int], coords: Mapping[str, int], with_dp: bool = True
) -> tuple[int, int]:
    """(r, R): this rank is holder r of the R ranks holding the same block of `layout` (dp and the
    model axes the layout does not split; without dp if `with_dp` is False)."""
    r, count = 0, 1
    for axis in ("dp", "domain", "tp"):
        if (axis == "dp" and with_dp) or (axis != "dp" and axis not in layout.split_axes):
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
        raise CheckpointFormatError(
            f"{key}: this rank holds a block of shape {tuple(block.shape)}, its layout says {tuple(shape)}"
        )
    start, stop = write_range(layout, sizes, coords)
    if stop <= start:
        return None
    if not shape:
        return ShardedTensor(key, block.contiguous(), block.dtype, (), (), (), None)
    part = block[start:stop].contiguous()
    return ShardedTensor(
        key, part, part.dtype, tuple(part.shape), tuple(layout.shape), (offset[0] + start, *offset[1:]), None
    )


def flat_boxes(shape: tuple[int, ...], start: int, stop: int) -> list[tuple[int, tuple, tuple]]:
    """The flat (row-major) range [start, stop) of a tensor of `shape` as boxes: [(flat start, offset,
    size)], in order, each a contiguous run of the range (so a view of a flat buffer of it): a partial
    first row, whole rows, a partial last row, recursively (at most 2 ndim - 1 boxes)."""
    shape = tuple(shape)
    if stop <= start:
        return []
    if not shape:
        return [(0, (), ())]
    if len(shape) == 1:
        return [(start, (start,), (stop - start,))]
    row = math.prod(shape[1:])
    if row == 0:
        return []

    def sub(r, a, b):  # [a, b) within row r
        return [(r * row + f, (r, *o), (1, *z)) for f, o, z in flat_boxes(shape[1:], a, b)]

    r0, c0 = divmod(start, row)
    r1, c1 = divmod(stop, row)
    if r0 == r1:
        return sub(r0, c0, c1)
    out = []
    if c0:
        out += sub(r0, c0, row)
        r0 += 1
    if r1 > r0:
        out.append((r0 * row, (r0, *(0,) * (len(shape) - 1)), (r1 - r0, *shape[1:])))
    if c1:
        out += sub(r1, 0, c1)
    return out


def tight(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor as one whose storage is exactly its bytes, sharing its memory. DCP's writer
    clones every tensor whose storage is larger than itself (a view of a flat optimizer partition,
    a row range) and keeps each clone until the rank's file is written: with these it copies nothing."""
    if not t.is_contiguous():
        raise ValueError("tight: a contiguous tensor expected")
    if t.untyped_storage().nbytes() == t.nbytes or t.numel() == 0:
        return t
    off = t.storage_offset() * t.element_size()
    return torch.empty(0, dtype=t.dtype).set_(t.untyped_storage()[off : off + t.nbytes], 0, t.shape)  # type: ignore[call-overload]  # torch's stub lacks set_(UntypedStorage, offset, size)


CHUNK_MAX = 16 << 20  # elements (64 MiB fp32): the largest item written; DCP reads a whole item to load any part
CHUNK_MIN = 1 << 20  # elements: smaller blocks are one item


def chunk_rows(shape: tuple[int, ...], holders_count: int) -> int:
    """Rows per written chunk of a block: about a quarter of a holder's share (so the holders' shares
    even out), at least CHUNK_MIN and at most CHUNK_MAX elements (a row at least)."""
    if not shape:
        return 1
    row = max(1, math.prod(shape[1:]))
    want = min(CHUNK_MAX, max(CHUNK_MIN, -(-math.prod(shape) // (4 * holders_count))))
    return max(1, want // row)


def fragment_parts(
    key: str, flat: torch.Tensor, start: int, layout: Layout, sizes, coords, dp_replicated: bool = False
) -> list:
    """ShardedTensors (views of `flat`, no copies) of what this rank writes of its fragment: the flat
    range [start, start + len(flat)) of its block of `layout` (row-major). The block is cut into
    chunks of rows (chunk_rows); chunk j is written by holder (j + crc32(key)) % R of the R ranks
    holding the same fragment: the model axes the layout does not split, and dp too if
    `dp_replicated` (ZeRO-0; under ZeRO the dp ranks hold disjoint fragments). Each rank writes the
    part of its fragment inside its chunks, as boxes (flat_boxes: rows straddling two ZeRO
    partitions become partial-row boxes with exact offsets), so every element is written once
    whatever the fragments (which may differ between the model-axis replicas) and nothing is
    exchanged."""
    import zlib

    from megatron.core.dist_checkpointing import ShardedTensor

    offset, shape = block_box(layout, coords)
    numel = flat.numel()
    if numel == 0:
        return []
    total = math.prod(shape)
    if start < 0 or start + numel > total:
        raise CheckpointFormatError(
            f"{key}: this rank's fragment [{start}, {start + numel}) lies outside its block of shape {tuple(shape)}"
        )
    if not shape:  # a scalar: its first holder writes it
        r, _ = holders(layout, sizes, coords, with_dp=dp_replicated)
        return [ShardedTensor(key, tight(flat.view(())), flat.dtype, (), (), (), None)] if r == 0 else []
    r, count = holders(layout, sizes, coords, with_dp=dp_replicated)
    row = math.prod(shape[1:])
    step = chunk_rows(shape, count) * row
    h = zlib.crc32(key.encode())
    out = []
    for j in range(start // step, -(-(start + numel) // step)):
        if (j + h) % count != r:
            continue
        lo, hi = max(start, j * step), min(start + numel, (j + 1) * step)
        for f, o, z in flat_boxes(shape, lo, hi):
            out.append(_box_tensor(key, tight(flat[f - start : f - start + math.prod(z)].view(z)), layout, offset, o))
    return out


def _box_tensor(key: str, data: torch.Tensor, layout: Layout, offset, o):
    """The ShardedTensor of `data`, the box at `o` inside this rank's block (at `offset`) of `layout`."""
    from megatron.core.dist_checkpointing import ShardedTensor

    at = tuple(a + b for a, b in zip(offset, o, strict=True))
    return ShardedTensor(key, data, data.dtype, tuple(data.shape), tuple(layout.shape), at, None)


def fragment_reads(key: str, flat: torch.Tensor, start: int, layout: Layout, coords) -> list:
    """ShardedTensors to load the flat range [start, start + len(flat)) of this rank's block of
    `layout` straight into `flat` (views of it: DCP copies into them)."""
    offset, shape = block_box(layout, coords)
    out = []
    for f, o, z in flat_boxes(shape, start, start + flat.numel()):
        out.append(_box_tensor(key, flat[f - start : f - start + max(1, math.prod(z))].view(z), layout, offset, o))
    return out


def to_read(key: str, layout: Layout, coords, rows: tuple[int, int] | None = None, out=None):
    """The ShardedTensor of this rank's block (or of its rows [r0, r1) only), for loading into `out`
    (a new fp32 tensor of the block's shape if None; only those rows are written)."""
    from megatron.core.dist_checkpointing import ShardedTensor

    offset, shape = block_box(layout, coords)
    out = torch.empty(shape, dtype=torch.float32) if out is None else out
    data, offset = out, tuple(offset)
    if rows is not None and shape:
        data, offset = out[rows[0] : rows[1]], (offset[0] + rows[0], *offset[1:])
    return ShardedTensor(key, data, data.dtype, tuple(data.shape), tuple(layout.shape), offset, None)


def batches(layouts: Mapping[str, Layout], kinds: int, budget: int | None = None) -> list[list[str]]:
    """Consecutive groups of tensor names of at most `budget` global fp32 bytes (x kinds) each, a
    larger tensor alone; the same on every rank (global shapes only). Default budget: the largest
    tensor's bytes x kinds (at least MIN_BATCH_BYTES). Saving copies nothing (fragment_parts), so
    the batch bounds only the buffers of a load that cannot read into the engine (bf16 parameters,
    the accessors' fallback)."""
    if budget is None:
        budget = max(MIN_BATCH_BYTES, 4 * kinds * max((math.prod(v.shape) for v in layouts.values()), default=0))
    out: list[list[str]] = [[]]
    size = 0
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
                MCoreSavePlanner,
                _replace_state_dict_keys_with_sharded_keys,
                mcore_to_pyt_state_dict,
            )

            sd, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, True)
            writer = dcp.FileSystemWriter(
                checkpoint_dir, single_file_per_rank=True, sync_files=sync, thread_count=1, overwrite=False
            )
            dcp.save(
                mcore_to_pyt_state_dict(sd, False),
                storage_writer=writer,
                planner=MCoreSavePlanner(flatten_state_dict=False),
            )

    class SafeLoad(TorchDistLoadShardedStrategy):
        def load(self, sharded_state_dict, checkpoint_dir):
            with safe_readers():
                return super().load(sharded_state_dict, checkpoint_dir)

    return InProcessSave(BACKEND, BACKEND_VERSION), SafeLoad()


def verify_dir(directory: str | Path) -> None:
    """Check a DCP directory's files against its tag's MANIFEST.json before anything reads them
    (ChecksumError naming the file and, for a data file, the damaged tensor). Free after the trainer's
    collective `verify` of the whole tag (the digests are remembered)."""
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
    err = None
    try:  # agreed on: a rank that cannot read must not leave the others waiting in DCP
        verify_dir(directory)
        stored = stored_keys(directory)
        missing = sorted({st.key for st in tensors.values() if st.key not in stored})
        if missing:
            raise CheckpointFormatError(
                f"{directory}: holds no tensor {missing[0]!r} ({len(missing)} missing; another model config?)"
            )
    except Exception as e:  # noqa: BLE001
        err = e
    agree(err, f"reading {directory}")
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        return _strategies()[1].load(tensors, Path(directory))
    except CheckpointingException as err:
        raise CheckpointFormatError(f"{directory}: {err}") from None
    except CheckpointException as err:  # raised on every rank; BaseException, not Exception
        r, exc = failing_rank(err)
        raise CheckpointFormatError(
            f"{directory}: reading failed on rank {r} ({type(exc).__name__}: {exc}); corrupt or truncated?"
        ) from None


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
        _KEYS[d] = {
            k: (tuple(v.size), str(v.properties.dtype).replace("torch.", ""))
            for k, v in md.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata)
        }
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

    reader = safe_reader_class()(str(directory))
    try:
        dcp.load(out, storage_reader=reader, no_dist=True)
    except CheckpointException as err:
        _, exc = failing_rank(err)
        if isinstance(exc, CheckpointFormatError):
            raise exc from None
        raise CheckpointFormatError(
            f"{directory}: unreadable ({type(exc).__name__}: {exc}); corrupt or truncated?"
        ) from None
    return out
