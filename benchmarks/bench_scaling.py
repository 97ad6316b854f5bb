"""Strong scaling of the whole training job through train.py on this machine (data, optimizer and
logging included): the quickstart job with a compute-bound width, the same global batch on
1 rank x 1 thread, 1 rank x 2 threads, and 2 ranks x 1 thread as 1x2x1 (DOMAIN) and 1x1x2 (TP).

    python benchmarks/bench_scaling.py [--hidden 1024,2048] [--steps 16] [--reps 2] [--out F.json]

The settings alternate (order reversed every repetition); samples/s over the logged windows after
the first (bench_train's definition); speed-up = samples/s of a setting / samples/s of 1 rank x
1 thread, the median over repetitions of the ratio measured side by side; one such set per width
(--hidden: model.hidden; the wider, the larger the share of matmuls in a step, as at the paper's
D = 4320). Data: the quickstart's
synthetic ERA5-like Zarr store (made on the first run, read by every rank's loader). A machine
that runs anything else meanwhile gives meaningless ratios: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_train import RUN_SETTINGS, _windows, train, variant_settings  # noqa: E402
from jigsaw_ext.files import emit_json, make_output_folders  # noqa: E402

RUNS = [
    ("1x1x1_1thread", (1, 1, 1), 1),
    ("1x1x1_2threads", (1, 1, 1), 2),
    ("1x2x1_1thread", (1, 2, 1), 1),
    ("1x1x2_1thread", (1, 1, 2), 1),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--hidden", default="1024,2048", help="model.hidden values, comma-separated (compute-bound from 1024 on)"
    )
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--every", type=int, default=4, help="log.every")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args(argv)
    make_output_folders(ap, {"--out": args.out})
    base = (
        [s for s in RUN_SETTINGS if not s.startswith("log.every")]
        + variant_settings(0, "fp32")
        + [f"train.steps={args.steps}", f"log.every={args.every}"]
    )
    doc = {
        "benchmark": "strong scaling of train.py (quickstart job, ZeRO-0 fp32, global batch 8)",
        "settings": base,
        "by_hidden": {},
        "target": "2 ranks x 1 thread vs 1 rank x 1 thread >= 1.7",
    }
    for hidden in [int(h) for h in args.hidden.split(",")]:
        doc["by_hidden"][str(hidden)] = measure(base + [f"model.hidden={hidden}"], args.reps)
    return emit_json(doc, args.out)


def measure(settings: list[str], reps: int) -> dict:
    """samples/s of every setting (alternating order) and the speed-ups, for one model width."""
    measured = {label: [] for label, _, _ in RUNS}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(reps):
            for label, mesh, threads in RUNS if rep % 2 == 0 else RUNS[::-1]:
                r = train(mesh, settings, Path(tmp) / f"{label}_{rep}", threads=threads, timeout=1800)
                if "error" in r:
                    raise RuntimeError(f"{label} failed: {r['error']}")
                measured[label].append(_windows(r.pop("rows")))
                print(
                    f"[scaling] {settings[-1]} {label} rep {rep}: {measured[label][-1]['samples_per_s']:.3f} samples/s",
                    file=sys.stderr,
                    flush=True,
                )

    def speedup(label, ref="1x1x1_1thread"):
        return round(
            statistics.median(
                a["samples_per_s"] / b["samples_per_s"] for a, b in zip(measured[label], measured[ref], strict=True)
            ),
            3,
        )

    return {
        "samples_per_s": {k: [round(x["samples_per_s"], 4) for x in v] for k, v in measured.items()},
        "speedup_vs_1_rank_1_thread": {k: speedup(k) for k, _, _ in RUNS[1:]},
        "speedup_vs_1_rank_2_threads": {k: speedup(k, "1x1x1_2threads") for k, _, _ in RUNS[2:]},
    }


if __name__ == "__main__":
    sys.exit(main())
