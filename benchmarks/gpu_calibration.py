"""The planner's hardware profile from measurements on one device (bench_gpu.py --calibrate).

1. GEMM throughput for every per-rank matmul shape (forward and backward) of the preset on the
   meshes in `meshes`, as the planner's own meta-device trace finds them, bf16 and fp32 (TF32);
2. memory bandwidth (device-to-device copy);
3. the split LayerNorm (jigsaw_ext.layernorm.split_layer_norm) against F.layer_norm, forward + backward;
4. one forward + backward of the model as a plain module: the time not spent in matmuls (at the
   measured GEMM rates) calibrates the elementwise efficiency.
Link bandwidths cannot be measured on one device: the profile keeps the base profile's figures for
them and lists them under `unmeasured`. Every function takes the device, so `--smoke` runs them on
the CPU at tiny shapes.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from .gpu_timing import log, timed


def matmul_shapes(cfg, meshes, base: str) -> dict[tuple[int, int, int], list[str]]:
    """(M, N, K) of every matmul one rank runs in a training micro-step -> where it occurs."""
    from jigsaw_ext.plan.hardware import load_hardware
    from jigsaw_ext.plan.search import Planner
    from weathermixer.plan import WeatherPlanModel

    planner = Planner(WeatherPlanModel(cfg), load_hardware(base), "bf16")
    shapes: dict = {}
    for domain, tp in meshes:
        for mb in (1, 2):
            for m in planner.trace(domain, tp, (), mb).matmuls:
                shapes.setdefault((m.batch * m.m, m.n, m.k), []).append(f"{domain}x{tp} mb{mb} {m.phase}")
    return shapes


def bench_gemms(shapes, dtype: torch.dtype, budget_s: float, device) -> list[dict]:
    out, t0 = [], time.perf_counter()
    # largest first: those dominate the step; small ones are cheap to add while the budget lasts
    for m, n, k in sorted(shapes, key=lambda s: -s[0] * s[1] * s[2]):
        if time.perf_counter() - t0 > budget_s:
            log(f"GEMM budget spent after {len(out)} of {len(shapes)} shapes")
            break
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        t = timed(lambda a=a, b=b: torch.mm(a, b), device, reps=5, warmup=2)
        out.append(
            {
                "m": m,
                "n": n,
                "k": k,
                "dtype": str(dtype).replace("torch.", ""),
                "tflops": float(f"{2 * m * n * k / t / 1e12:.4g}"),
            }
        )
        del a, b
    return out


def bench_copy(device, gib: float) -> float:
    """Device-to-device copy, GB/s (read + write)."""
    x = torch.empty(int(gib * 1024**3) // 2, device=device, dtype=torch.bfloat16)
    y = torch.empty_like(x)
    t = timed(lambda: y.copy_(x), device, reps=10, warmup=3)
    return 2 * x.numel() * x.element_size() / t / 1e9


def bench_layer_norm(shapes, device) -> list[dict]:
    from jigsaw_ext.layernorm import split_layer_norm

    out = []
    for rows, d in shapes:
        x = torch.randn(1, rows, d, device=device, dtype=torch.bfloat16, requires_grad=True)
        w = torch.ones(d, device=device, dtype=torch.bfloat16, requires_grad=True)
        b = torch.zeros(d, device=device, dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn_like(x)

        def fused(x=x, d=d, w=w, b=b, g=g):
            F.layer_norm(x, (d,), w, b).backward(g)

        def split(x=x, d=d, w=w, b=b, g=g):  # the multi-segment path the layers take when features are split over TP
            split_layer_norm([x], [w], [b], None, [d], 1e-5, torch.bfloat16)[0].backward(g)

        tf, ts = timed(fused, device), timed(split, device)
        out.append(
            {"rows": rows, "features": d, "fused_ms": tf * 1e3, "split_ms": ts * 1e3, "split_over_fused": ts / tf}
        )
    return out


def bench_model_step(gemm_profile, cfg, device) -> dict:
    """Forward + backward of the model as a plain module (bf16, micro-batch 1); the non-matmul time."""
    from jigsaw_ext.mesh import Mesh, MeshConfig
    from jigsaw_ext.plan.trace import fake_mesh, trace_step
    from weathermixer.model.mixer import WeatherMixer
    from weathermixer.plan import WeatherPlanModel

    dtype = torch.bfloat16
    plan_model = WeatherPlanModel(cfg)
    mesh = fake_mesh(MeshConfig(), 0)
    trace = trace_step(plan_model.build(mesh, dtype), lambda m: plan_model.step(m, mesh, 1, dtype))
    model = WeatherMixer(cfg, Mesh.single(), device=device, dtype=dtype)
    geo, ch = model.geo, cfg.channels
    x = torch.randn(geo.grid_layout(ch.n_fields, 1).shape, device=device, dtype=dtype)
    s = torch.randn(geo.grid_layout(ch.n_static, 1).shape, device=device, dtype=dtype) if ch.n_static else None

    def step():
        model(x, s).float().square().sum().backward()

    t = timed(step, device, reps=5, warmup=2)
    matmul_s = sum(gemm_profile.matmul_seconds(m.m, m.n, m.k, m.dtype, m.batch) for m in trace.matmuls)
    other = sum(trace.other_bytes.values())
    residual = max(t - matmul_s, 1e-6)
    return {
        "step_s": t,
        "matmul_s_at_measured_rates": matmul_s,
        "other_bytes": other,
        "elementwise_GBps": other / residual / 1e9,
        "train_flops": trace.matmul_flops,
        "achieved_tflops": trace.matmul_flops / t / 1e12,
    }


def build_profile(base_name: str, report: dict) -> dict:
    """The base hardware profile with the measured GEMM table, copy bandwidth and elementwise
    efficiency in place of its figures."""
    from jigsaw_ext.plan.hardware import Hardware, load_hardware

    base = load_hardware(base_name).model_dump()
    day, device = time.strftime("%Y-%m-%d"), report["env"]["device"]
    measured = []
    if report.get("gemm"):
        base["gemm"] = report["gemm"]
        measured.append("gemm")
        big = max(report["gemm"], key=lambda p: p["m"] * p["n"] * p["k"] if p["dtype"] == "bfloat16" else 0)
        base["sources"]["gemm"] = (
            f"measured: benchmarks/bench_gpu.py {day} on {device} "
            f"({len(report['gemm'])} shapes; largest {big['tflops']} TFLOP/s)"
        )
    if report.get("copy_GBps"):
        base["memory_GBps"] = round(report["copy_GBps"], 1)
        base["sources"]["memory_GBps"] = f"measured: device copy (read + write) {day}"
        measured.append("memory_GBps")
    if report.get("model_step"):
        eff = min(1.0, report["model_step"]["elementwise_GBps"] / base["memory_GBps"])
        base["elementwise_efficiency"] = round(max(eff, 0.05), 3)
        base["sources"]["elementwise_efficiency"] = f"measured: model step residual after matmuls {day}"
        measured.append("elementwise_efficiency")
    base["unmeasured"] = [u for u in base["unmeasured"] if u not in measured]
    base["description"] += f" (calibrated on {device} by benchmarks/bench_gpu.py {day})"
    Hardware.model_validate(base)
    return base


def calibrate(report: dict, cfg, sizes: dict, base: str, device, write) -> dict:
    """Every calibration part into report (written after each); returns the hardware profile."""
    from jigsaw_ext.plan.hardware import Hardware

    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the fp32 table is the TF32 one
    shapes = matmul_shapes(cfg, sizes["meshes"], base)
    log(f"{len(shapes)} distinct per-rank matmul shapes")
    report["gemm"] = bench_gemms(shapes, torch.bfloat16, sizes["gemm_budget_s"], device)
    one_rank = {k for k, where in shapes.items() if any(w.startswith("1x1 ") for w in where)}
    report["gemm"] += bench_gemms(one_rank, torch.float32, sizes["gemm_budget_s"] / 4, device)
    write()
    report["copy_GBps"] = bench_copy(device, sizes["copy_gib"])
    report["layer_norm"] = bench_layer_norm(sizes["layer_norm"], device)
    write()
    report["model_step"] = bench_model_step(Hardware.model_validate(build_profile(base, report)), cfg, device)
    write()
    return build_profile(base, report)
