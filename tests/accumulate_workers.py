"""Workers of tests/integration/test_gradient_accumulation.py: gradient accumulation through the
DeepSpeed engine with the model-axis gradient reductions deferred to the last micro-batch
(mesh.reduce_gradients_once), against an independent serial twin, with every micro-batch's traffic
counted by jigsaw_ext.commstats."""

from __future__ import annotations

import contextlib
from collections import Counter

import torch

from jigsaw_ext.selfcheck import relative_error

GAS, MICRO, LR = 3, 2, 0.05


def _cfg():
    from weathermixer.selfcheck import default_model_config

    return default_model_config(rollout=1, history=0)  # one input state: the fields are (B, C, H, W)


def _batch(cfg, dp, step, micro):
    gen = torch.Generator().manual_seed(1000 * step + micro)
    C, S = cfg.channels.n_fields, cfg.channels.n_static
    n = MICRO * dp
    return (
        torch.randn(n, C, *cfg.grid, generator=gen),
        torch.randn(n, S, *cfg.grid, generator=gen),
        torch.randn(n, C, *cfg.grid, generator=gen),
    )


def _serial_steps(cfg, dp, steps):
    """Plain PyTorch on one process: each SGD step on the sum of GAS micro-batch losses / GAS (each
    micro-batch the dp replicas' samples together); the parameters after each step."""
    from jigsaw_ext.mesh import Mesh
    from weathermixer.model import WeatherMixer
    from weathermixer.train.loss import latitude_weights, weighted_mse_term

    serial = WeatherMixer(cfg, Mesh.single())
    opt = torch.optim.SGD(serial.parameters(), lr=LR, momentum=0.9)
    w = latitude_weights(torch.linspace(-90, 90, cfg.grid[0]))
    out = []
    for step in range(steps):
        opt.zero_grad()
        for i in range(GAS):
            x, s, y = _batch(cfg, dp, step, i)
            (weighted_mse_term(serial(x, s), y, w, y.numel()) / GAS).backward()
        opt.step()
        out.append({n: p.detach().clone() for n, p in serial.named_parameters()})
    return out


def _errors(model, ref, mesh):
    errs = {
        n: relative_error(p.detach(), p.block_layout.shard(ref[n], mesh.coords)) for n, p in model.named_parameters()
    }
    worst = max(errs, key=errs.get)
    return errs[worst], worst


def accumulator_elements(model, mesh) -> int:
    """fp32 elements held by the accumulators of a deferred micro-batch, from the layers' structure:
    each gathered weight its full-row gradient (every row of the storage axis x this rank's columns),
    each weight replicated over the storage axis and each small parameter its own size; stationary
    weights nothing (their gradients are never reduced)."""
    from jigsaw_ext.layers import BlockLinear
    from jigsaw_ext.mlp import BlockMLP

    n = 0
    for m in model.modules():
        storage = mesh.group(m.storage) if isinstance(m, (BlockLinear, BlockMLP)) else None
        if isinstance(m, BlockLinear) and storage is not None:
            n += sum(w.numel() if m.replicate else w.block_layout.shape[0] * w.shape[1] for w in m.weights)
        elif isinstance(m, BlockMLP) and m.strategy == "features" and storage is not None:
            n += m.fc1.weights[0].numel() + m.fc2.weights[0].numel()
    for p in model.parameters():
        axis = getattr(p, "shared_over", None)
        if axis is not None and mesh.group(axis) is not None:
            n += p.numel()
    return n


@contextlib.contextmanager
def _layer_calls():
    """Calls by kind of the collectives the layers issue (jigsaw_ext.collectives' three entry points,
    all over model-axis groups), apart from DeepSpeed's own (whose dp reductions also follow the
    gradients it is given: with dp = 1 they send no bytes, but they are calls)."""
    from jigsaw_ext import collectives

    names = {
        "_all_gather_single": "all_gather",
        "_reduce_scatter_single": "reduce_scatter",
        "_all_reduce": "all_reduce",
    }
    calls, saved = Counter(), {name: getattr(collectives, name) for name in names}

    def counting(fn, kind):
        def call(*args, **kwargs):
            calls[kind] += 1
            return fn(*args, **kwargs)

        return call

    for name, kind in names.items():
        setattr(collectives, name, counting(saved[name], kind))
    try:
        yield calls
    finally:
        for name, fn in saved.items():
            setattr(collectives, name, fn)


def _engine_case(dp, domain, tp, stage, strategy, replicate=(), on_steps=2, off_steps=1):
    """`on_steps` optimizer steps with mesh.reduce_gradients_once, then `off_steps` without, through
    engine forward / backward / step as the trainer runs them (jigsaw_ext.accumulate.accumulation)."""
    import deepspeed

    from jigsaw_ext.accumulate import accumulation, deferred_gradient_bytes
    from jigsaw_ext.commstats import count_comm
    from jigsaw_ext.mesh import MeshConfig, init_mesh
    from weathermixer.model import WeatherMixer
    from weathermixer.train.loss import latitude_weights, weighted_mse_term

    cfg = _cfg()
    mesh = init_mesh(
        MeshConfig(
            dp=dp,
            domain=domain,
            tp=tp,
            strategy={"*": strategy},
            reduce_gradients_once=True,
            replicate_weights_over=list(replicate),
        )
    )
    model = WeatherMixer(cfg, mesh, micro_batch=MICRO)
    ds_config = {
        "train_batch_size": MICRO * GAS * dp,
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": GAS,
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**9,
        "zero_allow_untested_optimizer": True,
        "optimizer": {"type": "SGD", "params": {"lr": LR, "momentum": 0.9}},
    }
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=ds_config, mpu=mesh.mpu()
    )
    ref = _serial_steps(cfg, dp, on_steps + off_steps)
    geo = model.geo
    w = latitude_weights(torch.linspace(-90, 90, cfg.grid[0]))[geo.pixel_row_split.slice(mesh.coords["domain"])]
    rows = slice(MICRO * mesh.coords["dp"], MICRO * mesh.coords["dp"] + MICRO)
    f_lay, s_lay = geo.grid_layout(cfg.channels.n_fields, MICRO), geo.grid_layout(cfg.channels.n_static, MICRO)
    out = {"calls": [], "bytes": [], "deferred_bytes": [], "err": []}
    for step in range(on_steps + off_steps):
        on = step < on_steps
        calls, sent, held = [], [], []
        with accumulation(model, GAS, on and mesh.reduce_gradients_once, engine) as defer:
            for i in range(GAS):
                x, s, y = _batch(cfg, dp, step, i)
                with count_comm() as stats, _layer_calls() as layer_calls:  # (count_comm patches first)
                    with defer(i):
                        pred = engine(f_lay.shard(x[rows], mesh.coords), s_lay.shard(s[rows], mesh.coords))
                    loss = weighted_mse_term(pred, f_lay.shard(y[rows], mesh.coords), w, y[rows].numel())
                    engine.backward(loss)
                    engine.step()
                calls.append({"all": dict(stats.calls), "layers": dict(layer_calls)})
                sent.append(dict(stats.bytes))
                held.append(deferred_gradient_bytes(model))
        held.append(deferred_gradient_bytes(model))  # after the step: nothing left
        out["calls"].append(calls)
        out["bytes"].append(sent)
        out["deferred_bytes"].append(held)
        out["err"].append(_errors(model, ref[step], mesh))
    out["global_steps"] = engine.global_steps
    out["accumulator_elements"] = accumulator_elements(model, mesh)
    engine.destroy()
    return out


def _exception_safety(domain, tp, strategy):
    """Without the engine: an exception inside an optimizer step leaves no accumulator behind (the
    next step's gradients equal a plain backward's); a step left with a deferred gradient never
    reduced raises; forwards without backward (validation) accumulate nothing."""
    from jigsaw_ext.accumulate import accumulation, defer_gradient_reductions, deferred_gradient_bytes
    from jigsaw_ext.mesh import MeshConfig, init_mesh
    from weathermixer.model import WeatherMixer

    cfg = _cfg()
    mesh = init_mesh(MeshConfig(domain=domain, tp=tp, strategy={"*": strategy}, reduce_gradients_once=True))
    model = WeatherMixer(cfg, mesh, micro_batch=MICRO)
    geo = model.geo
    f_lay, s_lay = geo.grid_layout(cfg.channels.n_fields, MICRO), geo.grid_layout(cfg.channels.n_static, MICRO)
    x, s, _ = _batch(cfg, 1, 0, 0)
    x, s = f_lay.shard(x, mesh.coords), s_lay.shard(s, mesh.coords)
    loss = lambda: model(x, s).square().sum()  # noqa: E731
    loss().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    out = {}
    try:
        with accumulation(model, GAS, True) as defer:
            with defer(0):
                value = loss()
            value.backward()
            out["held_mid_step"] = deferred_gradient_bytes(model)
            raise KeyError("a failure inside the optimizer step")
    except KeyError:
        pass
    out["held_after_exception"] = deferred_gradient_bytes(model)
    model.zero_grad(set_to_none=True)
    with accumulation(model, 1, True) as defer:
        with defer(0):
            value = loss()
        value.backward()
    out["grad_err"] = max(relative_error(p.grad, ref[n]) for n, p in model.named_parameters())
    try:
        with accumulation(model, GAS, True) as defer:
            with defer(0):
                value = loss()
            value.backward()
        out["unreduced_raises"] = False
    except RuntimeError:
        out["unreduced_raises"] = True
    with torch.no_grad(), defer_gradient_reductions(True):
        model(x, s)
    out["held_after_no_grad"] = deferred_gradient_bytes(model)
    return out


def accumulate_cases(rank, world, cases, safety=None):
    """Each case (dp, domain, tp, zero stage, strategy[, replicate_weights_over]) through _engine_case,
    in one process group;
    `safety` (domain, tp, strategy): the exception-safety checks too."""
    import deepspeed
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__ = {"deepspeed_shm_comm": False}
    deepspeed.init_distributed(dist_backend="gloo")
    out = {tuple(case): _engine_case(*case) for case in cases}
    if safety is not None:
        out["safety"] = _exception_safety(*safety)
    return out


def trainer_with_switch(rank, world, job_path, settings, twin_params):
    """The Trainer (as train.py runs it) with mesh.reduce_gradients_once, against the serial twin of
    tests/engine_workers.py; counts the backward uses whose reduction was deferred or flushed
    (jigsaw_ext.accumulate.local_gradient as the layers call it)."""
    from jigsaw_ext import collectives
    from tests.engine_workers import trainer_against_twin

    uses, original = Counter(), collectives.local_gradient

    def spy(captured, grad):
        out = original(captured, grad)
        uses["plain" if captured is None else "deferred" if out is None else "flushed"] += 1
        return out

    collectives.local_gradient = spy
    try:
        out = trainer_against_twin(rank, world, job_path, settings, twin_params)
    finally:
        collectives.local_gradient = original
    out["uses"] = dict(uses)
    return out
