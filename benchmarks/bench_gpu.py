"""One GPU, one command of at most 8 minutes: the 1.06 B model through train.py before and after the
single-GPU options, a plain PyTorch MLP-Mixer as the ceiling, and a profile of one step.

    python benchmarks/bench_gpu.py --out benchmarks/results_gpu_<chip>_<date>.json     (on the GPU)
    python benchmarks/bench_gpu.py --smoke --out /tmp/gpu_smoke.json    (CPU: tiny shapes, every code path)
    python benchmarks/bench_gpu.py --calibrate --profile-out profile.json --out ...  (+ the planner's tables)

Parts, side by side in one run, each with its own time budget (`--budget PART=SECONDS`); a part that
fails or runs out of time records its error and the others still run:
  before     train.py on the job file (default era5_0.25deg_1b) at 1x1x1, fake data, with the single-GPU
             options off (BEFORE: the --set overrides that turn them off)
  after      the same job file as it ships: aligned GEMMs (mesh.gemm_multiple), batches copied one step
             ahead on a side stream (data.device_prefetch), fused AdamW, blocks compiled
             (train.compile_blocks); with train.sync_debug=warn (host synchronisations inside a step
             are counted) and log.profile_step on its last step
  reference  a plain PyTorch MLP-Mixer of the same aligned shapes, bf16, fused AdamW (gpu_reference.py)
  after_eager  only when after fails early: the same with train.compile_blocks=false, in the time left
  profile    the breakdown of the after run's profiled step (GEMM, elementwise, copies, optimizer,
             communication, idle, top kernels); its chrome trace is copied beside --out
  planner    the planner's step time, MFU and memory for the after run's layout (predicted, not measured)
MFU is read against the chip's dense bf16 peak (jigsaw_ext.plan.chips.PEAK_TFLOPS), with the
model's own FLOPs for every part. The JSON is rewritten after each part, so a run cut short keeps
what it measured. Needs no network: deepspeed and megatron-core are imported from the Python that
runs this script (docs/gpu.md: carrying them to a machine without them).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.gpu_timing import log  # noqa: E402
from jigsaw_ext.files import make_output_folders  # noqa: E402

JOB = "era5_0.25deg_1b"
# The GPU job files with the single-GPU options off
BEFORE = (
    "mesh.gemm_multiple=1",
    "data.device_prefetch=false",
    "train.compile_blocks=false",
    "ds.optimizer.params.fused=false",
    "ds.zero_optimization.overlap_comm=false",
)
# Both train.py runs: one GPU, fake data (no I/O), no validation / checkpoint / plot cost in the window
COMMON = (
    "ds.gradient_accumulation_steps=1",
    "data.fake=true",
    "validation.every=0",
    "validation.samples=1",
    "validation.batch=1",
    "log.tensorboard=false",
    "log.plot=false",
    "checkpoint.every=0",
    "checkpoint.at_end=false",
    "checkpoint.best=false",
    "train.random_rollout=false",
    "train.rollout=1",
    "train.warmup=1",
)
# --smoke: the same job file at tiny shapes on the CPU; the blocks compile with aot_eager (no C++ build)
SMOKE = (
    "model.grid=[6,24]",
    "model.patch=[1,6]",
    "model.hidden=20",
    "model.blocks=2",
    'model.channels={"surface": ["mean_sea_level_pressure", "10m_u_component_of_wind", "2m_temperature"], '
    '"atmospheric": ["geopotential", "temperature"], "levels": [500, 850], "static": ["land_sea_mask"]}',
    "train.compile_backend=aot_eager",
    "train.bind_cores=false",
)
BUDGETS = {"before": 130.0, "after": 200.0, "reference": 60.0, "calibrate": 150.0}
SMOKE_BUDGETS = {"before": 300.0, "after": 300.0, "reference": 60.0, "calibrate": 120.0}
# planner hardware profile per chip name (others: the H100's)
HARDWARE = {"H200": "h200-8pernode", "H100": "h100-sxm-8pernode", "A100": "a100-40gb-4pernode-2xhdr200"}


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "python": sys.version.split()[0], "device": "cpu", "cuda": torch.version.cuda}
    for name in ("deepspeed", "megatron.core"):
        try:
            module = __import__(name, fromlist=["__version__"])
            env[name] = f"{getattr(module, '__version__', '?')} ({Path(module.__file__).parent})"
        except Exception as err:  # noqa: BLE001 - recorded: the train.py parts will fail and say why
            env[name] = f"not importable: {type(err).__name__}: {err}"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            device=torch.cuda.get_device_name(device),
            memory_GB=props.total_memory / 1e9,
            sms=props.multi_processor_count,
        )
    return env


def peak_bf16(env: dict) -> float | None:
    from weathermixer.train.engine import chip_peak_tflops

    return None if env["device"] == "cpu" else chip_peak_tflops(env["device"], torch.bfloat16, False)


def job_settings(args) -> list[str]:
    """--set overrides every part shares (the smoke shapes, the micro-batch)."""
    out = list(SMOKE) if args.smoke else []
    if args.micro_batch:
        out.append(f"ds.train_micro_batch_size_per_gpu={args.micro_batch}")
    return out + list(args.set)


def load_job(args):
    from weathermixer.train.config import load_train_job

    return load_train_job(args.job, {"dp": 1, "domain": 1, "tp": 1}, list(COMMON) + job_settings(args))


def read_train_rows(run: Path, profile_step: int | None) -> list[dict]:
    rows = [r for r in csv.DictReader(open(run / "metrics.csv")) if r["kind"] == "train"]
    return [r for r in rows if profile_step is None or int(r["step"]) != profile_step]


def train_run(args, name: str, extra: list[str], steps: int, every: int, timeout: float, peak) -> dict:
    """train.py end to end in a subprocess; the last log window's throughput and MFU."""
    profile_step = steps if name.startswith("after") else None
    tmp = Path(tempfile.mkdtemp(prefix=f"bench_gpu_{name}_"))
    sets = list(COMMON) + job_settings(args) + list(extra) + [f"log.every={every}"]
    if profile_step:
        sets += [f"log.profile_step={profile_step}", "train.sync_debug=warn"]
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "--deepspeed_config",
        args.job,
        "--dp",
        "1",
        "--domain",
        "1",
        "--tp",
        "1",
        "--steps",
        str(steps),
        "--output-dir",
        str(tmp / "run"),
        "--resume",
        "never",
    ]
    for kv in sets:
        cmd += ["--set", kv]
    out: dict = {"command": " ".join(cmd[1:]), "settings": sets}
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    try:
        proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as err:
        tail = (err.stderr or b"")[-3000:]
        out.update(
            error=f"timed out after {timeout:.0f} s (budget)",
            wall_s=time.perf_counter() - t0,
            stderr_tail=tail.decode(errors="replace") if isinstance(tail, bytes) else tail,
        )
        return out
    out["wall_s"] = time.perf_counter() - t0
    if proc.returncode:
        out.update(error=f"train.py exited {proc.returncode}", stderr_tail=proc.stderr[-3000:])
        return out
    rows = read_train_rows(tmp / "run", profile_step)
    last = rows[-1]
    sps, tflops = float(last["samples_per_s"]), float(last["tflops_per_rank"])
    out.update(
        step=int(last["step"]),
        samples_per_s=sps,
        tflops=tflops,
        mfu=tflops / peak if peak else None,
        peak_mem_GB=float(last["peak_mem_gb_max"]) * 2**30 / 1e9,
        rows=len(rows),
        log_lines=[ln for ln in proc.stdout.splitlines() if ln.startswith(("kernels:", "layer strategies"))],
    )
    if profile_step:
        syncs = [ln for ln in proc.stderr.splitlines() if "synchroniz" in ln.lower()]
        out["sync_warnings"] = {"count": len(syncs), "first": list(dict.fromkeys(syncs))[:5]}
        out["profile_dir"] = str(tmp / "run" / "profile")
    return out


def profile_part(after: dict, out_path: Path) -> dict:
    """The after run's profiled step: its breakdown, and its trace copied beside the JSON."""
    if "profile_dir" not in after:
        raise RuntimeError(f"the after run has no profile ({after.get('error', 'no profile_dir')})")
    pdir = Path(after["profile_dir"])
    doc = json.loads((pdir / "breakdown_rank0.json").read_text())
    trace = out_path.with_name(out_path.stem + "_trace.json")
    shutil.copyfile(pdir / "trace_rank0.json", trace)
    doc["trace"] = str(trace)
    return doc


def reference_part(args, device, budget: float, peak) -> dict:
    """The plain Mixer at the job's shapes rounded up to its mesh.gemm_multiple (at least 8)."""
    from benchmarks.gpu_reference import run_reference

    job, ds = load_job(args)
    mb = int(ds.get("train_micro_batch_size_per_gpu") or 1)
    return run_reference(job.model, mb, max(job.mesh.gemm_multiple, 8), device, budget, peak)


def planner_part(job, ds: dict, env: dict) -> dict:
    """The planner's prediction for the after run's layout (1x1x1, its ZeRO stage and micro-batch)."""
    from jigsaw_ext.plan.cost import Candidate
    from jigsaw_ext.plan.hardware import load_hardware
    from jigsaw_ext.plan.search import Planner
    from weathermixer.plan import WeatherPlanModel
    from weathermixer.train.job import zero_stage

    chip = next((k for k in HARDWARE if k in env["device"]), "H100")
    mb = int(ds.get("train_micro_batch_size_per_gpu") or 1)
    planner = Planner(WeatherPlanModel(job.model), load_hardware(HARDWARE[chip]), "bf16")
    est = planner.estimate(
        Candidate(
            dp=1, domain=1, tp=1, zero=zero_stage(ds), replicate=(), micro_batch=mb, accumulation=1, dtype="bfloat16"
        )
    )
    return {
        "hardware": HARDWARE[chip],
        "micro_batch": mb,
        "zero": zero_stage(ds),
        "predicted": True,
        "step_s": est.step_s,
        "mfu": est.mfu,
        "memory_GB": est.memory_GB,
    }


def summary(report: dict) -> dict:
    runs = ("before", "after", "after_eager", "reference")
    mfu = {k: (report.get(k) or {}).get("mfu") for k in runs if k in report}
    rate = {k: (report.get(k) or {}).get("samples_per_s") for k in runs if k in report}
    rate.setdefault("after", None)
    out = {"mfu": mfu, "samples_per_s": rate}
    if rate["after"] and rate.get("reference"):
        out["after_over_reference"] = rate["after"] / rate["reference"]
    if rate["after"] and rate.get("before"):
        out["after_over_before"] = rate["after"] / rate["before"]
    mem, plan = (report.get("after") or {}).get("peak_mem_GB"), (report.get("planner") or {}).get("memory_GB")
    if mem and plan:
        out["peak_memory_over_planner"] = mem / plan
    return out


class Report:
    """The JSON document, rewritten (atomically) after every part."""

    def __init__(self, path: Path, doc: dict):
        self.path, self.doc = path, doc

    def write(self) -> None:
        from jigsaw_ext.files import atomic_write_text

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.doc["summary"] = summary(self.doc)  # current after every part: a run cut short keeps it
        atomic_write_text(self.path, json.dumps(self.doc, indent=1, default=str) + "\n")

    def part(self, name: str, fn) -> None:
        """Run one part fail-soft: its result, or its error, under `name`."""
        t0 = time.perf_counter()
        log(f"{name} ...")
        try:
            self.doc[name] = fn()
        except Exception as err:  # noqa: BLE001 - one failing part must not cost the others
            self.doc[name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]}
        self.doc.setdefault("part_seconds", {})[name] = round(time.perf_counter() - t0, 1)
        brief = (
            {k: v for k, v in self.doc[name].items() if k in ("mfu", "samples_per_s", "error", "step_s")}
            if isinstance(self.doc[name], dict)
            else self.doc[name]
        )
        log(f"{name}: {brief}")
        self.write()


def calibration_part(args, device, budget: float) -> dict:
    from benchmarks.gpu_calibration import calibrate
    from weathermixer.model.presets import PRESETS

    env = environment(device)
    if args.smoke:
        job, _ = load_job(args)
        cfg, base = job.model, "h200-8pernode"
        sizes = {
            "meshes": [(1, 1), (1, 2)],
            "gemm_budget_s": budget / 4,
            "copy_gib": 1 / 64,
            "layer_norm": [(24, 20)],
        }  # the smoke shapes: 24 tokens, D = 20
    else:
        cfg, base = PRESETS["paper_1b"], args.base
        sizes = {
            "meshes": [(1, 1), (2, 1), (1, 2), (2, 2), (4, 2), (2, 4), (1, 4), (4, 1), (1, 8), (8, 1)],
            "gemm_budget_s": budget * 0.4,
            "copy_gib": 2.0,
            "layer_norm": [(17304, 4320), (8652, 2160), (2 * 17304, 4320)],
        }
    report = {"env": env}
    profile = calibrate(report, cfg, sizes, base, device, lambda: None)
    if args.profile_out:
        from jigsaw_ext.files import atomic_write_text

        atomic_write_text(args.profile_out, json.dumps(profile, indent=1) + "\n")
    return {k: v for k, v in report.items() if k != "env"} | {"profile_out": args.profile_out}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    ap.add_argument("--out", required=True, help="the results JSON (the profile's trace goes beside it)")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: every code path, numbers meaningless")
    ap.add_argument("--job", default=JOB, help="job file (path or packaged name) of the train.py parts")
    ap.add_argument("--micro-batch", type=int, help="override the job file's micro-batch in every part")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a train.py --set override for every part (e.g. mesh.gemm_multiple=64)",
    )
    ap.add_argument(
        "--parts",
        default="before,after,reference,profile,planner",
        help="comma-separated subset of before,after,reference,profile,planner",
    )
    ap.add_argument(
        "--budget",
        action="append",
        default=[],
        metavar="PART=SECONDS",
        help=f"time budget of a part (defaults {BUDGETS}; --smoke {SMOKE_BUDGETS})",
    )
    ap.add_argument("--steps-every", type=int, help="log window of the train.py parts (default 5; --smoke 2)")
    ap.add_argument(
        "--calibrate",
        action="store_true",
        help="also measure the planner's GEMM tables, copy bandwidth, LayerNorm and model step "
        "(about 2.5 more minutes; always on with --smoke)",
    )
    ap.add_argument("--profile-out", help="with --calibrate: the hardware profile JSON for the planner")
    ap.add_argument("--base", default="h200-8pernode", help="with --calibrate: profile whose link figures are kept")
    args = ap.parse_args(argv)
    make_output_folders(ap, {"--out": args.out, "--profile-out": args.profile_out})
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print(
            "bench_gpu: no CUDA device; this benchmark needs a GPU (use --smoke to run its code on the CPU)",
            file=sys.stderr,
        )
        return 2
    device = torch.device("cuda", 0) if cuda and not args.smoke else torch.device("cpu")
    budgets = dict(SMOKE_BUDGETS if args.smoke else BUDGETS)
    for kv in args.budget:
        part, _, seconds = kv.partition("=")
        budgets[part] = float(seconds)
    every = args.steps_every or (2 if args.smoke else 5)
    parts = set(args.parts.split(","))
    env = environment(device)
    peak = peak_bf16(env)
    report = Report(
        Path(args.out),
        {
            "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "smoke": args.smoke,
            "env": env,
            "peak_bf16_tflops": peak,
            "job_file": args.job,
            "budgets_s": budgets,
            "before_overrides": list(BEFORE),
            "common_overrides": list(COMMON) + job_settings(args),
            "log_every": every,
        },
    )
    report.write()
    log(f"{env}")
    if "before" in parts:
        report.part(
            "before", lambda: train_run(args, "before", list(BEFORE), 3 * every, every, budgets["before"], peak)
        )
    if "after" in parts or "profile" in parts:
        report.part("after", lambda: train_run(args, "after", [], 3 * every + 1, every, budgets["after"], peak))
        after = report.doc["after"]
        if "error" in after and after.get("wall_s", budgets["after"]) < budgets["after"] / 2:
            # failed early (a compiler error, say): the same run with the blocks eager, in the time left
            report.part(
                "after_eager",
                lambda: train_run(
                    args,
                    "after_eager",
                    ["train.compile_blocks=false"],
                    3 * every + 1,
                    every,
                    budgets["after"] - after["wall_s"],
                    peak,
                ),
            )
    if "profile" in parts:
        report.part("profile", lambda: profile_part(report.doc.get("after_eager", report.doc["after"]), Path(args.out)))
    if "reference" in parts:
        report.part("reference", lambda: reference_part(args, device, budgets["reference"], peak))
    if "planner" in parts:
        report.part("planner", lambda: planner_part(*load_job(args), env))
    if args.calibrate or args.smoke:
        report.part("calibration", lambda: calibration_part(args, device, budgets["calibrate"]))
    report.write()
    print(json.dumps(report.doc["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
