"""The checkpoint folder: its names (tags, pointers, partial saves), where a run keeps it, durable
writes into it, and the file system that holds it. Names and files only: no process group, engine
or model.

    root/stepNNNNNNNN/          a tag (stepNNNNNNNN.K: the same step saved again)
    root/stepNNNNNNNN.partial/  a save in progress
    root/latest, root/best      pointers: the name of a complete tag
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from jigsaw_ext.files import atomic_write_text

POINTERS = ("latest", "best")
TAG = re.compile(r"step(\d{8})(?:\.(\d+))?")  # stepNNNNNNNN or stepNNNNNNNN.K (the same step saved again)
PARTIAL = ".partial"
STATE = "state"  # the layout-free tensors of a tag (jigsaw_ext.checkpoint.layout_free)


def durable_write_text(path: Path, text: str) -> None:
    """A complete file under `path` (atomic rename), the rename itself made durable."""
    atomic_write_text(path, text)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` durable (where the file system supports it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def tag_key(name: str) -> tuple[int, int] | None:
    """(step, k) of a tag name (stepNNNNNNNN -> k 0, stepNNNNNNNN.K -> K); None for anything else.
    Tags sort by it: by step, then the newer save of the same step."""
    m = TAG.fullmatch(name)
    return (int(m.group(1)), int(m.group(2) or 0)) if m else None


def filesystem(path: Path) -> str:
    """'<mount point> (<device>, <type>)' of the file system holding `path`."""
    p = Path(path).resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    try:
        mounts = [line.split()[:3] for line in Path("/proc/self/mounts").read_text().splitlines()]
    except OSError:
        mounts = []
    for dev, mnt, kind in reversed(mounts):  # the last mount on a point is the visible one
        if mnt.replace("\\040", " ") == str(p):
            return f"{p} ({dev}, {kind})"
    return str(p)


def trainer_state_base(tag_dir: Path, rank: int) -> Path:
    return Path(tag_dir) / f"trainer_rank{rank:05d}"


def tag_of(step: int) -> str:
    return f"step{step:08d}"


def checkpoint_root(job) -> Path:
    """The run's checkpoint folder: checkpoint.dir, else log.dir/checkpoints."""
    return Path(job.checkpoint.dir or Path(job.log.dir) / "checkpoints")
