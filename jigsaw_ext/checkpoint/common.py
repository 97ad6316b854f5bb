"""What every checkpoint reader here shares: the formats, finding the directory a path designates,
reading a consolidated index, and agreeing on a failure across ranks."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import CheckpointFormatError, RankFailure

FORMAT = "jigsaw-consolidated/2"
OLD_FORMATS = ("jigsaw-consolidated/1",)
# job.json keys with a meaning to this package; every other key belongs to the application that
# wrote the checkpoint and is carried along unread (consolidated: index.json "app")
JIGSAW_KEYS = (
    "mesh",
    "zero_stage",
    "world_size",
    "dtype",
    "layouts",
    "param_groups",
    "deepspeed",
    "step",
    "tag",
    "state",
    "client_state",
)
KINDS = ("param", "exp_avg", "exp_avg_sq")
# small JSON files an application keeps in the checkpoint root beside the tags (weathermixer: the
# forecast's re-encoding default, weathermixer.train.validation.FORECAST_DEFAULTS): `consolidate`
# copies them into the consolidated directory, where the application's readers look too
ROOT_SIDE_FILES = ("forecast_defaults.json",)


def agree(err: BaseException | None, what: str, value: int = 0, own: bool = True) -> int:
    """Collective over the world: if any rank passed an error, every rank raises (the failing rank its
    own exception if `own`, else RankFailure like the others, naming the rank and its message); else
    the largest `value` of all ranks. Also a barrier."""
    import torch
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        if err is not None:
            if own:
                raise err
            raise RankFailure(what, {0: err}) from err
        return value
    t = torch.tensor([int(err is not None), value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if not t[0]:
        return int(t[1])
    msgs: list[tuple[str, str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(msgs, None if err is None else (type(err).__name__, str(err)))
    if err is not None and own:
        raise err
    raise RankFailure(what, {r: _remote(*m) for r, m in enumerate(msgs) if m}) from err


def _remote(kind: str, message: str) -> Exception:
    """Another rank's exception as one of this process: a RuntimeError named like the original."""
    return type(kind, (RuntimeError,), {"__module__": "remote"})(message)


def resolve(path: str | Path) -> Path:
    """The tag directory (or consolidated directory) that `path` designates."""
    path = Path(path)
    if not path.exists():
        raise CheckpointFormatError(f"{path}: no such checkpoint")
    if (path / "index.json").is_file() or (path / "job.json").is_file():
        return path
    if (path / "latest").is_file():
        return resolve(path / read_pointer(path / "latest"))
    raise CheckpointFormatError(
        f"{path}: neither a checkpoint tag directory (job.json), a checkpoint root "
        f"(latest) nor a consolidated checkpoint (index.json)"
    )


def read_pointer(path: Path) -> str:
    """The tag a pointer file (`latest`, `best`) names: a directory name in the pointer's own folder,
    never a path that leads elsewhere (`../other_run/...`, an absolute path)."""
    try:
        tag = Path(path).read_text().strip()
    except UnicodeDecodeError:
        raise CheckpointFormatError(f"{path}: not a text file naming a tag (damaged?)") from None
    if not tag or "/" in tag or "\\" in tag or tag in (".", "..") or "\0" in tag:
        raise CheckpointFormatError(
            f"{path}: names {tag!r}, not a tag directory inside {Path(path).parent}; "
            f"a pointer holds a tag name only (edit it to one of the tags there)"
        )
    return tag


def is_consolidated(path: Path) -> bool:
    return (path / "index.json").is_file()


def is_layout_free(path: Path) -> bool:
    """A tag written by this version: its tensors under state/ (see layout_free.py)."""
    return (path / "state").is_dir() and (path / "job.json").is_file()


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointFormatError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointFormatError(f"{path}: corrupt JSON ({type(err).__name__}: {err})") from None


def read_index(path: Path) -> dict:
    """index.json of a consolidated checkpoint, of the current format (older ones: how to convert)."""
    idx = read_json(path / "index.json")
    fmt = idx.get("format") if isinstance(idx, dict) else None
    if fmt in OLD_FORMATS:
        src = (idx.get("source") or {}).get("path", "the original DeepSpeed checkpoint")
        raise CheckpointFormatError(
            f"{path / 'index.json'}: format {fmt!r} keeps its tensors as torch pickles, which are not loaded "
            f"(unpickling can run code); convert it by re-running `python -m jigsaw_ext.checkpoint consolidate "
            f"{src} NEW_DIR` on the original DeepSpeed checkpoint (format {FORMAT!r}, safetensors)"
        )
    if fmt != FORMAT:
        raise CheckpointFormatError(f"{path / 'index.json'}: format {fmt!r}, expected {FORMAT!r}")
    return idx


def app_keys(info: dict) -> dict:
    """What the application wrote into job.json beyond the keys this package reads."""
    return {k: v for k, v in info.items() if k not in JIGSAW_KEYS}
