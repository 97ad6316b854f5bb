"""The planner's tables and its checks against measurements.

    python benchmarks/bench_plan.py --tables [NAME ...]     # docs/planner.md's tables (benchmarks/plan_tables.py)
    python benchmarks/bench_plan.py [--parts gpu,memory,cpu] --out benchmarks/results_plan.json

Parts (each a key of the JSON printed on stdout; progress on stderr):
  gpu    the planner's step time / MFU / memory for the train.py runs bench_gpu.py measured on an
         H200 (benchmarks/results_gpu_h200.json), side by side
  memory peak tensor memory per rank of one training step through a DeepSpeed engine on six
         meshes and ZeRO stages 0-2 (resident set with every large allocation mapped on its own) against the
         planner's memory (less its fixed runtime reserve)
  cpu    the meshes 1x1x1, 1x2x1, 1x1x2, 1x2x2, 1x4x1 on this machine (cpu-gloo-2core profile):
         predicted step time against a measured training step (forward, backward, optimizer) of
         the same model, interleaved repetitions; the two orderings
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from jigsaw_ext.files import emit_json, make_output_folders  # noqa: E402
from jigsaw_ext.plan.cost import Candidate  # noqa: E402
from jigsaw_ext.plan.hardware import load_hardware  # noqa: E402
from jigsaw_ext.plan.search import Planner  # noqa: E402
from weathermixer.plan import WeatherPlanModel  # noqa: E402
from weathermixer.plan_validation import single_gpu_prediction  # noqa: E402

CPU_MESHES = ((1, 1), (2, 1), (1, 2), (2, 2), (4, 1))  # (domain, tp), dp = 1
CPU_MODEL = dict(
    grid=(32, 64),
    patch=(1, 8),
    hidden=256,
    blocks=2,
    rollout=1,
    history=0,
    token_fraction=0.5,
    channel_fraction=1.0,
    head="tendency",
)


def log(msg: str) -> None:
    print(f"[bench_plan {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def row(est) -> dict:
    c = est.candidate
    return {
        "mesh": c.mesh,
        "zero": c.zero,
        "replicate": list(c.replicate),
        "micro_batch": c.micro_batch,
        "accumulation": c.accumulation,
        "step_s": round(est.step_s, 4),
        "mfu": round(est.mfu, 4),
        "efficiency": None if est.efficiency is None else round(est.efficiency, 3),
        "memory_GB": round(est.memory_GB, 1),
        "fits": est.fits,
        "bottleneck": est.bottleneck,
        "seconds": {k: round(v, 4) for k, v in est.seconds.items()},
    }


def gpu() -> dict:
    path = ROOT / "benchmarks" / "results_gpu_h200.json"
    measured = json.loads(path.read_text())
    rows = []
    for run in measured.get("train", []):
        if "error" in run:
            continue
        est = single_gpu_prediction("paper_1b", "h200-8pernode", run["micro_batch"], run["zero"], "bf16")
        rows.append(
            {
                "zero": run["zero"],
                "micro_batch": run["micro_batch"],
                "measured_step_s": round(run["step_s"], 4),
                "predicted_step_s": round(est["step_s"], 4),
                "measured_mfu": round(run["mfu"], 4),
                "predicted_mfu": round(est["mfu"], 4),
                "measured_peak_GB": round(run["peak_mem_GB"], 2),
                "predicted_GB": round(est["peak_memory_GB"], 2),
            }
        )
    step = measured.get("model_step", {})
    return {
        "device": measured["env"]["device"],
        "train_py": rows,
        "model_forward_backward_s": step.get("step_s"),
        "matmul_s_at_measured_rates": step.get("matmul_s_at_measured_rates"),
    }


def _cpu_step(rank, world, domain, tp, reps, warmup):
    import torch

    from jigsaw_ext.mesh import MeshConfig, init_mesh
    from weathermixer.config import ModelConfig
    from weathermixer.model import WeatherMixer

    cfg = ModelConfig(**CPU_MODEL)
    mesh = init_mesh(MeshConfig(domain=domain, tp=tp))
    model = WeatherMixer(cfg, mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    geo, ch = model.geo, cfg.channels
    x = torch.randn(geo.grid_layout(ch.n_fields, 4).local_shape(mesh.coords))
    s = torch.randn(geo.grid_layout(ch.n_static, 4).local_shape(mesh.coords))
    times = []
    for i in range(warmup + reps):
        torch.distributed.barrier()
        t0 = time.perf_counter()
        model(x, s).float().square().sum().backward()
        opt.step()
        opt.zero_grad()
        torch.distributed.barrier()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def cpu(rounds=3, reps=4) -> dict:
    from jigsaw_ext.testing import run_workers
    from weathermixer.config import ModelConfig

    planner = Planner(WeatherPlanModel(ModelConfig(**CPU_MODEL)), load_hardware("cpu-gloo-2core"), "fp32")
    measured = {m: [] for m in CPU_MESHES}
    for r in range(rounds):  # interleaved: the machine's load drifts
        for domain, tp in CPU_MESHES:
            t = run_workers(
                _cpu_step, domain * tp, domain, tp, reps, 2, timeout=600, threads=1, preload=["weathermixer.model"]
            )
            measured[(domain, tp)].append(statistics.median(t[0]))
            log(f"round {r} 1x{domain}x{tp}: {measured[(domain, tp)][-1]:.3f} s")
    out = {}
    for domain, tp in CPU_MESHES:
        est = planner.estimate(Candidate(1, domain, tp, 0, (), 4, 1, "float32"))
        out[f"1x{domain}x{tp}"] = {
            "measured_s": round(statistics.median(measured[(domain, tp)]), 4),
            "predicted_s": round(est.step_s, 4),
        }
    order = lambda key: sorted(out, key=lambda m: out[m][key])  # noqa: E731
    return {
        "model": CPU_MODEL,
        "batch": 4,
        "meshes": out,
        "measured_order": order("measured_s"),
        "predicted_order": order("predicted_s"),
        "same_order": order("measured_s") == order("predicted_s"),
    }


MEM_RUNS = ((1, 2, 1, 0), (1, 1, 2, 0), (1, 2, 2, 0), (2, 1, 1, 1), (2, 1, 2, 1), (2, 2, 1, 2))  # dp, domain, tp, ZeRO
MEM_MODEL = dict(grid=(32, 64), patch=(1, 8), hidden=1024, blocks=2, rollout=1, history=0, head="tendency")


def _mem_step(rank, world, dp, domain, tp, zero, batch):
    """Peak tensor memory of two training steps (forward, backward, optimizer step through a
    DeepSpeed engine) on the CPU, from the resident set: glibc maps every allocation of 64 KiB or
    more on its own (mallopt M_MMAP_THRESHOLD), so a freed tensor leaves the resident set at once; a
    thread samples it every 0.2 ms. Baseline: the resident set after the model is built, less the
    bytes of its parameters (initialisation leaves a few MB of allocator state behind)."""
    import ctypes
    import resource
    import threading

    import deepspeed
    import deepspeed.ops
    import torch

    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD (fixed: no dynamic raise)
    libc.mallopt(-1, 64 * 1024)  # M_TRIM_THRESHOLD
    deepspeed.ops.__compatible_ops__ = {"deepspeed_shm_comm": False}
    from jigsaw_ext.mesh import MeshConfig, init_mesh
    from weathermixer.config import ModelConfig
    from weathermixer.model import WeatherMixer

    deepspeed.init_distributed(dist_backend="gloo")
    mesh = init_mesh(MeshConfig(dp=dp, domain=domain, tp=tp))
    page = resource.getpagesize()

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    cfg = ModelConfig(**MEM_MODEL)
    model = WeatherMixer(cfg, mesh)
    base = rss() - sum(p.numel() * p.element_size() for p in model.parameters())
    ds = {
        "train_micro_batch_size_per_gpu": batch,
        "gradient_accumulation_steps": 1,
        "steps_per_print": 10**9,
        "zero_optimization": {"stage": zero},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds, mpu=mesh.mpu())
    geo, ch = model.geo, cfg.channels
    x = torch.randn(geo.grid_layout(ch.n_fields, batch).local_shape(mesh.coords))
    s = torch.randn(geo.grid_layout(ch.n_static, batch).local_shape(mesh.coords))
    peak, done = [rss()], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.0002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    for _ in range(2):
        engine.backward(engine(x, s).float().square().sum())
        engine.step()
    done.set()
    thread.join()
    return max(peak[0], rss()) - base


def memory(batch=4) -> dict:
    from jigsaw_ext.testing import run_workers
    from weathermixer.config import ModelConfig

    planner = Planner(WeatherPlanModel(ModelConfig(**MEM_MODEL)), load_hardware("cpu-gloo-2core"), "fp32")
    out = {}
    for dp, domain, tp, zero in MEM_RUNS:
        peaks = run_workers(
            _mem_step,
            dp * domain * tp,
            dp,
            domain,
            tp,
            zero,
            batch,
            timeout=600,
            preload=["weathermixer.model", "deepspeed"],
        )
        est = planner.estimate(Candidate(dp, domain, tp, zero, (), batch, 1, "float32"))
        predicted = (est.memory_GB - est.memory["reserved"]) * 1e9
        key = f"{dp}x{domain}x{tp} ZeRO-{zero}"
        out[key] = {
            "measured_peak_MB": round(max(peaks) / 1e6, 2),
            "predicted_MB": round(predicted / 1e6, 2),
            "ratio": round(predicted / max(peaks), 3),
        }
        log(f"memory {key}: {out[key]}")
    return {
        "model": MEM_MODEL,
        "batch": batch,
        "what": "peak resident memory of the largest rank over two training "
        "steps (sampled every 0.2 ms; allocations of 64 KiB or more mapped on their own) less its resident memory "
        "after the model was built plus the model's parameter bytes; predicted = the planner's memory less its "
        "fixed reserve",
        "runs": out,
    }


def write_tables(names: list[str]) -> int:
    from benchmarks import plan_tables

    unknown = [n for n in names if n not in plan_tables.TABLES]
    if unknown:
        print(f"unknown table(s) {unknown}; tables: {', '.join(plan_tables.TABLES)}", file=sys.stderr)
        return 2
    results = plan_tables.generate(names or None)
    if names and plan_tables.RESULTS.is_file():  # keep the tables not regenerated
        old = json.loads(plan_tables.RESULTS.read_text())
        results["cli"] = {**old.get("cli", {}), **results["cli"]}
    tmp = plan_tables.RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(plan_tables.RESULTS)
    log(f"wrote {plan_tables.RESULTS}; docs tables: {plan_tables.write_docs(results)}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--parts", default="gpu,cpu,memory")
    ap.add_argument("--out", help="write the JSON here too (workers' libraries may print on stdout)")
    ap.add_argument(
        "--tables",
        nargs="*",
        metavar="NAME",
        help="instead: regenerate docs/planner.md's tables (all, or these of plan_tables.TABLES) "
        "and benchmarks/results_plan_tables.json",
    )
    ap.add_argument(
        "--check-tables",
        nargs="?",
        const="",
        metavar="PAGE",
        help="instead: exit 1 naming each table of docs/planner.md (or PAGE) that differs from "
        "results_plan_tables.json rendered, or that the CLI no longer gives",
    )
    args = ap.parse_args(argv)
    make_output_folders(ap, {"--out": args.out})
    if args.check_tables is not None:
        from benchmarks import plan_tables

        problems = plan_tables.check(Path(args.check_tables) if args.check_tables else plan_tables.DOCS)
        for line in problems:
            print(f"stale: {line}", file=sys.stderr)
        print("planner tables: " + ("stale; regenerate with --tables" if problems else "current"))
        return 1 if problems else 0
    if args.tables is not None:
        return write_tables(args.tables)
    parts = {"gpu": gpu, "cpu": cpu, "memory": memory}
    out = {}
    for name in args.parts.split(","):
        log(f"part {name}")
        out[name] = parts[name]()
    return emit_json(out, args.out)


if __name__ == "__main__":
    sys.exit(main())
