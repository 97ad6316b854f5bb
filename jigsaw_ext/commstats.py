"""Count the bytes each rank sends through torch.distributed, by collective type.

    with count_comm() as stats:
        train_step()
    stats.bytes  # {"all_gather": ..., "reduce_scatter": ..., "all_reduce": ..., ...}

Volumes are those of the bandwidth-optimal ring algorithms, per rank, for a group of n ranks:
all-gather (n-1)/n x output bytes, reduce-scatter (n-1)/n x input bytes, all-reduce 2(n-1)/n x
bytes, all-to-all the bytes leaving this rank, send the tensor's bytes (a receive is counted by its
sender). Padding that a caller adds to even out shards is real traffic and is counted.

Callers often bind a collective at import time (`dist_all_gather_func` in megatron-core), so
patching torch.distributed alone misses them: every loaded module attribute that IS one of the
wrapped functions is replaced for the duration of the context and restored afterwards. A function
that implements a collective itself (jigsaw_ext.collectives' ring over point-to-point sends on gloo)
declares which one with a `comm_rule` attribute naming the torch.distributed function, and is
counted as that. A collective that calls another one internally (torch's deprecated spellings do) is
counted once, at the outermost call.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import threading
import types
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

KINDS = ("all_gather", "reduce_scatter", "all_reduce", "all_to_all", "send_recv")


def _nbytes(t) -> int:
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    return sum(_nbytes(x) for x in t)  # a list of tensors


def _n(group) -> int:
    return dist.get_world_size(group)


def ring_volume(kind: str, nbytes: int, n: int) -> int:
    """Bytes one rank sends in a ring collective of `kind` on a buffer of `nbytes` (the output of an
    all-gather, the input of a reduce-scatter, the tensor of an all-reduce) over n ranks."""
    factor = {"all_gather": 1, "reduce_scatter": 1, "all_reduce": 2}[kind]
    return (factor * (n - 1) * nbytes) // n


def _all_to_all_single(a) -> int:
    n, total = _n(a["group"]), _nbytes(a["input"])
    if n == 1:
        return 0
    splits = a.get("input_split_sizes")
    if splits:
        row = total // max(sum(splits), 1)
        return total - row * splits[dist.get_rank(a["group"])]
    return total - total // n


def _all_to_all(a) -> int:
    inputs = a["input_tensor_list"]
    return 0 if _n(a["group"]) == 1 else _nbytes(inputs) - _nbytes(inputs[dist.get_rank(a["group"])])


def _ring(kind: str, arg: str):
    return lambda a: ring_volume(kind, _nbytes(a[arg]), _n(a["group"]))


# torch.distributed function -> (kind, bytes this rank sends, from the call's bound arguments)
_RULES = {
    "all_reduce": ("all_reduce", _ring("all_reduce", "tensor")),
    "all_gather_single": ("all_gather", _ring("all_gather", "output_tensor")),
    "all_gather_into_tensor": ("all_gather", _ring("all_gather", "output_tensor")),
    "_all_gather_base": ("all_gather", _ring("all_gather", "output_tensor")),
    "all_gather": ("all_gather", _ring("all_gather", "tensor_list")),
    "reduce_scatter_single": ("reduce_scatter", _ring("reduce_scatter", "input")),
    "reduce_scatter_tensor": ("reduce_scatter", _ring("reduce_scatter", "input")),
    "_reduce_scatter_base": ("reduce_scatter", _ring("reduce_scatter", "input")),
    "reduce_scatter": ("reduce_scatter", _ring("reduce_scatter", "input_list")),
    "all_to_all_single": ("all_to_all", _all_to_all_single),
    "all_to_all": ("all_to_all", _all_to_all),
    "send": ("send_recv", lambda a: _nbytes(a["tensor"])),
    "isend": ("send_recv", lambda a: _nbytes(a["tensor"])),
    "recv": ("send_recv", lambda a: 0),  # counted by the sender
    "irecv": ("send_recv", lambda a: 0),
}


@dataclass
class CommStats:
    """Bytes sent and number of calls by this rank, per collective kind (see KINDS)."""

    bytes: Counter = field(default_factory=Counter)
    calls: Counter = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.bytes.values())

    def as_dict(self) -> dict:
        return {
            "bytes": {k: int(self.bytes[k]) for k in KINDS},
            "total_bytes": int(self.total),
            "calls": {k: int(self.calls[k]) for k in KINDS},
        }


def _wrap(name: str, fn, stats: CommStats, state: threading.local):
    kind, volume = _RULES[name]
    signature = inspect.signature(fn)

    def counted(*args, **kwargs):
        depth = getattr(state, "depth", 0)
        if depth == 0:  # an inner call made by another wrapped collective is not new traffic
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            stats.bytes[kind] += volume(bound.arguments)
            stats.calls[kind] += 1
        state.depth = depth + 1
        try:
            return fn(*args, **kwargs)
        finally:
            state.depth = depth

    wrapper: Any = counted  # a function carrying attributes
    wrapper.__wrapped__ = fn
    if getattr(fn, "comm_rule", None):  # a nested count_comm counts it too
        wrapper.comm_rule = fn.comm_rule
    counted.__name__ = getattr(fn, "__name__", name)
    return counted


@contextlib.contextmanager
def count_comm():
    """Count the bytes this rank sends through torch.distributed inside the block."""
    stats, state = CommStats(), threading.local()  # nested contexts each count every call
    originals = {id(fn): (name, fn) for name in _RULES if (fn := getattr(dist, name, None)) is not None}
    wrappers = {key: _wrap(name, fn, stats, state) for key, (name, fn) in originals.items()}
    patched = []  # (module, attribute, original)
    for module in list(sys.modules.values()):
        try:
            items = list(vars(module).items())
        except TypeError:  # not a real module (some packages put other objects in sys.modules)
            continue
        for attr, value in items:
            rule = value.__dict__.get("comm_rule") if isinstance(value, types.FunctionType) else None
            if isinstance(rule, str) and rule in _RULES and id(value) not in wrappers:  # implemented outside torch
                originals[id(value)] = (rule, value)
                wrappers[id(value)] = _wrap(rule, value, stats, state)
            if id(value) in wrappers and value is originals[id(value)][1]:
                setattr(module, attr, wrappers[id(value)])
                patched.append((module, attr, value))
    try:
        yield stats
    finally:
        for module, attr, value in reversed(patched):
            setattr(module, attr, value)
