"""The planner's step time against train.py on this machine (cpu-gloo-2core profile).

    python benchmarks/bench_plan_cpu.py [--meshes 1x1x1 1x2x1 1x1x2 1x2x2 2x2x1] [--steps 30] [--reps 3] \
        [--log-every 5] --out benchmarks/results_plan_cpu_2core.json
    python benchmarks/bench_plan_cpu.py --reprice benchmarks/results_plan_cpu_2core.json
    python benchmarks/bench_plan_cpu.py --smoke --out X.json     # every part at a tiny setting (CI)

train.py (torchrun, one thread per rank, the quickstart job with a wider model, ZeRO-0 fp32, one
rollout step, no validation or checkpoints) runs on each mesh, the meshes alternated, `--reps`
times; the measured step time is seconds per optimizer step over the logged steps after the first
(metrics.csv; a row every --log-every steps: each row costs two all-reduces over all ranks, which
the planner does not price). Each mesh gets two predictions for the same job and layout: with the
cpu-gloo-2core profile as shipped (`predicted_step_s`, `error`), and with the figures measured before
each repetition (`..._same_minute`; `same_minute_figures`): the job's own 1x1x1 step replayed
operator by operator (jigsaw_ext.plan.calibrate: GEMM and elementwise rates), the call waits of
benchmarks/bench_oversubscribed.py's loop (2 matmul x 2 buffer sizes), and the training loop's own
cost (train.py with model.hidden=16, less what the planner prices for that model). The machine
should be otherwise idle: 1x2x2 and 2x2x1 already put 4 ranks on the 2 cores.
"""

from __future__ import annotations

import argparse
import contextlib
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
    """This machine's speed now, in plain terms: one thread's fp32 matmul rate at two square-ish
    shapes and its elementwise rate (torch.addcmul on 4 M floats, 16 B per element), beside the rates
    the profile prices with. The host of this virtual machine is shared: the same code runs faster or
    slower from one day to the next."""
    import torch

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
    return {"matmul_GFLOPs": gemm, "elementwise_GBps": round(elementwise, 2), **priced_rates()}


def priced_rates() -> dict:
    """The rates the shipped profile prices with (peak x gemm_efficiency, memory_GBps x elementwise_efficiency)."""
    from jigsaw_ext.plan.hardware import load_hardware

    hw = load_hardware("cpu-gloo-2core")
    return {
        "matmul_GFLOPs_priced": round(hw.peak("fp32") * hw.gemm_efficiency * 1e3, 1),
        "elementwise_GBps_priced": round(hw.memory_GBps * hw.elementwise_efficiency, 2),
    }


TINY = ["model.hidden=16"]  # the job with a model of almost no work: what the training loop costs


def _planner(settings: list[str], figures: dict | None = None):
    """The planner for the benchmark's job on the cpu-gloo-2core profile; with `figures` (a same-minute
    record: `rates`, `call_wait_s`, `trainer_step_s`), those replace the profile's."""
    from jigsaw_ext.plan.calibrate import with_rates
    from jigsaw_ext.plan.hardware import load_hardware
    from jigsaw_ext.plan.search import Planner
    from weathermixer.plan import WeatherPlanModel
    from weathermixer.train.config import load_train_job

    job, _ = load_train_job(CONFIG, settings=settings)
    hw = load_hardware("cpu-gloo-2core")
    if figures:
        hw = with_rates(hw, figures["rates"]).updated(
            {k: figures[k] for k in ("call_wait_s", "trainer_step_s") if k in figures}
        )
    return Planner(WeatherPlanModel(job.model, rollout=1), hw, "fp32")


def replayed_rates(settings: list[str]) -> dict:
    """This minute's GEMM and elementwise rates of one thread, measured on the job's own operators (one
    1 x 1 x 1 micro-step of the global batch replayed on real tensors: jigsaw_ext.plan.calibrate)."""
    from jigsaw_ext.plan.calibrate import measured_rates

    rates = measured_rates(_planner(settings), GLOBAL_BATCH)
    return {k: rates[k] for k in ("gemm_GFLOPs", "elementwise_GBps", "matmul_s", "elementwise_s")}


WAIT_POINTS = ((256, 0.05), (256, 0.3), (512, 0.05), (512, 0.3))  # (matmul n, all-gather shard MB)


def call_waits(points=WAIT_POINTS, iters: int = 40) -> dict:
    """This minute's `call_wait_s` (benchmarks/bench_oversubscribed.py's loop at `points`, one run per
    layout, `iters` loops a run)."""
    from benchmarks import bench_oversubscribed as O
    from jigsaw_ext.testing import run_workers

    runs = {k: v for k, v in O.layouts(2).items() if k != "cores_async"}
    rows = []
    for n, mb in points:
        ms = {}
        for name, pairs in runs.items():
            world = 2 if name.startswith("cores") else 4
            parts = O.PARTS_OF.get(name, O.PARTS)
            ms[name] = max(run_workers(O._loop, world, pairs, n, mb, iters, parts, timeout=300)) * 1e3
        rows.append(O.derived(ms))
    return {
        k: round(statistics.median(p["call_ms_beyond_parts"][k] for p in rows) / 1e3, 6)
        for k in rows[0]["call_ms_beyond_parts"]
    }


def predicted(settings: list[str], mesh: tuple[int, int, int], figures: dict | None = None) -> dict:
    from jigsaw_ext.plan.cost import Candidate

    dp, domain, tp = mesh
    est = _planner(settings, figures).estimate(Candidate(dp, domain, tp, 0, (), GLOBAL_BATCH // dp, 1, "float32"))
    return {"step_s": est.step_s, "seconds": est.seconds}


def _step_s(mesh, settings: list[str], out: Path) -> float:
    r = train(mesh, settings, out, threads=1)
    if "error" in r:
        raise RuntimeError(f"train.py on {mesh} failed: {r['error']}")
    return GLOBAL_BATCH / _windows(r["rows"])["samples_per_s"]


def same_minute(settings: list[str], work: Path, smoke: bool = False) -> dict:
    """The figures the check prices with, measured now: the job's replayed rates, the call waits, and
    the training loop's own cost (a 1 x 1 x 1 run of the job with a model of almost no work, less what
    the planner prices for that model's operators and optimizer at the replayed rates)."""
    rates = replayed_rates(settings)
    tiny = _step_s((1, 1, 1), settings + TINY, work)
    modelled = predicted(settings + TINY, (1, 1, 1), {"rates": rates, "trainer_step_s": 0.0})["step_s"]
    return {
        "rates": rates,
        "call_wait_s": call_waits(((64, 0.01),), iters=3) if smoke else call_waits(),
        "tiny_model_step_s": round(tiny, 5),
        "trainer_step_s": round(max(0.0, tiny - modelled), 5),
    }


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
        "--smoke",
        action="store_true",
        help="every part at a tiny setting (1x1x1, 4 steps, one repetition, one small call-wait point): "
        "checks the code path, measures nothing worth reading",
    )
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
    if args.smoke:
        args.meshes, args.steps, args.reps, args.log_every = ["1x1x1"], 4, 1, 2
    meshes = [tuple(int(x) for x in m.split("x")) for m in args.meshes]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = RUN_SETTINGS + [f"data.path={work / 'data'}"] + QUICK_DATA + MODEL
        with contextlib.redirect_stdout(sys.stderr):  # (stdout carries the JSON)
            prepare_data(base)
        settings = base + [f"train.steps={args.steps}", f"log.every={args.log_every}"]
        measured = {m: [] for m in meshes}
        speed = [machine_rates()]
        figures: list[dict] = []  # before each repetition's meshes
        load = [os.getloadavg()[0]]  # the machine's load before each run (1-minute average)
        for rep in range(args.reps):
            figures.append(same_minute(settings, work / f"tiny_{rep}", args.smoke))
            log(f"rep {rep}, same-minute figures: {json.dumps(figures[-1])}")
            for mesh in meshes if rep % 2 == 0 else meshes[::-1]:
                measured[mesh].append(_step_s(mesh, settings, work / f"{'x'.join(map(str, mesh))}_{rep}"))
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
        "same_minute_figures": figures,
        "meshes": {},
    }
    for mesh in meshes:
        meas = statistics.median(measured[mesh])
        out["meshes"]["x".join(map(str, mesh))] = {
            "measured_step_s": round(meas, 4),
            "per_rep_s": [round(x, 4) for x in measured[mesh]],
        }
    return emit_json(price(out), args.out)


def same_minute_figures(doc: dict) -> dict | None:
    """The medians of the figures measured before each repetition of `doc` (None: a file without them)."""
    runs = doc.get("same_minute_figures") or []
    if not runs:
        return None
    med = lambda get: round(statistics.median(get(r) for r in runs), 6)  # noqa: E731
    return {
        "rates": {k: med(lambda r, k=k: r["rates"][k]) for k in ("gemm_GFLOPs", "elementwise_GBps")},
        "call_wait_s": {k: med(lambda r, k=k: r["call_wait_s"][k]) for k in runs[0]["call_wait_s"]},
        "trainer_step_s": med(lambda r: r["trainer_step_s"]),
    }


def price(doc: dict) -> dict:
    """Put the planner's predictions beside each mesh's measurement (the cost model as it is now): with
    the profile's figures (`predicted_step_s`, `error`) and with those measured in the same minutes as
    the runs (`..._same_minute`: the check of the planner's layout model)."""
    base = RUN_SETTINGS + ["data.path=unused"] + QUICK_DATA + doc["settings"]
    figures = same_minute_figures(doc)
    doc["same_minute_medians"] = figures
    for speed in doc.get("machine_speed_before_and_after", []):
        speed.update(priced_rates())
    for name, row in doc["meshes"].items():
        mesh = tuple(int(x) for x in name.split("x"))
        for suffix, use in (("", None), ("_same_minute", figures)):
            if suffix and not use:
                continue
            pred = predicted(base, mesh, use)
            row[f"predicted_step_s{suffix}"] = round(pred["step_s"], 4)
            row[f"error{suffix}"] = round(pred["step_s"] / row["measured_step_s"] - 1, 3)
            row[f"predicted_seconds{suffix}"] = {k: round(v, 4) for k, v in pred["seconds"].items()}
    return doc


if __name__ == "__main__":
    sys.exit(main())
