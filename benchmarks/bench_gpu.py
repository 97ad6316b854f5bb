"""One-GPU calibration for the planner: one command, at most ~8 minutes, no network.

    python benchmarks/bench_gpu.py --out profile.json --report report.json [--base h200-8pernode]

Measures on the GPU it runs on, and writes a hardware profile (jigsaw_ext.plan.hardware) the planner
reads (`python -m weathermixer.plan --hardware profile.json ...`):

1. bf16 GEMM throughput for every per-rank matmul shape (forward and backward) of the paper's
   C1 model (paper_1b: 17,304 tokens, D = 4320, f_s = 0.5) at micro-batch 1 and 2 on the meshes
   1x1, 2x1, 1x2, 2x2, 4x2, 2x4, 1x4, 4x1, 1x8, 8x1 (domain x tp): the shapes come from the
   planner's own meta-device trace of the model; plus TF32 for the 1x1 shapes;
2. memory bandwidth (device-to-device copy);
3. the elementwise cost of the split LayerNorm (jigsaw_ext.layernorm.split_layer_norm) against
   torch's fused F.layer_norm on the per-rank activation shapes, forward + backward;
4. one forward + backward of the 1.06 B model (1x1x1, bf16, micro-batch 1) as a plain module: the
   time not spent in matmuls (at the measured GEMM rates) calibrates the elementwise efficiency;
5. step time and MFU of the 1.06 B model through `train.py` on fake data (1x1x1, bf16, ZeRO-0 and
   ZeRO-1, micro-batch 1 and 2, rollout 1), read from the run's metrics.csv.

Link bandwidths (NVLink, InfiniBand) cannot be measured on one GPU: the profile keeps the base
profile's published figures for them and lists them under `unmeasured`.
Every part writes its results into --report as soon as it is done, so a run cut short keeps them.
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

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from jigsaw_ext.files import make_output_folders  # noqa: E402

MESHES = [(1, 1), (2, 1), (1, 2), (2, 2), (4, 2), (2, 4), (1, 4), (4, 1), (1, 8), (8, 1)]
PRESET = "paper_1b"


def log(msg: str) -> None:
    print(f"[bench_gpu {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cuda_time(fn, reps: int = 5, warmup: int = 2) -> float:
    """Median seconds of fn() over reps, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return sorted(times)[len(times) // 2]


def environment() -> dict:
    props = torch.cuda.get_device_properties(0)
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(0),
            "memory_GB": props.total_memory / 1e9, "sms": props.multi_processor_count,
            "nccl": ".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else None}


def c1_shapes() -> dict[tuple[int, int, int], list[str]]:
    """(M, N, K) of every matmul one rank runs in a training micro-step -> where it occurs."""
    from jigsaw_ext.plan.search import Planner
    from jigsaw_ext.plan.hardware import load_hardware
    from weathermixer.model.presets import PRESETS
    from weathermixer.plan import WeatherPlanModel

    planner = Planner(WeatherPlanModel(PRESETS[PRESET]), load_hardware("h200-8pernode"), "bf16")
    shapes: dict = {}
    for domain, tp in MESHES:
        for mb in (1, 2):
            for m in planner.trace(domain, tp, (), mb).matmuls:
                key = (m.batch * m.m, m.n, m.k)
                shapes.setdefault(key, []).append(f"{domain}x{tp} mb{mb} {m.phase}")
    return shapes


def bench_gemms(shapes, dtype: torch.dtype, budget_s: float) -> list[dict]:
    torch.backends.cuda.matmul.allow_tf32 = True
    out, t0 = [], time.perf_counter()
    # largest first: those dominate the step; small ones are cheap to add while the budget lasts
    for (m, n, k) in sorted(shapes, key=lambda s: -s[0] * s[1] * s[2]):
        if time.perf_counter() - t0 > budget_s:
            log(f"GEMM budget spent after {len(out)} of {len(shapes)} shapes")
            break
        a = torch.randn(m, k, device="cuda", dtype=dtype)
        b = torch.randn(k, n, device="cuda", dtype=dtype)
        t = cuda_time(lambda: torch.mm(a, b), reps=5, warmup=2)
        out.append({"m": m, "n": n, "k": k, "dtype": str(dtype).replace("torch.", ""),
                    "tflops": round(2 * m * n * k / t / 1e12, 1)})
        del a, b
    return out


def bench_copy() -> float:
    x = torch.empty(2 * 1024 ** 3 // 2, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    t = cuda_time(lambda: y.copy_(x), reps=10, warmup=3)
    return 2 * x.numel() * x.element_size() / t / 1e9  # read + write


def bench_layer_norm() -> list[dict]:
    from jigsaw_ext.layernorm import split_layer_norm

    out = []
    for rows, d in ((17304, 4320), (8652, 2160), (2 * 17304, 4320)):
        x = torch.randn(1, rows, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = torch.ones(d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        b = torch.zeros(d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn_like(x)

        def fused():
            F.layer_norm(x, (d,), w, b).backward(g)

        def split():  # the multi-segment path the layers take when features are split over TP
            split_layer_norm([x], [w], [b], None, [d], 1e-5, torch.bfloat16)[0].backward(g)
        tf, ts = cuda_time(fused), cuda_time(split)
        out.append({"rows": rows, "features": d, "fused_ms": tf * 1e3, "split_ms": ts * 1e3, "split_over_fused": ts / tf})
    return out


def bench_model_step(gemm_profile, cfg=None) -> dict:
    """Forward + backward of the 1.06 B model as a plain module; the non-matmul time."""
    from jigsaw_ext.mesh import Mesh, MeshConfig
    from jigsaw_ext.plan.trace import fake_mesh, trace_step
    from weathermixer.model.mixer import WeatherMixer
    from weathermixer.model.presets import PRESETS
    from weathermixer.plan import WeatherPlanModel

    cfg, dtype = cfg or PRESETS[PRESET], torch.bfloat16
    plan_model = WeatherPlanModel(cfg)
    mesh = fake_mesh(MeshConfig(), 0)
    trace = trace_step(plan_model.build(mesh, dtype), lambda m: plan_model.step(m, mesh, 1, dtype))
    model = WeatherMixer(cfg, Mesh.single(), device="cuda", dtype=dtype)
    geo, ch = model.geo, cfg.channels
    x = torch.randn(geo.grid_layout(ch.n_fields, 1).shape, device="cuda", dtype=dtype)
    s = torch.randn(geo.grid_layout(ch.n_static, 1).shape, device="cuda", dtype=dtype)

    def step():
        model(x, s).float().square().sum().backward()
    t = cuda_time(step, reps=5, warmup=2)
    matmul_s = sum(gemm_profile.matmul_seconds(m.m, m.n, m.k, m.dtype, m.batch) for m in trace.matmuls)
    other = sum(trace.other_bytes.values())
    residual = max(t - matmul_s, 1e-6)
    del model
    torch.cuda.empty_cache()
    return {"step_s": t, "matmul_s_at_measured_rates": matmul_s, "other_bytes": other,
            "elementwise_GBps": other / residual / 1e9, "train_flops": trace.matmul_flops,
            "achieved_tflops": trace.matmul_flops / t / 1e12}


def bench_train(zero: int, micro: int, steps: int, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(ROOT / "train.py"), "--deepspeed_config", "era5_0.25deg_1b", "--dp", "1",
               "--domain", "1", "--tp", "1", "--steps", str(steps), "--output-dir", f"{tmp}/run", "--resume", "never"]
        for kv in (f"ds.zero_optimization.stage={zero}", f"ds.train_micro_batch_size_per_gpu={micro}",
                   "ds.gradient_accumulation_steps=1", "ds.bf16.enabled=true", "data.fake=true",
                   f"log.every={steps // 3}", "validation.every=0", "validation.samples=1", "validation.batch=1",
                   "log.tensorboard=false", "log.plot=false", "checkpoint.every=0", "checkpoint.at_end=false",
                   "checkpoint.best=false", "train.random_rollout=false", "train.rollout=1", "train.warmup=1"):
            cmd += ["--set", kv]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=timeout)
        wall = time.perf_counter() - t0
        if proc.returncode:
            return {"error": proc.stderr[-2000:], "wall_s": wall}
        rows = [r for r in csv.DictReader(open(f"{tmp}/run/metrics.csv")) if r["kind"] == "train"]
    last = rows[-1]
    sps, tflops = float(last["samples_per_s"]), float(last["tflops_per_rank"])
    return {"zero": zero, "micro_batch": micro, "samples_per_s": sps, "step_s": micro / sps,
            "tflops": tflops, "mfu": tflops / 989.4, "peak_mem_GB": float(last["peak_mem_gb_max"]) * 2 ** 30 / 1e9,
            "wall_s": wall, "rows": len(rows)}


def write(path, doc) -> None:
    if path:
        Path(path).write_text(json.dumps(doc, indent=1) + "\n")


def build_profile(base_name: str, report: dict) -> dict:
    from jigsaw_ext.plan.hardware import Hardware, load_hardware

    base = load_hardware(base_name).model_dump()
    day = time.strftime("%Y-%m-%d")
    measured = []
    if report.get("gemm"):
        base["gemm"] = report["gemm"]
        measured.append("gemm")
        big = max(report["gemm"], key=lambda p: p["m"] * p["n"] * p["k"] if p["dtype"] == "bfloat16" else 0)
        base["sources"]["gemm"] = f"measured: benchmarks/bench_gpu.py {day} on {report['env']['device']} " \
                                  f"({len(report['gemm'])} shapes; largest {big['tflops']} TFLOP/s)"
    if report.get("copy_GBps"):
        base["memory_GBps"] = round(report["copy_GBps"], 1)
        base["sources"]["memory_GBps"] = f"measured: device copy (read + write) {day}"
        measured.append("memory_GBps")
    if report.get("model_step"):
        eff = min(1.0, report["model_step"]["elementwise_GBps"] / base["memory_GBps"])
        base["elementwise_efficiency"] = round(max(eff, 0.05), 3)
        base["sources"]["elementwise_efficiency"] = f"measured: 1.06 B model step residual after matmuls {day}"
        measured.append("elementwise_efficiency")
    base["unmeasured"] = [u for u in base["unmeasured"] if u not in measured]
    base["description"] += f" (calibrated on {report['env']['device']} by benchmarks/bench_gpu.py {day})"
    Hardware.model_validate(base)
    return base


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="hardware profile JSON to write")
    ap.add_argument("--report", help="all measurements as JSON")
    ap.add_argument("--base", default="h200-8pernode", help="profile whose link figures are kept")
    ap.add_argument("--gemm-budget-s", type=float, default=60.0)
    ap.add_argument("--train-steps", type=int, default=30)
    ap.add_argument("--skip-train", action="store_true")
    args = ap.parse_args(argv)
    make_output_folders(ap, {"--out": args.out})
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device; this benchmark needs a GPU", file=sys.stderr)
        return 2
    from jigsaw_ext.plan.hardware import Hardware

    report = {"env": environment()}
    log(f"{report['env']}")
    shapes = c1_shapes()
    log(f"{len(shapes)} distinct per-rank matmul shapes")
    report["gemm"] = bench_gemms(shapes, torch.bfloat16, args.gemm_budget_s)
    one_rank = {k for k, where in shapes.items() if any(w.startswith("1x1 ") for w in where)}
    report["gemm"] += bench_gemms(one_rank, torch.float32, args.gemm_budget_s / 4)
    write(args.report, report)
    report["copy_GBps"] = bench_copy()
    report["layer_norm"] = bench_layer_norm()
    log(f"copy {report['copy_GBps']:.0f} GB/s; layer norm {report['layer_norm']}")
    write(args.report, report)
    gemm_profile = Hardware.model_validate(build_profile(args.base, report))
    report["model_step"] = bench_model_step(gemm_profile)
    log(f"model step {report['model_step']}")
    # the same model with its mixing hidden sizes rounded up to a multiple of 128 (model.hidden_multiple:
    # H_s 8652 -> 8704, H_c 4320 -> 4352): the planner predicts 1.55 x on one H100 from the GEMM rates
    report["model_step_hidden_multiple_128"] = bench_model_step(
        gemm_profile, PRESETS[PRESET].model_copy(update={"hidden_multiple": 128}))
    log(f"model step, hidden_multiple 128 {report['model_step_hidden_multiple_128']}")
    write(args.report, report)
    profile = build_profile(args.base, report)
    write(args.out, profile)
    if not args.skip_train:
        report["train"] = []
        for zero, micro in ((0, 1), (1, 1), (0, 2), (1, 2)):
            r = bench_train(zero, micro, args.train_steps, timeout=150)
            log(f"train.py ZeRO-{zero} mb{micro}: {r}")
            report["train"].append(r)
            write(args.report, report)
    print(json.dumps({"profile": args.out, **{k: v for k, v in report.items() if k != "gemm"}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
