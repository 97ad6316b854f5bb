"""Files that are either complete or absent: write to a temporary name, fsync, rename."""

from __future__ import annotations

import json
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


def make_output_folders(parser, outputs: dict) -> None:
    """Create the folder of every output path in `outputs` ({option as the user types it: path or None})
    before a CLI does any work, so a result is never lost at the end for a missing folder. A folder that
    cannot be made stops the CLI through `parser.error` (exit 2), naming the option and the folder."""
    for option, value in outputs.items():
        if value is None:
            continue
        folder = Path(value).expanduser().absolute().parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            why = "a file is in the way" if isinstance(err, (FileExistsError, NotADirectoryError)) else err.strerror
            parser.error(f"{option} {value}: cannot create its folder {folder} ({why or err})")


def emit_json(doc: dict, out: str | Path | None) -> int:
    """How a benchmark or tool ends: `doc` as JSON on stdout and, when `out` is given, in that file
    (written atomically: an interrupted run leaves the previous file whole). Returns 0, the exit status."""
    text = json.dumps(doc, indent=1)
    print(text)
    if out:
        atomic_write_text(out, text + "\n")
    return 0
