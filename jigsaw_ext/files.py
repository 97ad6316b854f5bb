"""Files that are either complete or absent: write to a temporary name, fsync, rename."""
from __future__ import annotations

import os
from pathlib import Path


def replace_synced(tmp: str | Path, path: str | Path) -> None:
    """fsync `tmp`, then rename it over `path` (atomic on POSIX)."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` so that a reader sees the old file or the whole new one, never part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    replace_synced(tmp, path)
    return path
