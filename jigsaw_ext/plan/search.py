"""Enumerate the layouts of a world size, price each with the cost model, rank them.

A model package describes its model with a `PlanModel`; nothing here knows what the model is.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Protocol

import torch
import torch.nn as nn

from ..mesh import Mesh, MeshConfig
from ..mlp import resolved_strategies
from .cost import Candidate, Estimate, Settings, estimate
from .hardware import Hardware
from .trace import StepTrace, extrapolate, fake_mesh, trace_step

DTYPES = {
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp32": "float32",
    "float32": "float32",
    "fp16": "float16",
    "float16": "float16",
}


class PlanModel(Protocol):
    name: str

    def check_mesh(self, mesh: MeshConfig) -> None:
        """Raise ValueError if the model cannot be split over this mesh."""

    def build(self, mesh: Mesh, dtype: torch.dtype, micro_batch: int) -> nn.Module:
        """The model on the meta device for this (fake) mesh, its layers' strategies chosen for
        `micro_batch` (mesh.strategy 'auto')."""

    def step(self, model: nn.Module, mesh: Mesh, micro_batch: int, dtype: torch.dtype) -> torch.Tensor:
        """One forward on meta inputs of this rank's shape; returns this rank's loss term."""

    def train_flops_per_sample(self) -> float:
        """Matmul FLOPs of one training sample (forward + backward), for MFU."""

    def read_bytes(self, mesh: MeshConfig, micro_batch: int) -> int:
        """Bytes of training data one rank reads per micro-step (0: not modelled)."""

    # Optional: `trace_key() -> str`, a string that names everything `build` and `step` depend on (e.g.
    # the model configuration as JSON). Planners of equal trace keys, dtype, strategy and chunk_mb in
    # one process then share their traces (shared_traces); without it each Planner traces afresh.


SHARED_TABLES = 8  # trace tables kept per process (each: every layout one planner traced)
_shared: OrderedDict[tuple, dict] = OrderedDict()


def shared_traces(model: PlanModel, dtype: str, strategy: dict, chunk_mb: float | None) -> dict:
    """The trace table of this model, dtype, mesh.strategy and mesh.chunk_mb: shared by every Planner of
    this process that asks for the same (the CLI run several times, a what-if analysis); a fresh one
    if the model has no trace_key. A trace depends on none of the hardware profile, tf32 or overlap."""
    trace_key = getattr(model, "trace_key", None)
    if trace_key is None:
        return {}
    key = (type(model).__qualname__, trace_key(), dtype, json.dumps(strategy, sort_keys=True), chunk_mb)
    if key not in _shared:
        _shared[key] = {}
        while len(_shared) > SHARED_TABLES:
            _shared.popitem(last=False)
    _shared.move_to_end(key)
    return _shared[key]


@dataclass(frozen=True)
class Constraints:
    zero: tuple[int, ...] = (0, 1, 2, 3)
    micro_batches: tuple[int, ...] = (1, 2, 4, 8)
    replicate: bool = True  # also try weights replicated over one model axis
    max_model_group: int = 64
    headroom: float = 0.0  # fraction of device memory kept free


class Planner:
    """strategy: the job's mesh.strategy (per layer kind; {} = 'auto' everywhere, chosen per
    micro-batch by the layers' own cost model, as train.py would); tf32: the job's train.tf32 (None:
    on for Ampere and newer chips, as the trainer resolves it); overlap: scale of the overlap rule
    (cost.Settings)."""

    def __init__(
        self,
        model: PlanModel,
        hw: Hardware,
        dtype: str = "bf16",
        overlap_comm: bool = True,
        dp_bucket_bytes: int | None = None,
        strategy: dict | None = None,
        chunk_mb: float | None = None,
        tf32: bool | None = None,
        overlap: float = 1.0,
    ):
        self.model, self.hw, self.dtype = model, hw, DTYPES[dtype]
        self.settings = Settings(overlap_comm, dp_bucket_bytes, hw.tf32(tf32), overlap)
        self.strategy, self.chunk_mb = dict(strategy or {}), chunk_mb  # mesh.strategy, mesh.chunk_mb
        self._traces: dict = shared_traces(model, self.dtype, self.strategy, chunk_mb)
        self._references: dict = {}

    @property
    def tf32(self) -> bool:
        return self.settings.tf32

    def variant(self, hw: Hardware | None = None, overlap: float | None = None) -> Planner:
        """The same planner (and its traces) on another profile or overlap rule: what-if analyses."""
        other = Planner(self.model, hw or self.hw, self.dtype, strategy=self.strategy, chunk_mb=self.chunk_mb)
        other.settings = Settings(
            self.settings.overlap_comm,
            self.settings.dp_bucket_bytes,
            self.settings.tf32,
            self.settings.overlap if overlap is None else overlap,
        )
        other._traces = self._traces
        return other

    def strategies(self, domain: int, tp: int, replicate: tuple[str, ...], micro_batch: int) -> dict:
        """What each layer kind runs with on this layout and micro-batch ({kind: strategy})."""
        key = ("strategies", domain, tp, replicate, micro_batch)
        if key not in self._traces:  # (shared with variants like the traces: the layers decide, not the profile)
            cfg = MeshConfig(
                domain=domain,
                tp=tp,
                replicate_weights_over=list(replicate),
                strategy=self.strategy,
                chunk_mb=self.chunk_mb,
            )
            self._traces[key] = resolved_strategies(
                self.model.build(fake_mesh(cfg, 0), getattr(torch, self.dtype), micro_batch)
            )
        return dict(self._traces[key])

    def trace(
        self, domain: int, tp: int, replicate: tuple[str, ...], micro_batch: int, forced: tuple = ()
    ) -> StepTrace:
        """One micro-step's trace; above micro-batch 3 extrapolated (exact: see trace.extrapolate) from
        micro-batches 2 and 3 run with the strategies chosen for this micro-batch (`forced`), except
        with chunk_mb."""
        if micro_batch > 3 and not forced:
            forced = tuple(sorted(self.strategies(domain, tp, replicate, micro_batch).items()))
        key = (domain, tp, replicate, micro_batch, forced)
        # (with mesh.chunk_mb the number of row chunks grows with the micro-batch: traced directly)
        if key not in self._traces and micro_batch > 3 and self.chunk_mb is None:
            self._traces[key] = extrapolate(
                self.trace(domain, tp, replicate, 2, forced),
                self.trace(domain, tp, replicate, 3, forced),
                2,
                micro_batch,
            )
        if key not in self._traces:
            strategy = dict(forced) if forced else self.strategy
            cfg = MeshConfig(
                domain=domain, tp=tp, replicate_weights_over=list(replicate), strategy=strategy, chunk_mb=self.chunk_mb
            )
            mesh = fake_mesh(cfg, 0)
            dtype = getattr(torch, self.dtype)
            model = self.model.build(mesh, dtype, micro_batch)
            self._traces[key] = trace_step(model, lambda m: self.model.step(m, mesh, micro_batch, dtype))
        return self._traces[key]

    def estimate(self, cand: Candidate, optimizer_shards: int | None = None) -> Estimate:
        tr = self.trace(cand.domain, cand.tp, cand.replicate, cand.micro_batch)
        mesh = MeshConfig(dp=cand.dp, domain=cand.domain, tp=cand.tp)
        run = replace(self.settings, optimizer_shards=optimizer_shards)
        est = estimate(
            self.hw, cand, tr, self.model.train_flops_per_sample(), self.model.read_bytes(mesh, cand.micro_batch), run
        )
        est.strategies = self.strategies(cand.domain, cand.tp, cand.replicate, cand.micro_batch)
        return est

    # ------------------------------------------------------------------------------------------
    def candidates(self, world: int, global_batch: int, limits: Constraints):
        for model_group in _divisors(world):
            if model_group > limits.max_model_group or global_batch % (world // model_group):
                continue
            dp = world // model_group
            per_replica = global_batch // dp
            for tp in _divisors(model_group):
                domain = model_group // tp
                try:
                    self.model.check_mesh(MeshConfig(dp=dp, domain=domain, tp=tp))
                except ValueError:
                    continue
                reps = (
                    [()]
                    + ([("domain",)] if limits.replicate and domain > 1 else [])
                    + ([("tp",)] if limits.replicate and tp > 1 else [])
                )
                for micro in limits.micro_batches:
                    if per_replica % micro:
                        continue
                    for zero in (z for z in limits.zero if dp > 1 or z == 0):
                        for rep in reps:
                            yield Candidate(dp, domain, tp, zero, rep, micro, per_replica // micro, self.dtype)

    def rank(self, world: int, global_batch: int, limits: Constraints = Constraints()) -> list[Estimate]:
        """Every candidate layout of `world` ranks for `global_batch`, fastest fitting first."""
        out = []
        for cand in self.candidates(world, global_batch, limits):
            est = self.estimate(cand)
            est.fits = est.memory_GB <= self.hw.memory_GB * (1 - limits.headroom)
            if not est.fits:
                est.bottleneck = "memory"
            out.append(est)
        out.sort(key=lambda e: (not e.fits, e.step_s))
        return out

    def reference(self, est: Estimate, limits: Constraints = Constraints()) -> Estimate:
        """The best layout on one node (the fewest whole nodes that hold one model group of `est`) with
        the same per-GPU work (samples per GPU per optimizer step) and the same ZeRO sharding rules
        (its ZeRO stage, its optimizer state sharded over `est`'s dp ranks), `est`'s own layout
        included: the denominator of the weak-scaling efficiency."""
        c, dpn = est.candidate, self.hw.devices_per_node
        group = c.domain * c.tp
        world = max(1, -(-group // dpn)) * dpn
        while world % group:
            world += dpn
        world = min(world, c.world)
        batch = c.global_batch * world // c.world
        key = (
            world,
            batch,
            c.zero,
            c.dp,
            limits.micro_batches,
            limits.replicate,
            c.domain,
            c.tp,
            c.replicate,
            c.micro_batch,
        )
        if key not in self._references:
            small = Constraints(
                zero=(0,),
                micro_batches=limits.micro_batches,
                replicate=limits.replicate,
                max_model_group=max(limits.max_model_group, group),
            )
            options = [replace(o, zero=c.zero) for o in self.candidates(world, batch, small)]
            options.append(replace(c, dp=world // group, accumulation=c.accumulation))
            rows = [self.estimate(o, optimizer_shards=c.dp) for o in set(options)]
            self._references[key] = max(rows, key=lambda e: (e.samples_per_s, -e.step_s))
        return self._references[key]

    def efficiency(self, est: Estimate, limits: Constraints = Constraints()) -> float:
        """Weak-scaling efficiency: per-GPU throughput of `est` / per-GPU throughput of `reference`."""
        ref = self.reference(est, limits)
        return (est.samples_per_s / est.candidate.world) / (ref.samples_per_s / ref.candidate.world)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
