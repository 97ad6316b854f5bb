"""Hardware profiles: what a GPU (or CPU) and its links can do, as the cost model needs it.

A profile is a JSON file (schema: `Hardware`). Named profiles ship in jigsaw_ext/plan/profiles/;
`benchmarks/bench_gpu.py` writes one from measurements on the machine it runs on. Every figure says
where it comes from in `sources` (a citation or "measured: <script> <date>"); `unmeasured` lists
the figures that are published or assumed values nobody has measured with this project's code.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

PROFILES = Path(__file__).with_name("profiles")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Tier(_Strict):
    """One communication tier (links inside a node, or the network between nodes).

    Time of a ring collective on this tier = alpha_s * (n - 1) + bytes this rank sends / bus bandwidth.
    For the inter-node tier the bandwidth is per NODE (its NICs together): the collectives of all
    ranks of a node that cross the network at the same time share it."""

    alpha_s: float = Field(ge=0, description="latency per ring step, seconds")
    bus_GBps: dict[Literal["all_gather", "reduce_scatter", "all_reduce"], float]


class GemmPoint(_Strict):
    m: int
    n: int
    k: int
    dtype: str
    tflops: float


class Hardware(_Strict):
    name: str
    description: str = ""
    kind: Literal["gpu", "cpu"] = "gpu"
    devices_per_node: int = Field(ge=1)
    compute_slots_per_node: int | None = Field(
        None, description="CPU profiles: cores; ranks beyond this share them (compute time scales up)"
    )
    peak_tflops: dict[str, float] = Field(description="dense peak per dtype: bfloat16, float16, float32 (TF32 on GPUs)")
    gemm: list[GemmPoint] = Field(default_factory=list, description="measured matmul throughput by shape")
    gemm_efficiency: float = Field(0.7, gt=0, le=1, description="fraction of peak for shapes not in `gemm`")
    memory_GB: float = Field(description="device memory per device")
    memory_reserved_GB: float = Field(1.0, description="runtime context, allocator slack, NCCL buffers")
    memory_GBps: float = Field(description="device memory bandwidth")
    elementwise_efficiency: float = Field(0.6, gt=0, le=1, description="fraction of memory_GBps elementwise ops reach")
    comm_memory_GB: float = Field(
        0.0, ge=0, description="memory the communication library keeps per process once collectives ran"
    )
    comm_workspace: dict[Literal["all_gather", "reduce_scatter", "all_reduce"], float] = Field(
        default_factory=dict,
        description="transient memory of a collective per byte of its buffer (all-gather "
        "output, reduce-scatter input, all-reduce tensor): gloo's copies; NCCL works "
        "in its own fixed buffers (0)",
    )
    intra: Tier
    inter: Tier
    host_to_device_GBps: float | None = Field(
        None,
        description="effective copy rate of a batch from the loader (host) to the device, not overlapped "
        "with compute by today's trainer (None: not modelled)",
    )
    sources: dict[str, str] = Field(default_factory=dict)
    unmeasured: list[str] = Field(default_factory=list)
    _rates: dict = PrivateAttr(default_factory=dict)

    # ------------------------------------------------------------------------------------------
    def matmul_seconds(self, m: int, n: int, k: int, dtype: str, batch: int = 1) -> float:
        """Seconds of one (batch x) m x k @ k x n product: nearest measured shape of the same dtype
        (log distance over m, n, k), else the profile's default efficiency."""
        flops = 2.0 * batch * m * n * k
        return flops / (self.matmul_tflops(batch * m, n, k, dtype) * 1e12)

    def matmul_tflops(self, m: int, n: int, k: int, dtype: str) -> float:
        """Nearest measured shape of the same dtype and the same alignment of the two leading
        dimensions (n, k multiples of 8 or not: cuBLAS runs a misaligned bf16 GEMM at ~30 % of the
        aligned rate on an H200, benchmarks/results_gpu_h200.json), by log distance over m, n, k."""
        key = (m, n, k, dtype)  # a search prices the same shapes many times
        if key not in self._rates:
            self._rates[key] = self._lookup(m, n, k, dtype)
        return self._rates[key]

    def _lookup(self, m: int, n: int, k: int, dtype: str) -> float:
        peak = self.peak_tflops[dtype if dtype in self.peak_tflops else "float32"]
        points = [p for p in self.gemm if p.dtype == dtype]
        aligned = [p for p in points if (p.n % 8 == 0, p.k % 8 == 0) == (n % 8 == 0, k % 8 == 0)]
        points = aligned or points
        if not points:
            return peak * self.gemm_efficiency
        key = [math.log(max(v, 1)) for v in (m, n, k)]

        def dist(p):
            return sum((a - math.log(max(b, 1))) ** 2 for a, b in zip(key, (p.m, p.n, p.k), strict=True))

        best = min(points, key=dist)
        # a smaller product than the nearest measured one cannot run faster per FLOP
        scale = min(1.0, (m * n * k) / (best.m * best.n * best.k)) ** 0.25 if dist(best) > 0.5 else 1.0
        return best.tflops * scale


def load_hardware(name_or_path: str) -> Hardware:
    """A profile by name (jigsaw_ext/plan/profiles/<name>.json) or by path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILES / f"{name_or_path}.json"
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in PROFILES.glob("*.json")))
        raise FileNotFoundError(f"hardware profile '{name_or_path}' not found: give a JSON file or one of {names}")
    try:
        return Hardware.model_validate(json.loads(path.read_text()))
    except ValueError as err:
        raise ValueError(f"{path}: not a valid hardware profile: {err}") from None


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILES.glob("*.json"))
