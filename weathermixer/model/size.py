"""Exact size of a WeatherMixer and each rank's share on a mesh, without allocating it.

    python -m weathermixer.size --preset jigsaw_3b --domain 2 --tp 4
    python -m weathermixer.size --config deepspeed_configs/quickstart_cpu.json   # on the job's mesh

The model is built on the meta device once per rank of a model group (no memory, no processes).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from jigsaw_ext.mesh import Mesh, MeshConfig

from ..config import ConfigError, load_job
from .mixer import WeatherMixer, flops_per_sample, num_parameters
from .presets import PRESETS


def size_report(cfg, mesh_config: MeshConfig) -> dict:
    per_rank = []
    for rank in range(mesh_config.domain * mesh_config.tp):  # one model group; dp replicas are copies
        model = WeatherMixer(cfg, Mesh.virtual(mesh_config, rank), device="meta")
        per_rank.append(model.local_num_parameters())
    total = num_parameters(cfg)
    ideal = total / (mesh_config.domain * mesh_config.tp)
    return {
        "parameters": total,
        "forward_tflop_per_sample": flops_per_sample(cfg) / 1e12,
        "mesh": str(mesh_config),
        "per_rank_parameters": {"max": max(per_rank), "min": min(per_rank)},
        "max_share_vs_ideal": max(per_rank) / ideal,
        "per_rank_fp32_bytes_max": 4 * max(per_rank),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        allow_abbrev=False,
        prog="python -m weathermixer.size",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=sorted(PRESETS))
    src.add_argument("--config", help="job JSON file (its weathermixer.model section)")
    ap.add_argument("--dp", type=int, help="default: the job's mesh.dp with --config, else 1")
    ap.add_argument("--domain", type=int, help="default: the job's mesh.domain with --config, else 1")
    ap.add_argument("--tp", type=int, help="default: the job's mesh.tp with --config, else 1")
    args = ap.parse_args(argv)
    try:
        job = load_job(args.config) if args.config else None
        cfg = job.model if job else PRESETS[args.preset]
        base = job.mesh if job else MeshConfig()
        given = {k: getattr(args, k) for k in ("dp", "domain", "tp") if getattr(args, k) is not None}
        report = size_report(cfg, MeshConfig(**{**base.model_dump(), **given}))
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    with torch.no_grad():
        sys.exit(main())
