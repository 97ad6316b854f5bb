"""The checkpoint tools on the command line.

    python -m jigsaw_ext.checkpoint inspect CKPT               layout, step, sizes, versions, per-tensor shapes
    python -m jigsaw_ext.checkpoint inspect --verify CKPT      every file against its checksum; exit 1 naming
                                                               the bad ones
    python -m jigsaw_ext.checkpoint export CKPT OUT.safetensors [--max-shard-gb G] [--dtype bfloat16]
    python -m jigsaw_ext.checkpoint consolidate CKPT OUT       one directory of safetensors (weights + moments);
                                                               the converter of the DeepSpeed 0.19 per-rank format

CKPT is a checkpoint tag directory (`<run>/checkpoints/step00000100`), a checkpoint root (its
`latest` pointer is followed) or a consolidated directory.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..files import make_output_folders
from .common import read_pointer, resolve
from .consolidated import consolidate, inspect, verify
from .errors import CheckpointFormatError
from .export import export

RESHARD_GONE = (
    "`reshard` is gone: a checkpoint of this version is layout-free and resumes on any mesh, ZeRO "
    "stage and dp directly (train.py --resume CKPT with the new --dp/--domain/--tp). A checkpoint of the "
    "DeepSpeed 0.19 per-rank format: `consolidate` it once, then --resume the result on any mesh"
)


def _tags_to_verify(ckpt: str) -> list[tuple[Path, list[str]]]:
    """(directory, pointers naming it): every complete tag of a checkpoint root, else the one given."""
    root = Path(ckpt)
    if (root / "job.json").is_file() or (root / "index.json").is_file() or not (root / "latest").is_file():
        return [(resolve(root), [])]
    named: dict[str, list[str]] = {}
    for p in ("latest", "best"):
        if (root / p).is_file():
            named.setdefault(read_pointer(root / p), []).append(p)
    tags = sorted(d.name for d in root.iterdir() if d.is_dir() and (d / "COMPLETE").is_file())
    tags += sorted(t for t in named if t not in tags)  # a pointer to a tag that is not complete: reported
    return [(root / t, named.get(t, [])) for t in tags]


def _verify(ckpt: str, as_json: bool) -> int:
    """inspect --verify: 0 if every file checked is intact, 1 if any is damaged, missing or unlisted."""
    results = []
    for path, pointers in _tags_to_verify(ckpt):
        r: dict = (
            verify(path)
            if path.is_dir()
            else {"path": str(path), "verified": False, "files": 0, "problems": [f"{path}: missing"]}
        )
        results.append(dict(r, pointers=pointers))
        if as_json:
            continue
        named = f" ({', '.join(pointers)})" if pointers else ""
        if r["problems"]:
            print(f"DAMAGED {r['path']}{named}:")
            for line in r["problems"]:
                print(f"  {line}")
        elif r["verified"]:
            print(f"ok {r['path']}{named}: {r['files']} files match their {r['algorithm']} checksums")
        else:
            print(f"UNVERIFIED {r['path']}{named}: no checksums (written before they existed); not checked")
    if as_json:
        print(json.dumps(results, indent=1))
    return 1 if any(r["problems"] for r in results) else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        allow_abbrev=False,
        prog="python -m jigsaw_ext.checkpoint",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("inspect", allow_abbrev=False, help="mesh, ZeRO stage, step, parameter count, per-tensor shapes")
    p.add_argument("ckpt")
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--verify",
        action="store_true",
        help="check every file against the checkpoint's checksums (a root: every complete tag); exit 1 "
        "naming each damaged file",
    )
    p = sub.add_parser(
        "export", allow_abbrev=False, help="weights only: one safetensors file, or a sharded set (--max-shard-gb)"
    )
    p.add_argument("ckpt")
    p.add_argument("out", help="a .safetensors file, or a new directory with --max-shard-gb")
    p.add_argument("--max-shard-gb", type=float, default=None, help="write shards of at most this size")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p = sub.add_parser(
        "consolidate", allow_abbrev=False, help="convert a checkpoint of the DeepSpeed 0.19 per-rank format"
    )
    p.add_argument("ckpt")
    p.add_argument("out")
    p = sub.add_parser(
        "reshard", allow_abbrev=False, help="(gone: layout-free checkpoints resume on any mesh directly)"
    )
    p.add_argument("rest", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    make_output_folders(ap, {"out": getattr(args, "out", None)})
    try:
        if args.cmd == "inspect" and args.verify:
            return _verify(args.ckpt, args.json)
        if args.cmd == "inspect":
            r = inspect(args.ckpt)
            if args.json:
                print(json.dumps(r, indent=1))
            else:
                _print_inspect(r)
        elif args.cmd == "export":
            shard = None if args.max_shard_gb is None else int(args.max_shard_gb * 2**30)
            print(export(args.ckpt, args.out, max_shard_bytes=shard, dtype=args.dtype))
        elif args.cmd == "consolidate":
            out = consolidate(args.ckpt, args.out, log=lambda s: print(s, file=sys.stderr))
            print(out)
        else:
            raise CheckpointFormatError(RESHARD_GONE)
    except (CheckpointFormatError, ValueError) as err:
        print(f"jigsaw_ext.checkpoint: {err}", file=sys.stderr)
        return 2
    return 0


def _print_inspect(r: dict) -> None:
    m, v = r["mesh"], r.get("versions") or {}
    print(
        f"{r['path']} ({r['kind']}): written on mesh {m['dp']}x{m['domain']}x{m['tp']} (dp x domain x tp), "
        f"ZeRO-{r['zero_stage']}, {r['dtype']}, step {r['step']}, {r['parameters']:,} parameters"
    )
    print(
        f"  {r['bytes_on_disk']:,} bytes in {r['files']} files; largest tensor {r['largest_tensor_bytes']:,} bytes "
        f"(fp32); {r['batches']} batch(es); optimizer step {r['optimizer_step']}"
    )
    if v:
        print(
            "  written with "
            + ", ".join(f"{k} {v[k]}" for k in ("torch", "deepspeed", "megatron-core") if k in v)
            + (f", commit {r['git_commit'][:12]}" if r.get("git_commit") else "")
        )
    for k, t in r["tensors"].items():
        print(f"  {k:48s} {str(tuple(t['shape'])):18s} split {t['split']}")
