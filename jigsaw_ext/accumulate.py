"""Gradient accumulation with the model-axis gradient reductions issued once per optimizer step
(mesh.reduce_gradients_once; DDP's / Megatron's no_sync, for the reductions over DOMAIN and TP).

With `gradient_accumulation_steps` = A > 1 every micro-batch's backward would otherwise reduce the
gradients of replicated and gathered parameters over the model axes: the reduce-scatter of each
gathered weight's full-row fp32 gradient (all-reduce when replicated), the all-reduce of weights
replicated over another axis (`linear_reduce_scatter`'s `replicas`) and the small-parameter
all-reduces (the bucket, or `copy_to` per use). These reductions are linear, so the sum of A reduced
gradients is the reduction of their sum:

    for i in range(A):
        with defer_gradient_reductions(i < A - 1):   # around the FORWARD of each micro-batch
            loss = engine(batch_i)
        engine.backward(loss); engine.step()

(the trainer: `with accumulation(model, A, mesh.reduce_gradients_once, engine) as defer:` and
`with defer(i):` around micro-batch i's forward). Under deferral the parameter enters its autograd
function detached (autograd has no edge to it: no `.grad`, no DeepSpeed gradient hook this
micro-batch); the function's backward adds this rank's local (unreduced) fp32 gradient to an
accumulator owned by the parameter. The boundary micro-batch's backward reduces (accumulator + its
own local gradient) once, returns that, and empties the accumulator. DeepSpeed therefore sees each
such parameter's gradient once per optimizer step, with the same value (with ZeRO-2 and dp > 1 its
dp reduction of them also happens once). The flag is read at forward time and kept in the autograd
node (on GPU, autograd runs backward in other threads, where no context variable of the forward is
visible). An accumulator still holding a gradient when the step ends (an exception inside the step)
is emptied by `accumulation`, so nothing stale reaches the next step.

Exempt (reduced every micro-batch, as before): parameters that ZeRO-3 partitions (they have `ds_id`:
a full-row accumulator per weight would undo the partitioning), tensors that are not leaves (no
owner to keep an accumulator on), and everything traced by torch.compile (a compiled model simply
keeps the per-micro-batch reductions).

Memory: one fp32 accumulator per deferred parameter from the first micro-batch to the last backward
of the step: the full-row gradient (rows of all `storage` ranks x this rank's columns) for each
gathered weight, the parameter's own size for replicated weights and small parameters
(`deferred_gradient_bytes` measures it).

A parameter used n times per forward (a latent rollout of k leads applies each block k times)
is reduced once per use in the boundary micro-batch (n reductions per step instead of n x A): the
first of its backward uses there takes the accumulator.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Sequence

import torch
import torch.nn as nn

_DEFER: contextvars.ContextVar[bool] = contextvars.ContextVar("jigsaw_defer_reductions", default=False)
_SLOT = "_jigsaw_deferred_grad"  # attribute of a parameter: {"grad": fp32 local gradient sum}


@contextlib.contextmanager
def defer_gradient_reductions(enabled: bool = True):
    """Forwards run inside (with enabled=True) record that their backward must not reduce parameter
    gradients over the model axes but add them to the parameters' accumulators."""
    token = _DEFER.set(bool(enabled))
    try:
        yield
    finally:
        _DEFER.reset(token)


def capture(param: torch.Tensor) -> tuple[dict, bool] | None:
    """At FORWARD time: (the parameter's accumulator, defer?) for its backward, or None for the
    plain per-micro-batch reduction (nothing deferred and nothing pending, no backward to come, or
    an exempt tensor)."""
    if (
        torch.compiler.is_compiling()
        or not torch.is_grad_enabled()
        or not (param.is_leaf and param.requires_grad)
        or hasattr(param, "ds_id")
    ):
        return None
    slot = getattr(param, _SLOT, None)
    if _DEFER.get():
        if slot is None:
            slot = {}
            setattr(param, _SLOT, slot)
        return slot, True
    return None if not slot else (slot, False)


def deferred_inputs(params: Sequence[torch.Tensor]) -> tuple[list, list, torch.Tensor | None]:
    """At FORWARD time, for the parameters one autograd function reduces the gradients of:
    (capture() of each, the tensors to pass in, an anchor or None). A deferred parameter is passed
    detached: autograd has no edge to it, so nothing sees a gradient for it in this micro-batch (not
    DeepSpeed's per-parameter gradient hooks either, which would find `.grad` None); the function's
    backward adds its local gradient to the accumulator instead. The anchor, an empty tensor that
    requires grad, keeps that backward running when no other input requires grad."""
    captured = [capture(p) for p in params]
    deferred = [c is not None and c[1] for c in captured]
    tensors = [p.detach() if d else p for p, d in zip(params, deferred, strict=True)]
    anchor = torch.empty(0, device=params[0].device, requires_grad=True) if any(deferred) else None
    return captured, tensors, anchor


def local_gradient(captured: tuple[dict, bool] | None, grad: torch.Tensor) -> torch.Tensor | None:
    """In BACKWARD, `grad` being this rank's fp32 local gradient that the caller owns (freshly
    computed: it may be kept or modified in place). Returns what to reduce now (grad plus the
    accumulator, which is emptied), or None when deferred (grad added to the accumulator)."""
    if captured is None:
        return grad
    slot, defer = captured
    acc = slot.pop("grad", None)
    if acc is not None:
        grad = acc.add_(grad)
    if defer:
        slot["grad"] = grad
        return None
    return grad


def _slots(module: nn.Module):
    for p in module.parameters():
        slot = getattr(p, _SLOT, None)
        if slot:
            yield p, slot


def deferred_gradient_bytes(module: nn.Module) -> int:
    """Bytes held now by the accumulators of `module`'s parameters."""
    return sum(s["grad"].numel() * s["grad"].element_size() for _, s in _slots(module))


def drop_deferred_gradients(module: nn.Module) -> int:
    """Empty every accumulator of `module` (after an exception inside an optimizer step: a stale
    accumulator would otherwise be added to the next step's gradients). Returns how many were not
    empty."""
    dropped = 0
    for _, slot in _slots(module):
        slot.clear()
        dropped += 1
    return dropped


def _zero_buckets_ready(engine) -> None:
    """DeepSpeed ZeRO-2 (0.19) sets up its gradient buckets at the first gradient hook of a backward
    and fails in that backward's epilogue when none fired: the case of a micro-batch whose every
    parameter gradient is deferred (every weight gathered or replicated, e.g. on 1x2x2). Set them
    up before such a backward, as that first hook would (idempotent when one fires after all)."""
    optimizer = getattr(engine, "optimizer", None)
    setup = getattr(optimizer, "setup_buckets", None)
    if setup is not None and engine.zero_optimization_partition_gradients():
        setup()


@contextlib.contextmanager
def accumulation(module: nn.Module, steps: int, enabled: bool, engine=None):
    """One optimizer step of `steps` micro-batches; yields defer(i), the context for the forward of
    micro-batch i (deferring for i < steps - 1 when enabled; `engine`: the DeepSpeed engine, see
    _zero_buckets_ready). On leaving, every accumulator is emptied; leaving normally with one still
    holding a gradient (a parameter used in an earlier micro-batch but not in the last) raises
    instead of losing it silently."""

    def defer(i: int):
        deferring = enabled and i < steps - 1
        if deferring and engine is not None:
            _zero_buckets_ready(engine)
        return defer_gradient_reductions(deferring)

    try:
        yield defer
    except BaseException:
        drop_deferred_gradients(module)
        raise
    if drop_deferred_gradients(module):
        raise RuntimeError(
            "a deferred gradient was never reduced: a parameter was used in an earlier "
            "micro-batch of the optimizer step but not in the last (mesh.reduce_gradients_once)"
        )
