"""Checksums of every file a checkpoint holds, checked on every read.

    TAG/MANIFEST.json   {"format": "jigsaw-manifest/1", "algorithm": "sha256",
                         "files": {"<path relative to TAG>": {"size": bytes, "sha256": hex}, ...}}
    OUT/index.json      (consolidated) tensors[name]["digests"][kind] = {"size": .., "sha256": ..}

A DeepSpeed tag's manifest lists every file the save wrote (DeepSpeed's shards, the trainer state
files, job.json); it is written after every rank has written and before COMPLETE. sha256: hashlib's is
hardware-accelerated (SHA-NI, ARMv8 SHA2) and `sha256sum` checks a file by hand.

Reading: a file is hashed once, streaming, before it is handed to its loader, not while the loader
reads it: torch.load memory-maps and seeks (no single sequential pass to hash), and damaged bytes
then never reach a parser. A process remembers the digest of a file by (path, inode, size, mtime),
so a file read twice is hashed once. A mismatch raises ChecksumError naming the file (for a torch
zip file also the damaged record and the tensor(s) stored in it: torch writes a CRC-32 per record)
and nothing is loaded.

Absent checksums are never taken as "unchecked": a layout-free tag (jigsaw-layout-free/1: `state/`
holds its tensors) was always written with its MANIFEST.json, and a consolidated checkpoint's
index.json (jigsaw-consolidated/2) lists the digests of its tensor files, so a tag without a manifest
or an index without digests is refused (ChecksumError), not read unverified: deleting the checksums
cannot downgrade a damaged checkpoint to an accepted one. Only a tag of the per-rank DeepSpeed format
(mp_rank_* / zero_pp_rank_* files, the converter's input; DeepSpeed writes no manifest) is read
without one, with an UnverifiedCheckpointWarning, once per directory. The manifest lists every file
(DCP's `.metadata` included): a file removed, renamed or added is named by `verify_tree`, which also
reads each DCP `.metadata` to check that the files it points at lie inside the tag
(dcp_metadata.read_metadata).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

from ..files import atomic_write_text
from .common import read_index
from .damage import damage
from .dcp_metadata import read_metadata
from .errors import CheckpointFormatError, ChecksumError, UnverifiedCheckpointWarning

MANIFEST = "MANIFEST.json"
MANIFEST_FORMAT = "jigsaw-manifest/1"
ALGORITHM = "sha256"
UNLISTED = ("COMPLETE", MANIFEST)  # the only files of a tag the manifest does not list

_DIGESTS: dict[tuple, str] = {}  # insertion-ordered: the oldest entries are dropped first
_DIGESTS_KEPT = 4096
_WARNED: set[str] = set()


def requires_manifest(tag: Path) -> bool:
    """A layout-free tag (its tensors under state/): it was written with a MANIFEST.json."""
    return (Path(tag) / "state").is_dir()


def _no_manifest(tag: Path) -> ChecksumError:
    return ChecksumError(
        f"{Path(tag) / MANIFEST}: missing; a layout-free checkpoint is always written with it (and "
        f"COMPLETE after it), so the tag was damaged or edited after it was written and its files "
        f"cannot be verified; refusing it (resume from another checkpoint; `python -m "
        f"jigsaw_ext.checkpoint inspect --verify ROOT` checks every tag)"
    )


def _key(path: Path) -> tuple:
    st = os.stat(path)
    return str(Path(path).resolve()), st.st_ino, st.st_size, st.st_mtime_ns


def file_digest(path: str | Path) -> str:
    """sha256 of the file (hex), streaming; cached per (path, inode, size, mtime) in this process."""
    key = _key(Path(path))
    if key not in _DIGESTS:
        with open(path, "rb") as f:
            _DIGESTS[key] = hashlib.file_digest(f, ALGORITHM).hexdigest()
        while len(_DIGESTS) > _DIGESTS_KEPT:  # a long run saves thousands of files: keep the newest
            del _DIGESTS[next(iter(_DIGESTS))]
    return _DIGESTS[key]


def describe(path: str | Path) -> dict:
    """The manifest entry of a file: size and digest."""
    return {"size": os.path.getsize(path), ALGORITHM: file_digest(path)}


def list_files(directory: str | Path) -> list[str]:
    """Every file under `directory` a manifest lists (relative POSIX paths, sorted)."""
    d = Path(directory)
    return sorted(
        p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file() and p.relative_to(d).as_posix() not in UNLISTED
    )


def write_manifest(directory: str | Path, files: dict) -> Path:
    """MANIFEST.json of `directory` (written to a temporary name, fsynced, renamed)."""
    doc = {"format": MANIFEST_FORMAT, "algorithm": ALGORITHM, "files": dict(sorted(files.items()))}
    return atomic_write_text(Path(directory) / MANIFEST, json.dumps(doc, indent=1))


def read_manifest(directory: str | Path) -> dict | None:
    """{relative path: entry} of a tag's MANIFEST.json; None if there is none (an older checkpoint)."""
    path = Path(directory) / MANIFEST
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ChecksumError(
            f"{path}: corrupt ({type(err).__name__}: {err}); the checkpoint cannot be verified"
        ) from None
    if (
        not isinstance(doc, dict)
        or doc.get("format") != MANIFEST_FORMAT
        or doc.get("algorithm") != ALGORITHM
        or not isinstance(doc.get("files"), dict)
    ):
        raise ChecksumError(f"{path}: not a {MANIFEST_FORMAT} manifest with {ALGORITHM} digests")
    return doc["files"]


def warn_unverified(directory: str | Path, quiet: bool = False) -> None:
    """Once per directory and process: its files are read without checksums."""
    d = str(Path(directory).resolve())
    if d in _WARNED:
        return
    _WARNED.add(d)
    if not quiet:
        warnings.warn(
            f"{directory}: no checksums ({MANIFEST} / index.json digests; written before they existed): "
            f"its files are loaded UNVERIFIED",
            UnverifiedCheckpointWarning,
            stacklevel=3,
        )


def check(path: Path, entry: dict, source: str, what: str = "") -> None:
    """Raise ChecksumError naming `path` (and `what` it holds) unless it matches its manifest entry."""
    label = f"{path}" + (f" ({what})" if what else "")
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise ChecksumError(f"{label}: missing, but {source} lists it (the checkpoint is incomplete)") from None
    want = entry.get("size")
    if size != want:
        kind = "truncated" if isinstance(want, int) and size < want else "longer than written"
        raise ChecksumError(f"{label}: {kind}: {size} bytes, {source} records {want}; refusing to load it")
    got = file_digest(path)
    if got != entry.get(ALGORITHM):
        raise ChecksumError(
            f"{label}: checksum mismatch ({ALGORITHM} {got[:16]}..., {source} records "
            f"{str(entry.get(ALGORITHM))[:16]}...): its bytes changed after it was written (bit flips: a "
            f"bad disk, memory or copy){damage(path)}; refusing to load it"
        )


def _tag_dir(path: Path) -> Path | None:
    """The checkpoint directory holding `path`: the nearest parent with a MANIFEST.json, COMPLETE,
    job.json or a layout-free state/ folder."""
    for d in list(path.parents)[:4]:
        if (d / MANIFEST).is_file() or (d / "COMPLETE").is_file() or (d / "job.json").is_file() or requires_manifest(d):
            return d
    return None


def verify_file(path: str | Path) -> bool:
    """Check a file of a DeepSpeed tag against the tag's manifest before it is loaded. True if
    verified; False (with a warning) for a per-rank DeepSpeed tag without a manifest. ChecksumError
    otherwise (a layout-free tag without its manifest too)."""
    path = Path(path)
    tag = _tag_dir(path)
    files = read_manifest(tag) if tag is not None else None
    if tag is None or files is None:
        if tag is not None and requires_manifest(tag):
            raise _no_manifest(tag)
        warn_unverified(tag or path.parent)
        return False
    rel = path.relative_to(tag).as_posix()
    if rel not in files:
        raise ChecksumError(
            f"{path}: not listed in {tag / MANIFEST} (not written by the save that made this "
            f"checkpoint); refusing to load it"
        )
    check(path, files[rel], str(tag / MANIFEST))
    return True


def expected(directory: str | Path) -> tuple[dict, dict, str] | None:
    """({relative path: entry}, {relative path: what it holds}, where they are recorded) of a tag or a
    consolidated checkpoint; None for a per-rank DeepSpeed tag without a manifest. ChecksumError for
    a layout-free tag without its manifest and a consolidated index without a tensor's digests."""
    d = Path(directory)
    if (d / "index.json").is_file():
        files, what = {}, {}
        for name, t in read_index(d)["tensors"].items():
            digests = t.get("digests")
            for kind, rel in t["files"].items():
                if not isinstance(digests, dict) or not isinstance(digests.get(kind), dict):
                    raise missing_digest(d, name, kind)
                files[rel], what[rel] = digests[kind], f"tensor {name}, {kind}"
        return files, what, str(d / "index.json")
    listed = read_manifest(d)
    if listed is None and requires_manifest(d):
        raise _no_manifest(d)
    return None if listed is None else (listed, {}, str(d / MANIFEST))


def missing_digest(directory: Path, name: str, kind: str) -> ChecksumError:
    return ChecksumError(
        f"{Path(directory) / 'index.json'}: lists no checksum for tensor {name} ({kind}); "
        f"`consolidate` records one for every tensor file, so the index was damaged or edited "
        f"and the files cannot be verified; refusing it (re-run `python -m jigsaw_ext.checkpoint "
        f"consolidate` on the original checkpoint)"
    )


def verify_tree(directory: str | Path, rank: int = 0, world: int = 1) -> list[str] | None:
    """Problems of a whole checkpoint (empty: intact), None if it has no checksums. Every rank checks
    presence and sizes of every file and files the manifest does not list; the digests are split:
    this rank hashes files i with i % world == rank."""
    d = Path(directory)
    got = expected(d)
    if got is None:
        return None
    files, what, source = got
    problems = []
    for i, (rel, entry) in enumerate(sorted(files.items())):
        path = d / rel
        try:
            if i % world == rank:
                check(path, entry, source, what.get(rel, ""))
            elif not path.is_file() or path.stat().st_size != entry.get("size"):
                check(path, {"size": entry.get("size")}, source, what.get(rel, ""))
        except ChecksumError as err:
            problems.append(str(err))
    problems += _metadata_problems(d, files, problems)
    if not (d / "index.json").is_file():
        extra = sorted(set(list_files(d)) - set(files))
        problems += [
            f"{d / rel}: not listed in {source} (not written by the save that made this checkpoint)" for rel in extra
        ]
    return problems


def _metadata_problems(d: Path, files: dict, found: list[str]) -> list[str]:
    """Every intact DCP `.metadata` of the checkpoint read (through the allowlist): the data files it
    points at must lie inside its directory (dcp_metadata.read_metadata refuses anything else)."""
    out = []
    for rel in sorted(files):
        if Path(rel).name != ".metadata" or any(str(d / rel) in p for p in found):
            continue
        try:
            read_metadata((d / rel).parent)
        except CheckpointFormatError as err:
            out.append(str(err))
    return out


def mark_verified(directory: str | Path) -> None:
    """Record the files of `directory` as verified (after every rank's share of verify_tree passed),
    so loading them does not hash them again in this process."""
    d = Path(directory)
    got = expected(d)
    for rel, entry in (got[0] if got else {}).items():
        try:
            key = _key(d / rel)
        except OSError:
            continue
        if key[2] == entry.get("size"):
            _DIGESTS[key] = entry[ALGORITHM]
