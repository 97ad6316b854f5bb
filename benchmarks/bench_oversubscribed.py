"""What a collective costs when a node runs more ranks than it has cores: the CPU profile's
`oversubscribed_call_s`, measured apart from train.py.

    python benchmarks/bench_oversubscribed.py [--cores 2] [--reps 7] [--iters 60] [--out F.json]

Each rank (1 thread) loops over the pattern the layers run: a matmul, a ring all-gather, a matmul,
a ring reduce-scatter (jigsaw_ext.collectives on gloo), over a grid of matmul sizes (0.3-2 ms each)
and buffer sizes (the all-gather's shard). Five runs per grid point, alternated:
- `cores` ranks in pairs: as many ranks as cores; also with the matmuls alone and the collectives
  alone (`cores_interleaving_call_s`: what the loop costs beyond its parts, per call; not priced);
- 2 x `cores` ranks as independent pairs (`replicas`): the data-parallel replicas of a dp x 2 x 1 mesh,
  whose model collectives never meet;
- 2 x `cores` ranks coupled on two axes (`one_group`): one 2 x 2 model group, the collectives
  alternating between its tp pairs and its domain pairs.
With twice the ranks on the cores the planner prices every rank's work and every copy at twice its
time; what a rank loses beyond that while its peers are descheduled mid-collective is the penalty
per collective call: (seconds per loop at 2 x cores - 2 x seconds per loop at cores) / calls per loop.
The medians over the grid are the profile's figures.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from jigsaw_ext.files import emit_json, make_output_folders  # noqa: E402
from jigsaw_ext.testing import run_workers  # noqa: E402

CALLS_PER_LOOP = 2  # an all-gather and a reduce-scatter
PARTS = ("matmuls", "collectives")


def _loop(rank, world, pairs, matmul_n, shard_mb, iters, parts=PARTS):
    """Seconds per loop on this rank. pairs: the rank groups of each axis (one or two axes); parts:
    what the loop runs (both, or one of them alone)."""
    import torch
    import torch.distributed as dist

    from jigsaw_ext import collectives as C

    mine = []
    for axis in pairs:
        groups = [dist.new_group(g) for g in axis]  # every rank creates every group, in order
        mine += [grp for grp, g in zip(groups, axis, strict=True) if rank in g]
    a, b = torch.randn(matmul_n, matmul_n), torch.randn(matmul_n, matmul_n)
    n = int(shard_mb * 2**20) // 4
    shard, full = torch.randn(n), torch.empty(2 * n)

    def once(i):
        if "matmuls" in parts:
            torch.mm(a, b)
        if "collectives" in parts:
            C._all_gather_single(full, shard, group=mine[(2 * i) % len(mine)])
        if "matmuls" in parts:
            torch.mm(a, b)
        if "collectives" in parts:
            C._reduce_scatter_single(shard, full, group=mine[(2 * i + 1) % len(mine)])

    for i in range(4):
        once(i)
    dist.barrier()
    t0 = time.perf_counter()
    for i in range(iters):
        once(i)
    elapsed = time.perf_counter() - t0
    dist.barrier()
    return elapsed / iters


def layouts(cores: int) -> dict[str, list[list[list[int]]]]:
    """Rank pairs per axis for each run."""
    n = 2 * cores
    return {
        "cores": [[[r, r + 1] for r in range(0, cores, 2)]],
        "cores_matmuls_alone": [[[r, r + 1] for r in range(0, cores, 2)]],
        "cores_collectives_alone": [[[r, r + 1] for r in range(0, cores, 2)]],
        "replicas": [[[r, r + 1] for r in range(0, n, 2)]],
        # two axes: (r, r+1) pairs and (r, r+2) pairs inside each block of 4 ranks
        "one_group": [
            [[r, r + 1] for r in range(0, n, 2)],
            [[b + i, b + i + 2] for b in range(0, n, 4) for i in range(2)],
        ],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--cores", type=int, default=2, help="cores of this machine (even)")
    ap.add_argument("--matmul-n", default="256,384,512")
    ap.add_argument("--shard-mb", default="0.05,0.3")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    make_output_folders(ap, {"--out": args.out})
    if args.cores < 2 or args.cores % 2:
        ap.error(f"--cores {args.cores}: an even number >= 2")
    runs = layouts(args.cores)
    points = []
    for n in (int(x) for x in args.matmul_n.split(",")):
        for mb in (float(x) for x in args.shard_mb.split(",")):
            seconds: dict[str, list[float]] = {k: [] for k in runs}
            for _ in range(args.reps):
                for name, pairs in runs.items():  # alternated: drifts of the machine hit all three
                    world = args.cores if name.startswith("cores") else 2 * args.cores
                    parts = {"cores_matmuls_alone": ("matmuls",), "cores_collectives_alone": ("collectives",)}
                    timed = run_workers(_loop, world, pairs, n, mb, args.iters, parts.get(name, PARTS), timeout=300)
                    seconds[name].append(max(timed))
            ms = {k: statistics.median(v) * 1e3 for k, v in seconds.items()}
            row = {
                "matmul_n": n,
                "shard_mb": mb,
                "ms_per_loop": {k: round(v, 3) for k, v in ms.items()},
                "penalty_ms_per_call": {
                    k: round((ms[k] - 2 * ms["cores"]) / CALLS_PER_LOOP, 3) for k in ("replicas", "one_group")
                },
                # as many ranks as cores: the loop against its matmuls and its collectives timed apart
                "cores_interleaving_ms_per_call": round(
                    (ms["cores"] - ms["cores_matmuls_alone"] - ms["cores_collectives_alone"]) / CALLS_PER_LOOP, 3
                ),
            }
            points.append(row)
            print(f"[oversubscribed] n={n} shard={mb} MB: {row['penalty_ms_per_call']}", file=sys.stderr, flush=True)
    medians = {
        k: round(statistics.median(p["penalty_ms_per_call"][k] for p in points) / 1e3, 6)
        for k in ("replicas", "one_group")
    }
    doc = {
        "benchmark": "penalty per collective call with 2 x cores ranks on the cores, beyond twice the time at "
        "cores ranks (ring all-gather and reduce-scatter on gloo between matmuls, 1 thread per rank)",
        "cores": args.cores,
        "reps": args.reps,
        "iters": args.iters,
        "date": time.strftime("%Y-%m-%d"),
        "layouts": runs,
        "points": points,
        "oversubscribed_call_s": medians,
        "cores_interleaving_call_s": round(
            statistics.median(p["cores_interleaving_ms_per_call"] for p in points) / 1e3, 6
        ),
    }
    return emit_json(doc, args.out)


if __name__ == "__main__":
    sys.exit(main())
