"""Is per-rank memory flat over a long run with validation and checkpoints?

    python benchmarks/bench_memory.py                      # 2000 steps, 2 ranks (1x2x1), JSON on stdout
    python benchmarks/bench_memory.py --steps 500 --nproc 4 --mesh 1 2 2 --plot mem.png

Runs the training job through train.py (torchrun, gloo, 1 thread per rank) on the quickstart model
with a small global batch, validation and a checkpoint every `--every` steps and a log row every
10 steps. Each row carries the anonymous resident memory now (the heap: RssAnon; max and min over
ranks, `mem_gb_*`) and the peak resident set so far (`peak_mem_gb_*`). Reported: the curve, the growth
after the first validation and checkpoint (least-squares slope in MB per 1000 steps, and last minus
first), and the jumps across validation/checkpoint steps.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from jigsaw_ext.files import make_output_folders  # noqa: E402


def run(args, out: Path) -> list[dict]:
    dp, domain, tp = args.mesh
    settings = [
        f"train.steps={args.steps}",
        "train.warmup=20",
        "log.every=10",
        f"validation.every={args.every}",
        "validation.samples=16",
        f"checkpoint.every={args.every}",
        "checkpoint.keep_last=2",
        "checkpoint.resume=never",
        "log.plot=false",
        "ds.train_micro_batch_size_per_gpu=2",
        f"data.path={out / 'synthetic'}",
    ]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(dp * domain * tp),
        "--master_port",
        str(args.port),
        "train.py",
        "--deepspeed_config",
        "deepspeed_configs/quickstart_cpu.json",
        "--output-dir",
        str(out / "run"),
        "--dp",
        str(dp),
        "--domain",
        str(domain),
        "--tp",
        str(tp),
    ]
    for s in settings:
        cmd += ["--set", s]
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"training failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    print(f"bench_memory: {args.steps} steps in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    with open(out / "run" / "metrics.csv") as f:
        return [r for r in csv.DictReader(f) if r["kind"] == "train"]


def slope_mb_per_kstep(steps: list[int], gb: list[float]) -> float:
    n = len(steps)
    mx, my = sum(steps) / n, sum(gb) / n
    var = sum((x - mx) ** 2 for x in steps)
    return 0.0 if var == 0 else sum((x - mx) * (y - my) for x, y in zip(steps, gb, strict=True)) / var * 1024 * 1000


def summarise(rows: list[dict], every: int) -> dict:
    steps = [int(r["step"]) for r in rows]
    cur_max = [float(r["mem_gb_max"]) for r in rows]
    cur_min = [float(r["mem_gb_min"]) for r in rows]
    peak = [float(r["peak_mem_gb_max"]) for r in rows]
    settled = [i for i, s in enumerate(steps) if s > every]  # after the first validation + checkpoint
    xs, ys = [steps[i] for i in settled], [cur_max[i] for i in settled]
    # validation and the checkpoint run after the row of a step that is a multiple of `every`
    jumps = [round((cur_max[i + 1] - cur_max[i]) * 1024, 2) for i in range(len(steps) - 1) if steps[i] % every == 0]
    return {
        "steps": steps,
        "mem_gb_max": cur_max,
        "mem_gb_min": cur_min,
        "peak_mem_gb_max": peak,
        "growth_after_first_checkpoint": {
            "slope_mb_per_1000_steps": round(slope_mb_per_kstep(xs, ys), 3) if len(xs) > 1 else None,
            "last_minus_first_mb": round((ys[-1] - ys[0]) * 1024, 2) if ys else None,
            "from_step": xs[0] if xs else None,
            "to_step": xs[-1] if xs else None,
        },
        "jumps_across_validation_checkpoint_mb": jumps,
    }


def plot(summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=120)
    ax.plot(summary["steps"], summary["mem_gb_max"], label="anonymous resident now (heap), max over ranks")
    ax.plot(summary["steps"], summary["mem_gb_min"], label="anonymous resident now (heap), min over ranks")
    ax.plot(summary["steps"], summary["peak_mem_gb_max"], "--", label="peak resident set incl. shared libraries, max")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("GB per rank")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--every", type=int, default=200, help="validation and checkpoint interval")
    ap.add_argument("--mesh", type=int, nargs=3, default=[1, 2, 1], metavar=("DP", "DOMAIN", "TP"))
    ap.add_argument("--port", type=int, default=29561)
    ap.add_argument("--plot", help="PNG of the memory curve")
    args = ap.parse_args(argv)
    make_output_folders(ap, {"--plot": args.plot})
    with tempfile.TemporaryDirectory() as tmp:
        rows = run(args, Path(tmp))
    summary = summarise(rows, args.every)
    summary["settings"] = {
        "steps": args.steps,
        "every": args.every,
        "mesh": args.mesh,
        "model": "quickstart_cpu (hidden 64, 2 blocks), micro batch 2",
    }
    if args.plot:
        plot(summary, args.plot)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
