"""Reading DCP's `.metadata` without running code.

DCP keeps its `.metadata` as a pickle. It is never unpickled freely: `read_metadata` reads it
with `MetadataUnpickler`, which builds only the DCP metadata classes in METADATA_GLOBALS (and torch
dtypes); anything else is refused naming the file and the global. `safe_readers()` makes
megatron-core's DCP reader read the metadata this way.
"""

from __future__ import annotations

import contextlib
import pickle
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .errors import CheckpointFormatError, UnsafeMetadataError

if TYPE_CHECKING:
    from torch.distributed.checkpoint.metadata import Metadata

METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", n)
    for n in (
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "ChunkStorageMetadata",
        "BytesStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("collections", "OrderedDict"),
}


class MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata classes (METADATA_GLOBALS) and torch dtypes; refuses everything else."""

    path = "<stream>"

    def find_class(self, module: str, name: str):
        if (module, name) in METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeMetadataError(
            f"{self.path}: refused: the DCP metadata pickle asks for {module}.{name}, "
            f"outside the allowlist of DCP's metadata classes (jigsaw_ext.checkpoint.dcp_metadata); "
            f"it was not loaded and nothing in it ran"
        )

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
    _confine(md, path)
    return md


def _confine(md, path: Path) -> None:
    """Every data file the metadata points at is a plain file name inside its directory (DCP writes
    `__R_K.distcp`): an absolute path or `..` would make the loaders read outside the checkpoint while
    the checksums cover the files inside it."""
    for index, info in (getattr(md, "storage_data", None) or {}).items():
        rel = str(getattr(info, "relative_path", ""))
        if not rel or "/" in rel or "\\" in rel or rel in (".", "..") or Path(rel).is_absolute():
            fqn = getattr(index, "fqn", index)
            raise UnsafeMetadataError(
                f"{path}: refused: tensor {fqn} points at {rel!r}, outside the checkpoint "
                f"directory {path.parent} (DCP writes plain file names there); the "
                f"metadata was damaged or edited"
            )


def safe_reader_class():
    from megatron.core.dist_checkpointing.strategies.cached_metadata_filesystem_reader import (
        CachedMetadataFileSystemReader,
    )

    class SafeFileSystemReader(CachedMetadataFileSystemReader):
        """DCP's file reader with `.metadata` read through the allowlist."""

        _cached_metadata: Metadata | None  # (megatron sets it to None in __init__, unannotated)

        def read_metadata(self, *args, **kwargs):
            if self._cached_metadata is None:
                md = read_metadata(self.path)
                md.storage_meta.load_id = self.load_id
                self._cached_metadata = md
            return self._cached_metadata

    return SafeFileSystemReader


@contextlib.contextmanager
def safe_readers():
    """megatron-core's torch_dist load strategy builds its reader in one module-level function:
    point it at the safe reader while loading (megatron-core 0.16; pinned in pyproject.toml)."""
    from megatron.core.dist_checkpointing.strategies import torch as mstrat

    cls, saved = safe_reader_class(), mstrat._get_filesystem_reader
    mstrat._get_filesystem_reader = lambda checkpoint_dir, cache_metadata=False: cls(checkpoint_dir)
    try:
        yield
    finally:
        mstrat._get_filesystem_reader = saved
