"""python -m jigsaw_ext.checkpoint inspect | consolidate | reshard (see the package docstring)."""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from . import __doc__ as DOC
from .common import CheckpointFormatError, read_job_info, resolve
from .consolidated import consolidate, inspect, verify


def _reshard_callable(ckpt: str, override: str | None):
    """Rebuilding the target engine needs the application's model and trainer: the checkpoint names
    the function that does it (job.json "reshard_with", e.g. weathermixer.train.reshard:reshard)."""
    target = override or read_job_info(resolve(ckpt)).get("reshard_with")
    if not target or ":" not in target:
        raise CheckpointFormatError(f"{ckpt}: the checkpoint does not name what rebuilds its engine (job.json "
                                    f"'reshard_with'); pass --with MODULE:FUNCTION")
    module, func = target.split(":", 1)
    try:
        return getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError) as err:
        raise CheckpointFormatError(f"reshard_with={target!r}: cannot import it ({err})") from None


def _tags_to_verify(ckpt: str) -> list[tuple[Path, list[str]]]:
    """(directory, pointers naming it): every complete tag of a checkpoint root, else the one given."""
    root = Path(ckpt)
    if (root / "job.json").is_file() or (root / "index.json").is_file() or not (root / "latest").is_file():
        return [(resolve(root), [])]
    named: dict[str, list[str]] = {}
    for p in ("latest", "best"):
        if (root / p).is_file():
            named.setdefault((root / p).read_text().strip(), []).append(p)
    tags = sorted(d.name for d in root.iterdir() if d.is_dir() and (d / "COMPLETE").is_file())
    tags += sorted(t for t in named if t not in tags)  # a pointer to a tag that is not complete: reported
    return [(root / t, named.get(t, [])) for t in tags]


def _verify(ckpt: str, as_json: bool) -> int:
    """inspect --verify: 0 if every file checked is intact, 1 if any is damaged, missing or unlisted."""
    results = []
    for path, pointers in _tags_to_verify(ckpt):
        r = verify(path) if path.is_dir() else {"path": str(path), "verified": False, "files": 0,
                                                "problems": [f"{path}: missing"]}
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
    ap = argparse.ArgumentParser(prog="python -m jigsaw_ext.checkpoint", description=DOC,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("inspect", help="mesh, ZeRO stage, step, parameter count, per-tensor shapes")
    p.add_argument("ckpt")
    p.add_argument("--json", action="store_true")
    p.add_argument("--verify", action="store_true",
                   help="check every file against the checkpoint's checksums (a root: every complete tag); exit 1 "
                        "naming each damaged file")
    p = sub.add_parser("consolidate", help="write a single layout-free checkpoint")
    p.add_argument("ckpt")
    p.add_argument("out")
    p = sub.add_parser("reshard", help="write a DeepSpeed checkpoint for another mesh / ZeRO stage")
    p.add_argument("ckpt")
    p.add_argument("out")
    for axis in ("dp", "domain", "tp"):
        p.add_argument(f"--{axis}", type=int, default=1)
    p.add_argument("--zero-stage", type=int, default=None, help="default: the source's")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="train_micro_batch_size_per_gpu of the target (default: keep the global batch)")
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--with", dest="reshard_with", metavar="MODULE:FUNCTION",
                   help="what rebuilds the target engine (default: the checkpoint's reshard_with)")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "inspect" and args.verify:
            return _verify(args.ckpt, args.json)
        if args.cmd == "inspect":
            r = inspect(args.ckpt)
            if args.json:
                print(json.dumps(r, indent=1))
            else:
                m = r["mesh"]
                print(f"{r['path']} ({r['kind']}): mesh {m['dp']}x{m['domain']}x{m['tp']} (dp x domain x tp), "
                      f"ZeRO-{r['zero_stage']}, {r['dtype']}, step {r['step']}, {r['parameters']:,} parameters")
                for k, t in r["tensors"].items():
                    print(f"  {k:48s} {str(tuple(t['shape'])):18s} split {t['split']}")
        elif args.cmd == "consolidate":
            out = consolidate(args.ckpt, args.out, log=lambda s: print(s, file=sys.stderr))
            print(out)
        else:
            reshard = _reshard_callable(args.ckpt, args.reshard_with)
            out = reshard(args.ckpt, args.out, dp=args.dp, domain=args.domain, tp=args.tp,
                          zero_stage=args.zero_stage, micro_batch=args.micro_batch, timeout=args.timeout)
            print(out)
    except (CheckpointFormatError, ValueError) as err:
        print(f"jigsaw_ext.checkpoint: {err}", file=sys.stderr)
        return 2
    return 0
