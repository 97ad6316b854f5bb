"""The planner against measurements it was not built from.

- The Jigsaw paper's 256-GPU weak scaling (A100 40 GB, 4 per node, 2 x HDR200; 1-, 2- and 4-way
  model parallelism): one unmeasured figure of the profile, the inter-node latency per ring step, is
  fitted to ONE of the three points and the other two are predicted (`leave_one_out`), for each
  choice of the fitted point.
- The single-GPU run of benchmarks/bench_gpu.py: `single_gpu_prediction` is the planner's step time
  and peak memory for it, to print beside the measurement.
"""

from __future__ import annotations

import math

from jigsaw_ext.plan.cost import Candidate
from jigsaw_ext.plan.hardware import Hardware, load_hardware
from jigsaw_ext.plan.search import Planner
from jigsaw_ext.plan.sensitivity import varied

from .model.presets import PRESETS
from .plan import WeatherPlanModel

PAPER_HARDWARE = "a100-40gb-4pernode-2xhdr200"
PAPER_EFFICIENCY = {1: 0.53, 2: 0.67, 4: 0.73}  # 256 GPUs, n-way model parallelism
PAPER_LAYOUTS = {1: (1, 1), 2: (1, 2), 4: (2, 2)}  # n-way model parallelism -> (domain, tp)
DDP_BUCKET_BYTES = 25 * 2**20  # PyTorch DDP's default bucket_cap_mb
FITTED = "latency inter"  # the figure fitted (jigsaw_ext.plan.sensitivity)
NCCL_NETWORK_STEP_S = 14e-6  # NCCL's tuning model, ring, Simple protocol, per network step (src/graph/tuning.cc)


def paper_planner(hw: Hardware | None = None) -> Planner:
    """paper_1b in fp32 with TF32 matmuls (the paper's 9 and 11 PFLOP/s on 256 A100s exceed the FP32
    peak: its PyTorch ran fp32 GEMMs in TF32), ZeRO-0 with DDP's 25 MB gradient buckets, the weights
    gathered in every layer (the paper's scheme: mesh.strategy gather)."""
    return Planner(
        WeatherPlanModel(PRESETS["paper_1b"]),
        hw or load_hardware(PAPER_HARDWARE),
        "fp32",
        dp_bucket_bytes=DDP_BUCKET_BYTES,
        strategy={"*": "gather"},
        tf32=True,
    )


def paper_weak_scaling(planner: Planner | None = None, world: int = 256) -> dict:
    """{ways: efficiency and step times}: the same work per GPU at every size (micro-batch n per
    n-way model group); efficiency = step time on one node (4 GPUs) / step time on `world` GPUs, the
    same layout (the paper's definition)."""
    planner = planner or paper_planner()
    out = {}
    for ways, (domain, tp) in PAPER_LAYOUTS.items():
        node, big = (
            planner.estimate(Candidate(n // ways, domain, tp, 0, (), ways, 1, "float32"))
            for n in (planner.hw.devices_per_node, world)
        )
        out[ways] = {
            "efficiency": node.step_s / big.step_s,
            "one_node_step_s": node.step_s,
            "step_s": big.step_s,
            "tflops_per_gpu_one_node": node.mfu * node.peak_tflops,
            "seconds": big.seconds,
        }
    return out


def _scaled(planner: Planner, factor: float) -> Planner:
    return planner.variant(hw=varied(planner.hw, FITTED, factor))


def fit_latency(ways: int, planner: Planner | None = None) -> float:
    """The factor on the profile's inter-node latency that makes the `ways` point equal the paper's
    (bisection in log space over 1e-3 .. 1e3; the efficiency falls as the latency grows)."""
    planner = planner or paper_planner()
    target = PAPER_EFFICIENCY[ways]
    lo, hi = math.log(1e-3), math.log(1e3)
    for _ in range(40):
        mid = (lo + hi) / 2
        if paper_weak_scaling(_scaled(planner, math.exp(mid)))[ways]["efficiency"] > target:
            lo = mid
        else:
            hi = mid
    return math.exp((lo + hi) / 2)


def leave_one_out(planner: Planner | None = None) -> dict:
    """For each paper point: the inter-node latency fitted to it, the three efficiencies predicted
    with that latency, and the errors (points) of the two points that were not fitted; and, nothing
    fitted, the efficiencies with NCCL's own figure for the latency of a network ring step."""
    planner = planner or paper_planner()
    alpha = planner.hw.inter.alpha_s

    def unfitted(p: Planner) -> dict:
        eff = {w: r["efficiency"] for w, r in paper_weak_scaling(p).items()}
        errors = {w: 100 * (eff[w] - PAPER_EFFICIENCY[w]) for w in PAPER_EFFICIENCY}
        return {
            "inter_alpha_s": p.hw.inter.alpha_s,
            "efficiency": eff,
            "error_points": errors,
            "max_error_points": max(abs(e) for e in errors.values()),
        }

    out = {
        "as_profiled": unfitted(planner),
        "nccl": unfitted(_scaled(planner, NCCL_NETWORK_STEP_S / alpha)),
    }
    for ways in PAPER_EFFICIENCY:
        factor = fit_latency(ways, planner)
        pred = {w: r["efficiency"] for w, r in paper_weak_scaling(_scaled(planner, factor)).items()}
        errors = {w: 100 * (pred[w] - PAPER_EFFICIENCY[w]) for w in PAPER_EFFICIENCY if w != ways}
        out[f"fit_{ways}way"] = {
            "fitted_to": ways,
            "inter_alpha_s": alpha * factor,
            "efficiency": pred,
            "error_points": errors,
            "max_error_points": max(abs(e) for e in errors.values()),
        }
    return out


def single_gpu_prediction(
    preset: str = "paper_1b",
    hardware: str = "h200-8pernode",
    micro_batch: int = 1,
    zero: int = 0,
    dtype: str = "bf16",
    tf32: bool | None = None,
) -> dict:
    """The planner's prediction for one train.py run on one GPU (benchmarks/bench_gpu.py measures it):
    step time, samples/s, MFU and peak memory per GPU (GB, the runtime reserve included and apart)."""
    planner = Planner(WeatherPlanModel(PRESETS[preset]), load_hardware(hardware), dtype, tf32=tf32)
    est = planner.estimate(Candidate(1, 1, 1, zero, (), micro_batch, 1, planner.dtype))
    return {
        "preset": preset,
        "hardware": hardware,
        "micro_batch": micro_batch,
        "zero": zero,
        "dtype": planner.dtype,
        "math": est.math,
        "step_s": est.step_s,
        "samples_per_s": est.samples_per_s,
        "mfu": est.mfu,
        "peak_memory_GB": est.memory_GB,
        "reserved_GB": est.memory["reserved"],
        "seconds": est.seconds,
    }
