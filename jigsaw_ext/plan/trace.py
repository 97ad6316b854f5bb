"""Run one training step of a block-sharded model on the meta device and record what it does.

No memory is allocated and no process is started: the model is built on the meta device for one
rank of a (virtual) mesh whose process groups are `FakeGroup`s, and jigsaw_ext.collectives' four
torch.distributed entry points are swapped for recorders for the duration of the step. What is
recorded is therefore what the layers themselves issue (the same code path, padding included):

- every collective: kind, mesh axis, group size, bytes this rank sends (jigsaw_ext.commstats's ring
  volumes, so the totals equal `count_comm` on a real run) and the bytes of its buffers, the phase
  (forward/backward) and its purpose (weight gather, weight gradient, activation, LayerNorm
  statistics, small-parameter gradient);
- every operator `torch.utils.flop_counter` counts FLOPs for (its registry, keyed by overload
  packet, so every overload counts: `mm.out`, `baddbmm`, convolutions, attention), and the in-place
  forms of those (`addmm_`, `baddbmm_`: their own packets, which the registry and FlopCounterMode
  leave out, priced with the formula of the out-of-place operator), with the count and the (batch,
  m, n, k) that prices it in GEMM-efficiency tables;
- the memory traffic of every other non-view operator (input + output bytes: the roofline of the
  elementwise work);
- the storages autograd saves for backward (activation memory), parameters excluded.
"""

from __future__ import annotations

import contextlib
import sys
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from .. import collectives
from ..commstats import ring_volume
from ..mesh import Mesh, MeshConfig

aten = torch.ops.aten
PURPOSES = {  # autograd function (qualified name prefix) -> purpose of the collectives it issues
    "_GatheredLinear.forward": "weight_gather",
    "_ChunkedGatheredLinear.forward": "weight_gather",
    "_GatheredWeight.forward": "weight_gather",
    "_GatheredWeight.backward": "weight_grad",
    "_ReduceScatter": "activation",
    "_AllGather": "activation",
    "_CopyTo": "small_param_grad",  # and _CopyToMany (the bucket)
    "_SumPartials": "activation",
    "_LinearReduceScatter": "activation",
    "_GatherBlocks": "activation",
    "_ScatterBlocks": "activation",
    "_SplitLayerNorm": "norm_stats",
}


@dataclass(frozen=True)
class FakeGroup:
    """A process group that exists only on paper: one mesh axis, its size, this rank's place in it
    and the distance in global ranks between its consecutive members (TP 1, DOMAIN tp, DP domain*tp)."""

    axis: str
    size: int
    rank: int
    stride: int


def fake_mesh(config: MeshConfig, rank: int = 0) -> Mesh:
    """The mesh of `rank` with a FakeGroup for every axis of size > 1."""
    mesh = Mesh.virtual(config, rank)
    strides = {"tp": 1, "domain": config.tp, "dp": config.tp * config.domain, "model": 1}
    for axis in ("tp", "domain", "dp", "model"):
        if mesh.size(axis) > 1:
            mesh.groups[axis] = FakeGroup(axis, mesh.size(axis), mesh.coord(axis), strides[axis])
    return mesh


@dataclass(frozen=True)
class Collective:
    kind: str  # all_gather | reduce_scatter | all_reduce
    axis: str  # mesh axis of the group
    group_size: int
    stride: int
    sent_bytes: int  # ring volume this rank sends (commstats' convention)
    buffer_bytes: int  # bytes of the collective's input + output buffers
    phase: str  # forward | backward
    purpose: str
    ring_bytes: int = 0  # the buffer the ring volume is computed from (all-gather output, ...)


@dataclass(frozen=True)
class Matmul:
    """One FLOP-counted operator: FlopCounterMode's count, and the product shape that prices it
    (the output's leading dimensions as batch, its last two as m x n, k = flops / (2 batch m n))."""

    batch: int
    m: int
    n: int
    k: int
    dtype: str
    phase: str
    flops: int = 0


@dataclass
class StepTrace:
    """What one rank does in one micro-step (forward + backward)."""

    collectives: list[Collective] = field(default_factory=list)
    matmuls: list[Matmul] = field(default_factory=list)
    other_bytes: Counter = field(default_factory=Counter)  # phase -> bytes read + written
    saved_bytes: int = 0  # activations kept for backward
    param_bytes: int = 0
    param_count: int = 0
    param_numels: list = field(default_factory=list)  # elements of each local parameter
    peak_transient_bytes: int = 0  # largest op output + collective buffers
    peak_live_bytes: int = 0  # peak of all tensors the step creates (activations, transients, gradients)

    def bytes_by_kind(self, axes=None) -> Counter:
        out: Counter[str] = Counter()
        for c in self.collectives:
            if axes is None or c.axis in axes:
                out[c.kind] += c.sent_bytes
        return out

    def calls_by_kind(self, axes=None) -> Counter:
        out: Counter[str] = Counter()
        for c in self.collectives:
            if (axes is None or c.axis in axes) and c.group_size > 1:
                out[c.kind] += 1
        return out

    @property
    def matmul_flops(self) -> int:
        return sum(m.flops for m in self.matmuls)


@dataclass(frozen=True)
class TracedOp:
    """One priced operator of a traced step, its (meta) arguments kept: a product (`flops`) or an
    elementwise / copy operator (`bytes` read and written, as `StepTrace.other_bytes` counts them)."""

    func: object
    args: tuple
    kwargs: dict
    phase: str
    flops: int
    bytes: int


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _purpose(kind: str) -> str:
    frame: FrameType | None = sys._getframe(2)
    while frame is not None:
        name = getattr(frame.f_code, "co_qualname", frame.f_code.co_name)
        if name in ("_GatheredLinear.backward", "_ChunkedGatheredLinear.backward"):
            return "weight_gather" if kind == "all_gather" else "weight_grad"
        if name == "_LinearReduceScatter.backward":
            return "weight_grad" if kind == "all_reduce" else "activation"
        for prefix, purpose in PURPOSES.items():
            if name.startswith(prefix):
                return purpose
        frame = frame.f_back
    return "other"


class _Recorder:
    """Stand-ins for the torch.distributed calls of jigsaw_ext.collectives."""

    def __init__(self, trace: StepTrace):
        self.trace, self.phase = trace, "forward"

    def _add(self, kind, group: FakeGroup, ring_bytes: int, buffers: int):
        self.trace.collectives.append(
            Collective(
                kind,
                group.axis,
                group.size,
                group.stride,
                ring_volume(kind, ring_bytes, group.size),
                buffers,
                self.phase,
                _purpose(kind),
                ring_bytes,
            )
        )
        self.trace.peak_transient_bytes = max(self.trace.peak_transient_bytes, buffers)

    def all_gather(self, output, input, group=None, async_op=False):
        self._add("all_gather", group, _nbytes(output), _nbytes(output) + _nbytes(input))

    def reduce_scatter(self, output, input, group=None, async_op=False):
        self._add("reduce_scatter", group, _nbytes(input), _nbytes(output) + _nbytes(input))

    def all_reduce(self, tensor, group=None, async_op=False):
        self._add("all_reduce", group, _nbytes(tensor), _nbytes(tensor))

    @staticmethod
    def rank(group) -> int:
        return group.rank


@contextlib.contextmanager
def _recording(recorder: _Recorder):
    names = {
        "_all_gather_single": recorder.all_gather,
        "_reduce_scatter_single": recorder.reduce_scatter,
        "_all_reduce": recorder.all_reduce,
        "_rank": recorder.rank,
    }
    saved = {name: getattr(collectives, name) for name in names}
    for name, fn in names.items():
        setattr(collectives, name, fn)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(collectives, name, fn)


_FREE = {
    aten.empty.memory_format,
    aten.empty_strided.default,
    aten.new_empty.default,
    aten.detach.default,
    aten.lift_fresh.default,
}


def _tensors(xs):
    for x in xs:
        if isinstance(x, torch.Tensor):
            yield x
        elif isinstance(x, (list, tuple)):
            yield from _tensors(x)


class _LiveMemory:
    """Bytes of the tensor storages alive during a traced step, and their peak: every operator's
    outputs are counted from their creation until the last tensor on their storage is freed (a
    finalizer per tensor object; PyTorch keeps a tensor's Python object as long as the tensor
    itself lives, so tensors held only by autograd or `.grad` stay counted)."""

    def __init__(self):
        self.bytes, self.refs, self.now, self.peak = {}, {}, 0, 0

    def add(self, t: torch.Tensor) -> None:
        key = t.untyped_storage()._cdata
        if key not in self.refs:
            self.refs[key], self.bytes[key] = 0, t.untyped_storage().nbytes()
            self.now += self.bytes[key]
            self.peak = max(self.peak, self.now)
        self.refs[key] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self.now -= self.bytes.pop(key)
            del self.refs[key]


def flop_formula(func):
    """torch.utils.flop_counter's FLOP formula for an operator: its overload packet's, or for an
    in-place form (`addmm_`, `baddbmm_`, ...) that of the out-of-place operator; None if neither counts."""
    packet = func._overloadpacket
    if packet in flop_registry:
        return flop_registry[packet]
    name = packet.__name__
    base = getattr(aten, name[:-1], None) if name.endswith("_") and not name.startswith("_") else None
    return flop_registry.get(base) if base is not None else None


def _as_registered(formula):
    """A registry formula (it already takes tensors and out_val) marked so that FlopCounterMode's
    custom_mapping uses it as it is instead of wrapping it a second time."""

    def counted(*args, **kwargs):
        return formula(*args, **kwargs)

    setattr(counted, "_get_raw", True)  # noqa: B010 (a function attribute FlopCounterMode reads)
    return counted


def in_place_flop_formulas() -> dict:
    """{in-place packet: formula} for every FLOP-counted operator with an in-place form: the
    custom_mapping that makes FlopCounterMode count them too."""
    out = {}
    for packet in flop_registry:
        name = getattr(packet, "__name__", "")
        twin = getattr(aten, name + "_", None) if name and not name.startswith("_") else None
        if twin is not None:
            out[twin] = _as_registered(flop_registry[packet])
    return out


def _counted(func, formula, args, kwargs, out, phase: str) -> Matmul:
    """The FLOPs torch.utils.flop_counter's formula gives this call (as FlopCounterMode counts
    them), with a product shape for pricing read off the output."""
    flops = int(formula(*args, **kwargs, out_val=out))
    result = next(_tensors([out]))
    shape = list(result.shape) if result.dim() >= 2 else [1] * (2 - result.dim()) + list(result.shape)
    m, n = shape[-2], shape[-1]
    batch = 1
    for d in shape[:-2]:
        batch *= d
    k = max(1, round(flops / max(1, 2 * batch * m * n)))
    dtype = next(_tensors(args), result).dtype
    return Matmul(batch, m, n, k, str(dtype).replace("torch.", ""), phase, flops)


class _OpRecorder(TorchDispatchMode):
    def __init__(self, recorder: _Recorder, ops: list | None = None):
        super().__init__()
        self.recorder, self.ops = recorder, ops
        self.live = _LiveMemory()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        trace, phase = self.recorder.trace, self.recorder.phase
        formula = flop_formula(func)
        if formula is not None:
            trace.matmuls.append(_counted(func, formula, args, kwargs or {}, out, phase))
            if self.ops is not None:
                self.ops.append(TracedOp(func, args, kwargs or {}, phase, trace.matmuls[-1].flops, 0))
        elif not func.is_view and func not in _FREE:
            nbytes = sum(_nbytes(t) for t in _tensors(args)) + sum(_nbytes(t) for t in _tensors([out]))
            trace.other_bytes[phase] += nbytes
            if self.ops is not None:
                self.ops.append(TracedOp(func, args, kwargs or {}, phase, 0, nbytes))
        outs = list(_tensors([out]))
        if outs:
            trace.peak_transient_bytes = max(trace.peak_transient_bytes, max(_nbytes(t) for t in outs))
        for t in outs:
            self.live.add(t)
        trace.peak_live_bytes = self.live.peak
        return out


@contextlib.contextmanager
def _saved_storages(params):
    """Unique storages autograd saves for backward (parameters excluded): {storage id: bytes}."""
    param_ids = {p.untyped_storage()._cdata for p in params}
    storages, held = {}, []

    def pack(t):
        s = t.untyped_storage()
        if s._cdata not in param_ids and s._cdata not in storages:
            storages[s._cdata] = s.nbytes()
            held.append(t)  # keep it alive so its id is not reused during the count
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield storages
    held.clear()


def trace_step(model: nn.Module, step: Callable[[nn.Module], torch.Tensor], ops: list | None = None) -> StepTrace:
    """Record one forward (`step(model)` returns this rank's loss term) and its backward.

    `model` lives on the meta device and was built on a `fake_mesh`. `ops`, when given, receives every
    priced operator as a `TracedOp` (jigsaw_ext.plan.calibrate replays them on real tensors)."""
    trace, params = StepTrace(), list(model.parameters())
    trace.param_numels = [p.numel() for p in params]
    trace.param_count = sum(trace.param_numels)
    trace.param_bytes = sum(_nbytes(p) for p in params)
    recorder = _Recorder(trace)
    with _recording(recorder), _OpRecorder(recorder, ops):
        with _saved_storages(params) as saved:
            loss = step(model)
        trace.saved_bytes = sum(saved.values())
        recorder.phase = "backward"
        loss.backward()
    return trace


def extrapolate(one: StepTrace, two: StepTrace, base: int, batch: int) -> StepTrace:
    """The trace at micro-batch `batch` from the traces at `base` and base + 1 (base >= 2: batch 1 takes
    some shortcuts, e.g. no transposing copy before a collective): every shape, byte count and
    matmul dimension of a step is affine in the batch size, and the model's code issues the same
    collectives and products in the same order for any batch >= 2, so this is exact (tested)."""
    if len(one.collectives) != len(two.collectives) or len(one.matmuls) != len(two.matmuls):
        raise ValueError("traces at batch 1 and 2 differ in structure: trace this batch directly")
    lin = lambda a, b: a + (b - a) * (batch - base)  # noqa: E731
    out = StepTrace(param_bytes=one.param_bytes, param_count=one.param_count, param_numels=list(one.param_numels))
    out.collectives = [
        Collective(
            a.kind,
            a.axis,
            a.group_size,
            a.stride,
            ring_volume(a.kind, lin(a.ring_bytes, b.ring_bytes), a.group_size),
            lin(a.buffer_bytes, b.buffer_bytes),
            a.phase,
            a.purpose,
            lin(a.ring_bytes, b.ring_bytes),
        )
        for a, b in zip(one.collectives, two.collectives, strict=True)
    ]
    out.matmuls = [
        Matmul(
            lin(a.batch, b.batch), lin(a.m, b.m), lin(a.n, b.n), lin(a.k, b.k), a.dtype, a.phase, lin(a.flops, b.flops)
        )
        for a, b in zip(one.matmuls, two.matmuls, strict=True)
    ]
    out.other_bytes = Counter(
        {
            p: lin(one.other_bytes.get(p, 0), two.other_bytes.get(p, 0))
            for p in set(one.other_bytes) | set(two.other_bytes)
        }
    )
    out.saved_bytes = lin(one.saved_bytes, two.saved_bytes)
    out.peak_transient_bytes = lin(one.peak_transient_bytes, two.peak_transient_bytes)
    out.peak_live_bytes = lin(one.peak_live_bytes, two.peak_live_bytes)
    return out
