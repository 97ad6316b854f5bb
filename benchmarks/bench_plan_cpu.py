"""The planner's step time against train.py on this machine (cpu-gloo-2core profile).

    python benchmarks/bench_plan_cpu.py [--meshes 1x1x1 1x2x1 1x1x2 1x2x2 2x2x1] [--steps 30] [--reps 3] \
        [--log-every 5] --out benchmarks/results_plan_cpu_2core.json
    python benchmarks/bench_plan_cpu.py --reprice benchmarks/results_plan_cpu_2core.json

train.py (torchrun, one thread per rank, the quickstart job with a wider model, ZeRO-0 fp32, one
rollout step, no validation or checkpoints) runs on each mesh, the meshes alternated, `--reps`
times; the measured step time is seconds per optimizer step over the logged steps after the first
(metrics.csv; a row every --log-every steps: each row costs two all-reduces over all ranks, which
the planner does not price). The prediction is `python -m weathermixer.plan`'s for the same job and layout. The
machine should be otherwise idle: 1x2x2 and 2x2x1 already put 4 ranks on the 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_train import (  # noqa: E402
    CONFIG,
    GLOBAL_BATCH,
    QUICK_DATA,
    RUN_SETTINGS,
    _windows,
    prepare_data,
    train,
)
from jigsaw_ext.files import emit_json, make_output_folders  # noqa: E402

MODEL = [
    "model.hidden=256",
    "train.rollout=1",
    "train.random_rollout=false",
    "ds.zero_optimization.stage=0",
    "ds.bf16.enabled=false",
]


def log(msg: str) -> None:
    print(f"[bench_plan_cpu {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def machine_rates() -> dict:
    """This machine's speed now, in the profile's terms: one thread's fp32 matmul rate at the shapes
    the profile's peak was measured at, and its elementwise rate (torch.addcmul on 4 M floats, 16 B
    per element), beside the rates the profile prices with (peak x gemm_efficiency, memory_GBps x
    elementwise_efficiency). The host of this virtual machine is shared: the same code runs faster
    or slower from one day to the next."""
    import torch

    from jigsaw_ext.plan.hardware import load_hardware

    hw = load_hardware("cpu-gloo-2core")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def rate(fn, work):
        for _ in range(3):
            fn()
        times = []
        for _ in range(9):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return work / statistics.median(times) / 1e9

    gemm = {}
    for m, n, k in ((4096, 256, 256), (256, 512, 4096)):
        a, b = torch.randn(m, k), torch.randn(k, n)
        gemm[f"{m}x{n}x{k}"] = round(rate(lambda a=a, b=b: a @ b, 2 * m * n * k), 1)
    x, y, z = (torch.randn(4 * 2**20) for _ in range(3))
    elementwise = rate(lambda: torch.addcmul(z, x, y), 16 * 4 * 2**20)
    torch.set_num_threads(threads)
    return {
        "matmul_GFLOPs": gemm,
        "matmul_GFLOPs_priced": round(hw.peak("fp32") * hw.gemm_efficiency * 1e3, 1),
        "elementwise_GBps": round(elementwise, 2),
        "elementwise_GBps_priced": round(hw.memory_GBps * hw.elementwise_efficiency, 2),
    }


def predicted(settings: list[str], mesh: tuple[int, int, int]) -> dict:
    from jigsaw_ext.plan.cost import Candidate
    from jigsaw_ext.plan.hardware import load_hardware
    from jigsaw_ext.plan.search import Planner
    from weathermixer.plan import WeatherPlanModel
    from weathermixer.train.config import load_train_job

    job, _ = load_train_job(CONFIG, settings=settings)
    planner = Planner(WeatherPlanModel(job.model, rollout=1), load_hardware("cpu-gloo-2core"), "fp32")
    dp, domain, tp = mesh
    est = planner.estimate(Candidate(dp, domain, tp, 0, (), GLOBAL_BATCH // dp, 1, "float32"))
    return {"step_s": est.step_s, "seconds": est.seconds}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--meshes", nargs="+", default=["1x1x1", "1x2x1", "1x1x2", "1x2x2", "2x2x1"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--log-every", type=int, default=5)
    ap.add_argument("--out")
    ap.add_argument(
        "--reprice",
        metavar="RESULTS_JSON",
        help="run nothing: put the planner's current predictions beside the measurements of this file "
        "(after a change to the cost model or the profile) and write it back (or to --out)",
    )
    args = ap.parse_args(argv)
    make_output_folders(ap, {"--out": args.out})
    if args.reprice:
        try:
            doc = json.loads(Path(args.reprice).read_text())
            doc["settings"], doc["meshes"]  # noqa: B018 (what price() reads)
        except (OSError, ValueError, KeyError) as err:
            ap.error(f"--reprice {args.reprice}: not a results file of this benchmark ({err})")
        return emit_json(price(doc), args.out or args.reprice)
    meshes = [tuple(int(x) for x in m.split("x")) for m in args.meshes]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = RUN_SETTINGS + [f"data.path={work / 'data'}"] + QUICK_DATA + MODEL
        prepare_data(base)
        settings = base + [f"train.steps={args.steps}", f"log.every={args.log_every}"]
        measured = {m: [] for m in meshes}
        speed = [machine_rates()]
        load = [os.getloadavg()[0]]  # the machine's load before each run (1-minute average)
        for rep in range(args.reps):
            for mesh in meshes if rep % 2 == 0 else meshes[::-1]:
                r = train(mesh, settings, work / f"{'x'.join(map(str, mesh))}_{rep}", threads=1)
                if "error" in r:
                    raise RuntimeError(f"train.py on {mesh} failed: {r['error']}")
                w = _windows(r["rows"])
                measured[mesh].append(GLOBAL_BATCH / w["samples_per_s"])
                log(f"{mesh} rep {rep}: {measured[mesh][-1]:.3f} s/step")
                load.append(os.getloadavg()[0])
    speed.append(machine_rates())
    out = {
        "what": "seconds per optimizer step of train.py (global batch 8, ZeRO-0 fp32, 1 thread per rank, "
        f"a log row every {args.log_every} steps) against the planner (cpu-gloo-2core); medians over the repetitions",
        "settings": MODEL,
        "steps": args.steps,
        "log_every": args.log_every,
        "reps": args.reps,
        "load_average_1min": [round(x, 2) for x in load],
        "machine_speed_before_and_after": speed,
        "meshes": {},
    }
    for mesh in meshes:
        meas = statistics.median(measured[mesh])
        out["meshes"]["x".join(map(str, mesh))] = {
            "measured_step_s": round(meas, 4),
            "per_rep_s": [round(x, 4) for x in measured[mesh]],
        }
    return emit_json(price(out), args.out)


def price(doc: dict) -> dict:
    """Put the planner's prediction beside each mesh's measurement (the profile as it is now)."""
    base = RUN_SETTINGS + ["data.path=unused"] + QUICK_DATA + doc["settings"]
    for name, row in doc["meshes"].items():
        pred = predicted(base, tuple(int(x) for x in name.split("x")))
        row["predicted_step_s"] = round(pred["step_s"], 4)
        row["error"] = round(pred["step_s"] / row["measured_step_s"] - 1, 3)
        row["predicted_seconds"] = {k: round(v, 4) for k, v in pred["seconds"].items()}
    return doc


if __name__ == "__main__":
    sys.exit(main())
