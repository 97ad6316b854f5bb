"""The one way a benchmark script ends: its JSON on stdout, and in `--out` when given (written
atomically: an interrupted run leaves the previous result file whole)."""

from __future__ import annotations

import json

from jigsaw_ext.files import atomic_write_text


def emit_json(doc: dict, out: str | None) -> int:
    """Print `doc` and write it to `out` (if any); the script's exit status (0)."""
    text = json.dumps(doc, indent=1)
    print(text)
    if out:
        atomic_write_text(out, text + "\n")
    return 0
