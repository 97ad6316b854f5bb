"""What a collective call costs on a CPU node beyond its work, with as many ranks as cores and with more:
the CPU profile's `call_wait_s`, measured apart from train.py.

    python benchmarks/bench_oversubscribed.py [--cores 2] [--reps 7] [--iters 60] [--layouts ...] [--out F.json]

Each rank (1 thread) loops over the pattern the layers run: a matmul, a ring all-gather, a matmul,
a ring reduce-scatter (jigsaw_ext.collectives on gloo), over a grid of matmul sizes (0.3-2 ms each)
and buffer sizes (the all-gather's shard). `--reps` runs per grid point and layout, alternated:
- `cores` ranks in pairs (as many ranks as cores), the loop as it is, its matmuls alone and its
  collectives alone (the parts), and the loop with each collective started before the matmul and
  waited for after it (`cores_async`, as the layers start their weight gathers);
- 2 x `cores` ranks as independent pairs (`replicas`): the data-parallel replicas of a dp x 2 x 1 mesh,
  whose model collectives never meet;
- 2 x `cores` ranks coupled on two axes (`one_group`): one 2 x 2 model group, the collectives
  alternating between its tp pairs and its domain pairs.
Per collective call, what the loop costs beyond its parts: `cores` = (loop - parts) / calls with as
many ranks as cores (a rank waiting in a collective sleeps and is woken when its peer's data arrives);
`replicas`, `one_group` = (loop - 2 x parts) / calls with twice as many (the planner prices every
rank's work and every copy at twice its time there; beyond that, a rank loses time while the peers
it waits for are descheduled). `cores_hidden_fraction`: (loop - async loop) / collectives alone.
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
PARTS_OF = {"cores_matmuls_alone": ("matmuls",), "cores_collectives_alone": ("collectives",), "cores_async": ("async",)}


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
        if "async" in parts:  # each collective started before a matmul, waited for after it
            work = C._all_gather_single(full, shard, group=mine[(2 * i) % len(mine)], async_op=True)
            torch.mm(a, b)
            work.wait()
            work = C._reduce_scatter_single(shard, full, group=mine[(2 * i + 1) % len(mine)], async_op=True)
            torch.mm(a, b)
            work.wait()
            return
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
        "cores_async": [[[r, r + 1] for r in range(0, cores, 2)]],
        "replicas": [[[r, r + 1] for r in range(0, n, 2)]],
        # two axes: (r, r+1) pairs and (r, r+2) pairs inside each block of 4 ranks
        "one_group": [
            [[r, r + 1] for r in range(0, n, 2)],
            [[b + i, b + i + 2] for b in range(0, n, 4) for i in range(2)],
        ],
    }


def derived(ms: dict[str, float]) -> dict:
    """The figures per grid point that the timed layouts allow (ms per loop by layout). Per collective
    call, beyond the loop's parts timed apart (its matmuls alone, its collectives alone, with as many
    ranks as cores): `cores`, the loop with as many ranks as cores; `replicas` and `one_group`, the loop
    with twice as many, beyond twice the parts (the planner prices every rank's work at twice its time
    there)."""
    row: dict = {}
    if {"cores_matmuls_alone", "cores_collectives_alone"} <= set(ms):
        parts = ms["cores_matmuls_alone"] + ms["cores_collectives_alone"]
        row["call_ms_beyond_parts"] = {
            k: round((ms[k] - (1 if k == "cores" else 2) * parts) / CALLS_PER_LOOP, 3)
            for k in ("cores", "replicas", "one_group")
            if k in ms
        }
    if {"cores", "cores_async", "cores_collectives_alone"} <= set(ms):
        # what starting each collective before a matmul hides, as a fraction of the collectives' time
        row["cores_hidden_fraction"] = round((ms["cores"] - ms["cores_async"]) / ms["cores_collectives_alone"], 3)
    return row


def _median(points: list[dict], key: str, sub: str | None = None, scale: float = 1.0):
    values = [p[key][sub] if sub else p[key] for p in points if key in p and (sub is None or sub in p[key])]
    return round(statistics.median(values) * scale, 6) if values else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--cores", type=int, default=2, help="cores of this machine (even)")
    ap.add_argument("--matmul-n", default="256,384,512")
    ap.add_argument("--shard-mb", default="0.05,0.3")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--layouts", nargs="+", help="time only these layouts (default: all)")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    make_output_folders(ap, {"--out": args.out})
    if args.cores < 2 or args.cores % 2:
        ap.error(f"--cores {args.cores}: an even number >= 2")
    runs = layouts(args.cores)
    unknown = set(args.layouts or ()) - set(runs)
    if unknown:
        ap.error(f"--layouts {' '.join(sorted(unknown))}: unknown; choose from {' '.join(runs)}")
    runs = {k: v for k, v in runs.items() if not args.layouts or k in args.layouts}
    points = []
    for n in (int(x) for x in args.matmul_n.split(",")):
        for mb in (float(x) for x in args.shard_mb.split(",")):
            seconds: dict[str, list[float]] = {k: [] for k in runs}
            for _ in range(args.reps):
                for name, pairs in runs.items():  # alternated: drifts of the machine hit all of them
                    world = args.cores if name.startswith("cores") else 2 * args.cores
                    timed = run_workers(_loop, world, pairs, n, mb, args.iters, PARTS_OF.get(name, PARTS), timeout=300)
                    seconds[name].append(max(timed))
            ms = {k: statistics.median(v) * 1e3 for k, v in seconds.items()}
            row = {"matmul_n": n, "shard_mb": mb, "ms_per_loop": {k: round(v, 3) for k, v in ms.items()}, **derived(ms)}
            points.append(row)
            print(f"[oversubscribed] n={n} shard={mb} MB: {derived(ms)}", file=sys.stderr, flush=True)
    doc = {
        "benchmark": "what a collective call costs beyond the loop's parts timed apart (ring all-gather and "
        "reduce-scatter on gloo between matmuls, 1 thread per rank), with as many ranks as cores and with "
        "twice as many (beyond twice the parts); and what starting each collective before a matmul hides",
        "cores": args.cores,
        "reps": args.reps,
        "iters": args.iters,
        "date": time.strftime("%Y-%m-%d"),
        "layouts": runs,
        "points": points,
        "call_wait_s": {
            k: v
            for k in ("cores", "replicas", "one_group")
            if (v := _median(points, "call_ms_beyond_parts", k, 1e-3)) is not None
        },
        "cores_hidden_fraction": _median(points, "cores_hidden_fraction"),
    }
    return emit_json(doc, args.out)


if __name__ == "__main__":
    sys.exit(main())
