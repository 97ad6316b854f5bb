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

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from .chips import MATH_MODES, PEAK_TFLOPS, default_tf32, math_mode

PROFILES = Path(__file__).with_name("profiles")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Tier(_Strict):
    """One communication tier (links inside a node, or the network between nodes).

    Time of a ring collective inside a node = call_s + alpha_s * (n - 1) + bytes this rank sends / bus
    bandwidth. A ring over several nodes takes (nodes - 1) steps over the network at the inter-node
    alpha_s and its other steps at the intra-node alpha_s, as NCCL's own tuning model prices a ring
    (src/graph/tuning.cc). For the inter-node tier the bandwidth is per NODE (its NICs together): the
    collectives of all ranks of a node that cross the network at the same time share it."""

    alpha_s: float = Field(ge=0, description="latency per ring step, seconds")
    call_s: float = Field(0.0, ge=0, description="latency per collective call, seconds")
    bus_GBps: dict[Literal["all_gather", "reduce_scatter", "all_reduce"], float]


class GemmPoint(_Strict):
    """One measured matmul rate. `math`: the math mode it ran in; when absent, fp32 points count as
    TF32 (benchmarks/bench_gpu.py measures with torch's allow_tf32 on)."""

    m: int
    n: int
    k: int
    dtype: str
    tflops: float
    math: Literal["bf16", "tf32", "fp32"] | None = None

    @property
    def mode(self) -> str:
        return self.math or math_mode(self.dtype, tf32=True)


class Hardware(_Strict):
    name: str
    description: str = ""
    kind: Literal["gpu", "cpu"] = "gpu"
    devices_per_node: int = Field(ge=1)
    compute_slots_per_node: int | None = Field(
        None,
        description="CPU profiles: cores; ranks beyond this share them: their computation, the copies of "
        "their collectives, the optimizer step and the training loop take longer (work of the same cores), "
        "a message's latency does not",
    )
    call_wait_s: dict[Literal["cores", "replicas", "one_group"], float] = Field(
        default_factory=dict,
        description="CPU profiles: what a rank loses per collective call beyond the call's work, once the "
        "node's ranks fill its cores (benchmarks/bench_oversubscribed.py): `cores` with as many ranks "
        "as cores (a waiting rank sleeps until its peer's data wakes it); with twice as many, beyond the "
        "sharing above, `replicas` where the cores run several model groups (data-parallel replicas) "
        "and `one_group` where all ranks form one; linear in ranks / cores between and beyond",
    )
    trainer_step_s: float = Field(
        0.0,
        ge=0,
        description="seconds per micro-step the training loop spends outside the model's operators and the "
        "optimizer (the batch, the engine's calls, the loss), per rank: CPU profiles, measured with a "
        "model of almost no work; GPU profiles 0 (the host runs ahead of the device)",
    )
    chip: str | None = Field(
        None,
        description=f"GPU chip ({', '.join(PEAK_TFLOPS)}): its peaks per math mode come "
        "from jigsaw_ext.plan.chips, and train.tf32 null means TF32 on for "
        "Ampere and newer",
    )
    peak_tflops: dict[Literal["bf16", "tf32", "fp32"], float] = Field(
        default_factory=dict,
        description="dense peak per math mode (bf16: bf16/fp16 tensors; tf32: fp32 tensors with "
        "TF32 on; fp32: TF32 off); with `chip`, taken from the chip table",
    )
    gemm: list[GemmPoint] = Field(default_factory=list, description="measured matmul throughput by shape")
    gemm_efficiency: float = Field(0.7, gt=0, le=1, description="fraction of peak for shapes not in `gemm`")
    memory_GB: float = Field(description="device memory per device")
    memory_reserved_GB: float = Field(1.0, description="runtime context, allocator slack, NCCL buffers")
    memory_GBps: float = Field(description="device memory bandwidth")
    elementwise_efficiency: float = Field(0.6, gt=0, le=1, description="fraction of memory_GBps elementwise ops reach")
    optimizer_bytes_per_param: float | None = Field(
        None,
        gt=0,
        description="memory traffic the optimizer step costs per parameter, at memory_GBps x "
        "elementwise_efficiency (None: 40 B, a fused Adam's passes over parameter, gradient, "
        "moments and master copy)",
    )
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

    @model_validator(mode="after")
    def _chip_peaks(self):
        if self.chip is None:
            if self.kind == "gpu" and not self.peak_tflops:
                raise ValueError("a GPU profile needs `chip` or `peak_tflops`")
            return self
        if self.chip not in PEAK_TFLOPS:
            raise ValueError(f"chip {self.chip!r} unknown; known: {', '.join(PEAK_TFLOPS)} (jigsaw_ext/plan/chips.py)")
        table = PEAK_TFLOPS[self.chip]
        wrong = {k: v for k, v in self.peak_tflops.items() if table.get(k) != v}
        if wrong:
            raise ValueError(
                f"peak_tflops {wrong} disagree with chip {self.chip}'s {table} "
                "(jigsaw_ext/plan/chips.py): drop peak_tflops from the profile"
            )
        object.__setattr__(self, "peak_tflops", dict(table))
        return self

    # ------------------------------------------------------------------------------------------
    def tf32(self, setting: bool | None) -> bool:
        """Whether fp32 GEMMs run in TF32 under train.tf32 = `setting` (null: on for Ampere and newer
        chips; never on a CPU)."""
        if self.kind == "cpu":
            return False
        return default_tf32(self.chip) if setting is None else bool(setting)

    def peak(self, mode: str) -> float:
        """Dense peak TFLOP/s of a math mode (bf16, tf32, fp32)."""
        if mode not in self.peak_tflops:
            raise ValueError(
                f"hardware profile {self.name}: no peak for math mode {mode!r} (it has "
                f"{sorted(self.peak_tflops)}; modes: {', '.join(MATH_MODES)})"
            )
        return self.peak_tflops[mode]

    def gemm_ceiling(self, mode: str) -> float:
        """The highest fraction of the peak any matmul is priced at in this math mode."""
        rates = [p.tflops for p in self.gemm if p.mode == mode]
        return max([self.gemm_efficiency] + [r / self.peak(mode) for r in rates])

    def matmul_seconds(self, m: int, n: int, k: int, dtype: str, batch: int = 1, tf32: bool | None = None) -> float:
        """Seconds of one (batch x) m x k @ k x n product in `dtype` (train.tf32 = `tf32`)."""
        flops = 2.0 * batch * m * n * k
        return flops / (self.matmul_tflops(batch * m, n, k, math_mode(dtype, self.tf32(tf32))) * 1e12)

    def updated(self, update: dict) -> Hardware:
        """A copy with `update` applied and a rate cache of its own (a changed figure changes the rates)."""
        out = self.model_copy(update=update)
        out._rates = {}
        return out

    def matmul_tflops(self, m: int, n: int, k: int, mode: str) -> float:
        """Nearest measured shape of the same math mode and the same alignment of the two leading
        dimensions (n, k multiples of 8 or not: cuBLAS runs a misaligned bf16 GEMM at ~30 % of the
        aligned rate on an H200, benchmarks/results_gpu_h200.json), by log distance over m, n, k; else
        the profile's gemm_efficiency x the mode's peak."""
        key = (m, n, k, mode)  # a search prices the same shapes many times
        if key not in self._rates:
            self._rates[key] = self._lookup(m, n, k, mode)
        return self._rates[key]

    def _lookup(self, m: int, n: int, k: int, mode: str) -> float:
        peak = self.peak(mode)
        points = [p for p in self.gemm if p.mode == mode]
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
