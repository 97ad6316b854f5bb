"""The gloo collectives the layers issue on CPU: gloo's own all-gather / reduce-scatter / all-reduce
against jigsaw_ext.collectives' ring over point-to-point sends, side by side in one run.

    python benchmarks/bench_collectives.py [--worlds 2,3] [--mb 1,4,8] [--reps 20] [--out F.json]

One process per rank (1 thread each), forked by jigsaw_ext.testing.run_workers. For each buffer size
(the all-gather's input shard, the reduce-scatter's and all-reduce's whole input, in MB of fp32)
every variant is timed over --reps calls after 3 warm-up calls, the variants alternated in one run:
wall ms per call on rank 0 and the process CPU ms per call (all its threads: gloo's I/O included,
the figure that matters on a machine with no spare core). The layers use the ring on gloo groups and
the backend's collectives elsewhere (NCCL); the all-reduce stays gloo's (the ring is slower there).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from jigsaw_ext.files import emit_json, make_output_folders  # noqa: E402
from jigsaw_ext.testing import run_workers  # noqa: E402


def _time(rank, world, sizes_mb, reps):
    import resource
    import time

    import torch
    import torch.distributed as dist

    from jigsaw_ext import collectives as C

    def cpu():
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    out = {}
    for mb in sizes_mb:
        n = int(mb * 2**20) // 4 // world * world
        x, shard = torch.randn(n), torch.randn(n // world)
        gathered, scattered = torch.empty(n), torch.empty(n // world)
        variants = {
            "all_gather_gloo": lambda n=n, x=x: C._native_all_gather(torch.empty(n * world), x),
            "all_gather_ring": lambda n=n, x=x: C._all_gather_single(torch.empty(n * world), x),
            "reduce_scatter_gloo": lambda scattered=scattered, x=x: C._native_reduce_scatter(scattered, x),
            "reduce_scatter_ring": lambda scattered=scattered, x=x: C._reduce_scatter_single(scattered, x),
            "all_reduce_gloo": lambda x=x: dist.all_reduce(x),
        }
        del shard, gathered
        row = {}
        for name, fn in variants.items():
            for _ in range(3):
                fn()
            dist.barrier()
            c0, t0 = cpu(), time.perf_counter()
            for _ in range(reps):
                fn()
            wall, used = (time.perf_counter() - t0) / reps, (cpu() - c0) / reps
            row[name] = {"wall_ms": round(wall * 1e3, 3), "cpu_ms": round(used * 1e3, 3)}
        out[f"{mb:g}MB"] = row
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--worlds", default="2,3")
    ap.add_argument("--mb", default="1,4,8")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    make_output_folders(ap, {"--out": args.out})
    sizes = [float(s) for s in args.mb.split(",")]
    doc = {
        "benchmark": "gloo collectives vs the ring over point-to-point sends (jigsaw_ext.collectives)",
        "threads_per_rank": 1,
        "reps": args.reps,
        "by_world": {},
    }
    for world in (int(w) for w in args.worlds.split(",")):
        res = run_workers(_time, world, sizes, args.reps, threads=1, timeout=600)[0]
        for row in res.values():
            for kind in ("all_gather", "reduce_scatter"):
                row[f"{kind}_ring_over_gloo_wall"] = round(
                    row[f"{kind}_ring"]["wall_ms"] / row[f"{kind}_gloo"]["wall_ms"], 3
                )
        doc["by_world"][str(world)] = res
        print(f"[collectives] world {world} done", file=sys.stderr, flush=True)
    return emit_json(doc, args.out)


if __name__ == "__main__":
    sys.exit(main())
