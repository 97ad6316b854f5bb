"""The cost model: step time, MFU and per-rank memory of one layout, from a meta-device trace.

Everything the model's code does comes from `trace_step` (collectives with their bytes, matmul
shapes, elementwise traffic, saved activations); what DeepSpeed does around it (ZeRO's
data-parallel traffic, optimizer state, buckets) is written out below from its documented
behaviour. Assumptions that are not measurements are named constants here, each documented:

OVERLAP (fraction of a collective's time hidden behind computation, by purpose, matching what the
layers do today; see jigsaw_ext.collectives):
- weight_gather, forward: started before the rank's own block product -> hidden up to the time
  of one (average) forward matmul;
- weight_gather, backward: started before the weight-gradient product -> hidden up to one
  (average) backward matmul; weight_grad (dW reduce-scatter): started before the input-gradient
  product -> hidden likewise;
- activation reduce-scatters/all-gathers, LayerNorm statistics, small-parameter gradients:
  blocking -> fully exposed;
- ZeRO's data-parallel gradient reduction: hidden behind the backward computation only where
  DeepSpeed overlaps it (`overlap_comm`, on by default for stage 3 and set by `plan` for 1/2);
  ZeRO-0's all-reduce runs after backward -> exposed. ZeRO-3's parameter gathers are prefetched:
  hidden behind the forward/backward computation up to its duration;
- reading the next batch from storage (data loader prefetch): hidden behind the step (not modelled);
- copying the batch from host to device: NOT hidden (today's trainer copies it synchronously from
  pageable memory; `host_to_device_GBps` of a profile is fitted to measured train.py steps).

Tiers: a group whose ranks lie in one node uses the intra-node tier; one that spans nodes sends
over the network, where every rank of a node issues the same collective at the same time, so the
node's NICs carry the traffic of all of its concurrent groups (hierarchical collectives: per node
and collective, (N-1)/N x the full buffer for all-gather/reduce-scatter, twice that for all-reduce,
N = nodes the group spans).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal, cast

from .chips import math_mode
from .hardware import Hardware
from .trace import StepTrace

CommKind = Literal["all_gather", "reduce_scatter", "all_reduce"]

BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
ADAM_STATE_BYTES = 8  # exp_avg + exp_avg_sq in fp32
MASTER_BYTES = 4  # fp32 master copy under bf16/fp16
OPTIMIZER_PASSES_BYTES = 40  # Adam step: reads/writes param, grad, master, two moments (~40 B/param)
DEEPSPEED_BUCKET_ELEMENTS = 500_000_000  # DeepSpeed's default reduce/allgather bucket (elements)


@dataclass(frozen=True)
class Candidate:
    dp: int
    domain: int
    tp: int
    zero: int
    replicate: tuple[str, ...]
    micro_batch: int
    accumulation: int
    dtype: str

    @property
    def world(self) -> int:
        return self.dp * self.domain * self.tp

    @property
    def global_batch(self) -> int:
        return self.dp * self.micro_batch * self.accumulation

    @property
    def mesh(self) -> str:
        return f"{self.dp}x{self.domain}x{self.tp}"


@dataclass
class Estimate:
    candidate: Candidate
    step_s: float
    samples_per_s: float
    mfu: float
    memory_GB: float
    fits: bool
    bottleneck: str
    seconds: dict = field(default_factory=dict)  # exposed time per part of a step
    memory: dict = field(default_factory=dict)  # GB per kind
    comm_bytes: dict = field(default_factory=dict)  # bytes per rank per optimizer step, by kind and tier
    efficiency: float | None = None  # weak scaling vs one node (set by search)
    strategies: dict = field(default_factory=dict)  # layer kind -> how it meets its data (set by search)
    math: str = ""  # math mode the GEMMs run in (bf16, tf32, fp32)
    peak_tflops: float = 0.0  # the peak MFU is measured against

    def as_dict(self) -> dict:
        d = asdict(self)
        d["candidate"]["replicate"] = list(self.candidate.replicate)
        return d


def collective_seconds(
    hw: Hardware, kind: str, sent_bytes: float, n: int, stride: int, calls: int = 1, share: float = 1.0
) -> tuple[float, str]:
    """(seconds, tier) of `calls` ring collectives of which this rank sends `sent_bytes` in all
    (ring volume) in a group of n ranks `stride` global ranks apart. Latency, as NCCL's tuning model
    prices a ring: the tier's call_s per call, plus alpha per ring step, n - 1 steps (2(n - 1) for an
    all-reduce) per call; on a ring over several nodes, (nodes - 1) of those steps (twice for an
    all-reduce) cross the network at the inter-node alpha and the others stay at the intra-node alpha.
    Many small buckets over thousands of ranks therefore cost more than their bytes. `share`: ranks per
    core of a CPU node (>= 1) stretch the copies (bytes / bandwidth: work of the shared cores), not the
    latency."""
    if n <= 1:
        return 0.0, "none"
    passes = 2 if kind == "all_reduce" else 1
    steps = calls * passes * (n - 1)
    span = stride * (n - 1) + 1
    if span <= hw.devices_per_node:
        latency = hw.intra.call_s * calls + hw.intra.alpha_s * steps
        return latency + share * sent_bytes / (hw.intra.bus_GBps[cast(CommKind, kind)] * 1e9), "intra"
    dpn = hw.devices_per_node
    local = max(1, dpn // stride) if stride < dpn else 1  # members of this group in one node
    nodes = max(2, n // local)
    concurrent = dpn // local  # groups of this axis per node
    per_node = concurrent * sent_bytes * n / (n - 1) * (nodes - 1) / nodes  # full buffer x (N-1)/N
    network_steps = calls * passes * (nodes - 1)
    latency = hw.inter.call_s * calls + hw.inter.alpha_s * network_steps + hw.intra.alpha_s * (steps - network_steps)
    return latency + share * per_node / (hw.inter.bus_GBps[cast(CommKind, kind)] * 1e9), "inter"


def compute_seconds(hw: Hardware, trace: StepTrace, tf32: bool = False) -> dict:
    """Seconds of the traced FLOP-counted operators (each at the rate of its product shape in its
    math mode) and of the elementwise traffic, per phase."""
    out = {"forward": 0.0, "backward": 0.0}
    counts = {"forward": 0, "backward": 0}
    for m in trace.matmuls:
        if m.flops:  # (an empty shard's product: nothing to run)
            out[m.phase] += m.flops / (hw.matmul_tflops(m.batch * m.m, m.n, m.k, math_mode(m.dtype, tf32)) * 1e12)
        counts[m.phase] += 1
    mean = {p: out[p] / counts[p] if counts[p] else 0.0 for p in out}
    elem = {p: trace.other_bytes.get(p, 0) / (hw.memory_GBps * 1e9 * hw.elementwise_efficiency) for p in out}
    return {"matmul": out, "mean_matmul": mean, "elementwise": elem}


def model_parallel_seconds(
    hw: Hardware, trace: StepTrace, mean_matmul: dict, overlap: float = 1.0, share: float = 1.0
) -> tuple[dict, dict]:
    """Exposed seconds per tier of the model's own collectives in one micro-step, and bytes."""
    exposed: dict[str, float] = {"intra": 0.0, "inter": 0.0}
    sent: dict[str, float] = {}
    for c in trace.collectives:
        t, tier = collective_seconds(hw, c.kind, c.sent_bytes, c.group_size, c.stride, share=share)
        if tier == "none":
            continue
        hidden = 0.0
        if c.purpose == "weight_gather":
            hidden = overlap * mean_matmul[c.phase]
        elif c.purpose == "weight_grad":
            hidden = overlap * mean_matmul["backward"]
        exposed[tier] += max(0.0, t - hidden)
        key = f"{c.kind}:{tier}"
        sent[key] = sent.get(key, 0) + c.sent_bytes
    return exposed, sent


ZERO3_PERSISTENCE = 100_000  # DeepSpeed's stage3_param_persistence_threshold default (elements)


def zero_traffic(cand: Candidate, numels: list[int]) -> dict[str, dict[str, float]]:
    """Bytes a rank sends over the data-parallel group per optimizer step, by kind and when:
    {"per_micro": {...}, "per_step": {...}}, as DeepSpeed 0.19 does it (measured with commstats on
    gloo, tests/integration/test_plan.py): ZeRO-0 all-reduces the gradients after the last micro-step; ZeRO-1
    and -2 all-reduce them too (its default use_multi_rank_bucket_allreduce) and all-gather the
    updated parameters; ZeRO-3 reduce-scatters gradients every micro-step and all-gathers each
    partitioned parameter for the forward and again for the backward (persistent ones, below
    stage3_param_persistence_threshold, once after the step). Gradients move in the model dtype;
    one fp32 scalar all-reduce per step (two under ZeRO-3) carries the overflow/norm check."""
    n, b = cand.dp, BYTES[cand.dtype]
    if n == 1:
        return {"per_micro": {}, "per_step": {}}
    ring = lambda nbytes: (n - 1) * nbytes // n  # noqa: E731  (commstats' integer ring volume)
    total = sum(numels) * b
    scalar = 2 * ring(4)
    if cand.zero == 0:
        return {"per_micro": {}, "per_step": {"all_reduce": 2 * ring(total) + scalar}}
    if cand.zero in (1, 2):
        return {"per_micro": {}, "per_step": {"all_reduce": 2 * ring(total) + scalar, "all_gather": ring(total)}}
    persistent = sum(x for x in numels if x < ZERO3_PERSISTENCE) * b
    return {
        "per_micro": {"all_gather": 2 * ring(total - persistent), "reduce_scatter": ring(total)},
        "per_step": {"all_gather": ring(persistent), "all_reduce": 2 * scalar},
    }


def _comm_memory(hw: Hardware, cand: Candidate, trace: StepTrace) -> float:
    """What the communication library holds: its per-process state once a collective ran, plus its
    workspace for the largest buffer (a model collective, or a ZeRO gradient bucket)."""
    work = sorted(
        hw.comm_workspace.get(cast(CommKind, c.kind), 0.0) * c.ring_bytes for c in trace.collectives if c.group_size > 1
    )
    if cand.dp > 1:  # ZeRO's gradient all-reduce of one bucket
        work.append(
            hw.comm_workspace.get("all_reduce", 0.0)
            * min(trace.param_count, DEEPSPEED_BUCKET_ELEMENTS)
            * BYTES[cand.dtype]
        )
    if not work:
        return 0.0
    # at most two collectives are in flight at once: a gathered linear's backward re-gathers its
    # weight while its weight gradient is reduce-scattered (jigsaw_ext.collectives._GatheredLinear)
    return hw.comm_memory_GB * 1e9 + sum(sorted(work)[-2:])


def memory_GB(hw: Hardware, cand: Candidate, trace: StepTrace) -> dict:
    p, n, b = trace.param_count, cand.dp, BYTES[cand.dtype]
    mixed = cand.dtype != "float32"
    shard = lambda stage: n if cand.zero >= stage else 1  # noqa: E731
    out = {
        "parameters": p * b / shard(3),
        "optimizer": p * (ADAM_STATE_BYTES + (MASTER_BYTES if mixed else 0)) / shard(1),
        "fp32_gradient_partition": p * 4 / n if mixed and cand.zero >= 1 else 0,
        "buckets": min(p, DEEPSPEED_BUCKET_ELEMENTS) * b if cand.zero in (1, 2) and n > 1 else 0,
        # peak of everything the forward and backward create: activations, transient buffers
        # (gathered weights, partial sums, padded send buffers) and the local gradients
        "step_tensors": trace.peak_live_bytes,
        "communication": _comm_memory(hw, cand, trace),
    }
    out = {k: v / 1e9 for k, v in out.items()}
    out["reserved"] = hw.memory_reserved_GB
    return out


def useful_flops(cand: Candidate, trace: StepTrace, train_flops_per_sample: float) -> float:
    """FLOPs per sample that MFU counts: the model's, or the FLOPs the layout executes where that is
    fewer (rank 0, the largest shard, times the model group, per sample). Some block-sharded layers
    run fewer products than the serial model's count; MFU then stays what the GEMMs achieved on the
    work done, never above the GEMM efficiency ceiling."""
    executed = trace.matmul_flops * cand.domain * cand.tp / cand.micro_batch
    return min(train_flops_per_sample, executed)


@dataclass(frozen=True)
class Settings:
    """How a job runs beyond its layout: ZeRO's overlap_comm, the data-parallel gradient bucket size
    (None: DeepSpeed's default), train.tf32 resolved, the overlap rule's scale (1 = the rule above;
    0.5 / 2 in the sensitivity analysis: every hidden allowance halved / doubled) and the number of
    ranks the optimizer state is sharded over (None: the candidate's dp under ZeRO >= 1; the weak-scaling
    reference sets the large run's)."""

    overlap_comm: bool = True
    dp_bucket_bytes: int | None = None
    tf32: bool = False
    overlap: float = 1.0
    optimizer_shards: int | None = None


def _bucket_calls(cand: Candidate, trace: StepTrace, run: Settings) -> int:
    """Calls of each kind of ZeRO's data-parallel traffic: one per gradient bucket."""
    bucket = run.dp_bucket_bytes or DEEPSPEED_BUCKET_ELEMENTS * BYTES[cand.dtype]
    return max(1, -(-trace.param_count * BYTES[cand.dtype] // bucket))


def call_wait_seconds(hw: Hardware, cand: Candidate, trace: StepTrace, run: Settings = Settings()) -> float:
    """What a rank loses in one optimizer step waiting in collectives beyond their work, on a CPU node
    whose ranks fill its cores: every collective call (the model's, each micro-step, and ZeRO's) costs
    `hw.call_wait_s["cores"]` with as many ranks as cores, and with twice as many the `replicas` figure
    where the node runs several model groups, `one_group` where its ranks form one; linear in
    ranks / cores between and beyond. Fewer ranks than cores, or a GPU profile: nothing."""
    ranks, cores = min(cand.world, hw.devices_per_node), hw.compute_slots_per_node
    if not cores or ranks < cores or not hw.call_wait_s:
        return 0.0
    group = cand.domain * cand.tp
    pattern: Literal["replicas", "one_group"] = "replicas" if group > 1 and ranks // group > 1 else "one_group"
    at_cores = hw.call_wait_s.get("cores", 0.0)
    per_call = at_cores + (hw.call_wait_s.get(pattern, at_cores) - at_cores) * (ranks / cores - 1)
    calls = cand.accumulation * sum(trace.calls_by_kind().values())
    for when, kinds in zero_traffic(cand, trace.param_numels).items():
        calls += (cand.accumulation if when == "per_micro" else 1) * len(kinds) * _bucket_calls(cand, trace, run)
    return per_call * calls


def _data_parallel_seconds(
    hw: Hardware, cand: Candidate, trace: StepTrace, forward: float, backward: float, run: Settings, comm_bytes: dict
) -> dict:
    """Exposed seconds per tier of ZeRO's data-parallel traffic in one optimizer step (adds its
    bytes to `comm_bytes`)."""
    dp_t = {"intra": 0.0, "inter": 0.0}
    stride = cand.domain * cand.tp
    calls = _bucket_calls(cand, trace, run)
    hide_all = run.overlap * (forward + backward) if run.overlap_comm else 0.0
    hide_bwd = run.overlap * backward if run.overlap_comm else 0.0
    for when, kinds in zero_traffic(cand, trace.param_numels).items():
        reps = cand.accumulation if when == "per_micro" else 1
        for kind, nbytes in kinds.items():
            t, tier = collective_seconds(hw, kind, nbytes, cand.dp, stride, calls, _share(hw, cand))
            comm_bytes[f"{kind}:{tier}"] = comm_bytes.get(f"{kind}:{tier}", 0) + reps * nbytes
            if when == "per_micro":  # ZeRO-3: prefetched gathers, reduce-scatters during backward
                exposed = max(0.0, t - (hide_all if kind == "all_gather" else hide_bwd))
            elif cand.zero in (1, 2) and kind == "all_reduce":  # bucketed during the last backward
                exposed = max(0.0, t - hide_bwd)
            else:  # ZeRO-0's all-reduce after backward; gathers after the step
                exposed = t
            dp_t[tier] += reps * exposed
    return dp_t


def _share(hw: Hardware, cand: Candidate) -> float:
    """Ranks per core of a CPU node (1 where they fit, and on a GPU): ranks beyond the cores share them,
    for their computation and for the copies of their collectives alike (gloo's transport is work of
    the same cores), not for a message's latency."""
    if not hw.compute_slots_per_node:
        return 1.0
    return max(1.0, min(cand.world, hw.devices_per_node) / hw.compute_slots_per_node)


def estimate(
    hw: Hardware,
    cand: Candidate,
    trace: StepTrace,
    train_flops_per_sample: float,
    read_bytes_per_micro: int = 0,
    run: Settings = Settings(),
) -> Estimate:
    """Step time (one optimizer step), MFU and memory of `cand`; `trace` is one micro-step of
    rank 0 of a model group at cand.micro_batch (the largest shards sit on coordinate 0)."""
    comp = compute_seconds(hw, trace, run.tf32)
    share = _share(hw, cand)
    comp = {k: {p: v * share for p, v in d.items()} for k, d in comp.items()}
    compute = sum(comp["matmul"].values()) + sum(comp["elementwise"].values())
    mp, mp_bytes = model_parallel_seconds(hw, trace, comp["mean_matmul"], run.overlap, share)
    backward = comp["matmul"]["backward"] + comp["elementwise"]["backward"]
    comm_bytes = {k: v * cand.accumulation for k, v in mp_bytes.items()}
    dp_t = _data_parallel_seconds(hw, cand, trace, compute - backward, backward, run, comm_bytes)
    shards = (run.optimizer_shards or cand.dp) if cand.zero >= 1 else 1
    per_param = hw.optimizer_bytes_per_param or OPTIMIZER_PASSES_BYTES
    optimizer = share * trace.param_count / shards * per_param / (hw.memory_GBps * 1e9 * hw.elementwise_efficiency)
    h2d = read_bytes_per_micro / (hw.host_to_device_GBps * 1e9) if hw.host_to_device_GBps else 0.0
    seconds = {
        "compute": cand.accumulation * compute,
        "trainer": cand.accumulation * share * hw.trainer_step_s,
        "host_to_device": cand.accumulation * h2d,
        # (waits in collectives on a CPU node, whose ranks all share its cores)
        "intra_comm": cand.accumulation * mp["intra"] + dp_t["intra"] + call_wait_seconds(hw, cand, trace, run),
        "inter_comm": cand.accumulation * mp["inter"] + dp_t["inter"],
        "optimizer": optimizer,
    }
    step = sum(seconds.values())
    mem = memory_GB(hw, cand, trace)
    total_mem = sum(mem.values())
    fits = total_mem <= hw.memory_GB
    mode = math_mode(cand.dtype, run.tf32)
    flops = useful_flops(cand, trace, train_flops_per_sample) * cand.global_batch
    mfu = flops / (step * cand.world * hw.peak(mode) * 1e12)
    parts = {
        "compute": seconds["compute"] + seconds["trainer"] + seconds["optimizer"] + seconds["host_to_device"],
        "intra-node comm": seconds["intra_comm"],
        "inter-node comm": seconds["inter_comm"],
    }
    bottleneck = "memory" if not fits else max(parts, key=parts.__getitem__)
    return Estimate(
        cand,
        step,
        cand.global_batch / step,
        mfu,
        total_mem,
        fits,
        bottleneck,
        seconds,
        mem,
        comm_bytes,
        math=mode,
        peak_tflops=hw.peak(mode),
    )
