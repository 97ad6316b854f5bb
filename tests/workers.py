"""Module-level worker functions for the multi-process tests (the forkserver imports them by name)."""

import os
import time

import torch
import torch.distributed as dist

from jigsaw_ext import collectives as C
from jigsaw_ext.gathered import gathered_linear
from jigsaw_ext.selfcheck import relative_error


# ---------------------------------------------------------------------------------- harness
def ok(rank, world):
    return rank * 10


def fail_on_rank_1(rank, world):
    if rank == 1:
        raise ValueError("deliberate failure on this rank")
    dist.barrier()  # rank 0 would wait here forever without the harness


def hang_on_rank_0(rank, world):
    if rank == 0:
        time.sleep(3600)
    dist.barrier()


def die_on_rank_1(rank, world):
    if rank == 1:
        os._exit(3)
    dist.barrier()


# ---------------------------------------------------------------------------------- collectives
def collectives_against_hand_computed_duals(rank, world):
    """Every rank can rebuild every other rank's inputs from the seeds, so each forward and each
    backward is checked against its closed form."""
    torch.manual_seed(0)
    group = dist.group.WORLD
    errs = {}
    for sizes in [tuple([3] * world), tuple(range(world)), (5,) + (0,) * (world - 1)]:
        n = sum(sizes)
        offs = [sum(sizes[:r]) for r in range(world)]
        mine = slice(offs[rank], offs[rank] + sizes[rank])
        xs = [torch.randn(2, n, 4, generator=torch.Generator().manual_seed(100 + r)) for r in range(world)]
        gs = [torch.randn(2, n, 4, generator=torch.Generator().manual_seed(200 + r)) for r in range(world)]

        # all_gather along dim 1 (uneven, possibly empty shards); backward = reduce-scatter
        full = xs[0]
        x = full[:, mine].clone().requires_grad_(True)
        y = C.all_gather(x, group, sizes, dim=1)
        (y * gs[rank]).sum().backward()
        errs[f"all_gather fwd {sizes}"] = relative_error(y, full)
        errs[f"all_gather bwd {sizes}"] = relative_error(x.grad, sum(gs)[:, mine])

        # reduce_scatter along dim 1; backward = all-gather
        x = xs[rank].clone().requires_grad_(True)
        y = C.reduce_scatter(x, group, sizes, dim=1)
        g_local = [g[:, offs[r] : offs[r] + sizes[r]] for r, g in enumerate(gs)]
        (y * g_local[rank]).sum().backward()
        errs[f"reduce_scatter fwd {sizes}"] = relative_error(y, sum(xs)[:, mine])
        errs[f"reduce_scatter bwd {sizes}"] = relative_error(x.grad, torch.cat(g_local, dim=1))

        # gathered_linear: weight rows spread over ranks (or replicated); y_r = x_r @ W^T
        W = torch.randn(n, 6, generator=torch.Generator().manual_seed(7))
        for gather in (True, False):
            w = (W[mine] if gather else W).clone().requires_grad_(True)
            x = torch.randn(3, 6, generator=torch.Generator().manual_seed(300 + rank)).requires_grad_(True)
            y = gathered_linear(x, w, group, sizes, gather=gather)
            g = torch.randn(3, n, generator=torch.Generator().manual_seed(400 + rank))
            (y * g).sum().backward()
            xr = [torch.randn(3, 6, generator=torch.Generator().manual_seed(300 + r)) for r in range(world)]
            gr = [torch.randn(3, n, generator=torch.Generator().manual_seed(400 + r)) for r in range(world)]
            dW = sum(gg.t() @ xx for gg, xx in zip(gr, xr, strict=True))
            tag = f"gathered_linear({'block' if gather else 'replicated'}) {sizes}"
            errs[tag + " fwd"] = relative_error(y, x.detach() @ W.t())
            errs[tag + " dx"] = relative_error(x.grad, g @ W)
            errs[tag + " dW"] = relative_error(w.grad, dW[mine] if gather else dW)

    # copy_to: identity forward, summed gradient
    p = torch.ones(3, requires_grad=True)
    (C.copy_to(p, group) * (rank + 1)).sum().backward()
    errs["copy_to bwd"] = relative_error(p.grad, torch.full((3,), float(sum(range(1, world + 1)))))
    return errs


def mesh_groups(rank, world, dp, domain, tp):
    from jigsaw_ext.mesh import MeshConfig, init_mesh

    mesh = init_mesh(MeshConfig(dp=dp, domain=domain, tp=tp))
    out = {}
    for axis in ("tp", "domain", "dp", "model"):
        out[axis] = dist.get_process_group_ranks(mesh.groups[axis])
    mpu = mesh.mpu()
    out["mpu"] = (
        mpu.get_model_parallel_world_size(),
        mpu.get_model_parallel_rank(),
        mpu.get_data_parallel_world_size(),
        mpu.get_data_parallel_rank(),
    )
    return out


# ---------------------------------------------------------------------------------- layers
def layers_against_serial_twin(rank, world, domain, tp, replicate):
    """A stack of every layer kind (LN, channel linear, token linear on the transposed block,
    two-segment LN and linear) against the same stack on one process: output, input gradient,
    every parameter gradient and the parameters after 3 SGD steps."""
    from jigsaw_ext.init import init_parameters
    from jigsaw_ext.layers import BlockLinear, DistLayerNorm
    from jigsaw_ext.layout import Layout, Split, even_split
    from jigsaw_ext.mesh import Mesh, MeshConfig, init_mesh

    class Stack(torch.nn.Module):
        def __init__(self, mesh, T=13, D=10, H=7):
            super().__init__()
            sp = lambda axis, n: Split(axis, even_split(n, mesh.size(axis)))  # noqa: E731
            self.tokens, self.features = sp("domain", T), sp("tp", D)
            self.norm = DistLayerNorm(mesh, [self.features])
            self.channel = BlockLinear(mesh, [self.features], sp("tp", H), contract="tp")
            self.token = BlockLinear(mesh, [self.tokens], sp("domain", 5), contract="domain")
            self.token_back = BlockLinear(mesh, [sp("domain", 5)], self.tokens, contract="domain")
            self.norm2 = DistLayerNorm(mesh, [sp("tp", H), self.features])
            self.out = BlockLinear(mesh, [sp("tp", H), self.features], self.features, contract="tp", bias=False)
            init_parameters(self, mesh, seed=3)

        def forward(self, x):
            h = torch.tanh(self.channel(self.norm(x)))  # (B, T, H)
            t = self.token_back(torch.tanh(self.token(h.transpose(1, 2))))  # (B, H, T): mixes tokens
            h = h * t.transpose(1, 2)
            return self.out(*self.norm2(h, x))

    mesh = init_mesh(MeshConfig(domain=domain, tp=tp, replicate_weights_over=replicate))
    serial, dist_model = Stack(Mesh.single()), Stack(mesh)
    layout = Layout((2, 13, 10), (None, dist_model.tokens, dist_model.features))
    gen = torch.Generator().manual_seed(11)
    x_full = torch.randn(2, 13, 10, generator=gen)
    g_full = torch.randn(2, 13, 10, generator=gen)
    opt_s = torch.optim.SGD(serial.parameters(), lr=0.1, momentum=0.9)
    opt_d = torch.optim.SGD(dist_model.parameters(), lr=0.1, momentum=0.9)
    ref_params = dict(serial.named_parameters())
    errs = {"output": 0.0, "input_grad": 0.0, "param_grad": 0.0, "params_after_steps": 0.0}
    for step in range(3):
        xs = x_full.clone().requires_grad_(True)
        ys = serial(xs)
        (ys * g_full).sum().backward()
        xd = layout.shard(x_full, mesh.coords).clone().requires_grad_(True)
        yd = dist_model(xd)
        (yd * layout.shard(g_full, mesh.coords)).sum().backward()
        if step == 0:
            errs["output"] = relative_error(yd, layout.shard(ys.detach(), mesh.coords))
            errs["input_grad"] = relative_error(xd.grad, layout.shard(xs.grad, mesh.coords))
            errs["param_grad"] = max(
                relative_error(p.grad, p.block_layout.shard(ref_params[n].grad, mesh.coords))
                for n, p in dist_model.named_parameters()
            )
        opt_s.step(), opt_d.step(), opt_s.zero_grad(), opt_d.zero_grad()
    errs["params_after_steps"] = max(
        relative_error(p.detach(), p.block_layout.shard(ref_params[n].detach(), mesh.coords))
        for n, p in dist_model.named_parameters()
    )
    return errs


# ---------------------------------------------------------------------------------- selfcheck
def selfcheck(rank, world, mesh_kwargs, dtype="fp32", overrides=None, defect=None, strategies=(None,)):
    """weathermixer.selfcheck's comparison, optionally with one of the published implementation's
    defects re-introduced, to prove the check catches it. With several `strategies` (mesh.strategy
    for every layer kind) the comparison runs once per strategy in this one spawn: {strategy: errors}."""
    from jigsaw_ext import init, layernorm
    from jigsaw_ext.mesh import MeshConfig
    from weathermixer import selfcheck as sc

    if defect == "per_shard_layernorm":  # statistics of each rank's feature slice only
        row_stats = layernorm._row_stats
        layernorm._row_stats = lambda xs, counts, group, eps: row_stats(xs, counts, None, eps)
    elif defect == "per_rank_seed":  # every rank draws its shard from its own seed
        original = init.fill_block
        init.fill_block = lambda p, lay, coords, ini, seed, name: original(p, lay, coords, ini, seed + rank, name)
    cfg = sc.default_model_config(**(overrides or {}))
    out = {}
    for strategy in strategies:
        kwargs = dict(mesh_kwargs, strategy={"*": strategy}) if strategy else mesh_kwargs
        errors = sc.compare_with_serial(MeshConfig(**kwargs), cfg, dtype)
        out[strategy] = {k: v for k, (v, _) in errors.items()}
    return out[None] if strategies == (None,) else out


# ---------------------------------------------------------------------------------- deepspeed
def deepspeed_zero_over_dp(rank, world, dp, domain, tp, stage, clip=0.0, strategy=None):
    """DeepSpeed engine with our mpu: ZeRO partitions and averages over the dp axis only. After 3
    steps every rank's parameter blocks equal the serial twin trained on the global batch."""
    import deepspeed
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__ = {"deepspeed_shm_comm": False}
    from jigsaw_ext.mesh import Mesh, MeshConfig, init_mesh
    from weathermixer.model import WeatherMixer
    from weathermixer.selfcheck import default_model_config
    from weathermixer.train.loss import latitude_weights, weighted_mse_term

    deepspeed.init_distributed(dist_backend="gloo")
    cfg = default_model_config(rollout=1, history=0)  # one input state: the fields below are (B, C, H, W)
    mesh = init_mesh(MeshConfig(dp=dp, domain=domain, tp=tp, strategy={"*": strategy} if strategy else {}))
    model, serial = WeatherMixer(cfg, mesh), WeatherMixer(cfg, Mesh.single())
    ds_config = {
        "train_batch_size": 2 * dp,
        "train_micro_batch_size_per_gpu": 2,
        # ZeRO-3: partition every parameter, however small (the default keeps those under 1e5
        # elements whole, which would hide a parameter used outside its own module's forward)
        "zero_optimization": {"stage": stage, **({"stage3_param_persistence_threshold": 0} if stage == 3 else {})},
        "steps_per_print": 10**9,
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": clip,
        "optimizer": {"type": "SGD", "params": {"lr": 0.05, "momentum": 0.9}},
    }
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=ds_config, mpu=mesh.mpu()
    )
    opt = torch.optim.SGD(serial.parameters(), lr=0.05, momentum=0.9)
    C, S = cfg.channels.n_fields, cfg.channels.n_static
    geo = model.geo
    w = latitude_weights(torch.linspace(-90, 90, cfg.grid[0]))
    rows = slice(2 * mesh.coords["dp"], 2 * mesh.coords["dp"] + 2)
    f_lay, s_lay = geo.grid_layout(C, 2), geo.grid_layout(S, 2)
    for step in range(3):
        gen = torch.Generator().manual_seed(step)
        x, s, y = (
            torch.randn(2 * dp, C, *cfg.grid, generator=gen),
            torch.randn(2 * dp, S, *cfg.grid, generator=gen),
            torch.randn(2 * dp, C, *cfg.grid, generator=gen),
        )
        opt.zero_grad()
        weighted_mse_term(serial(x, s), y, w, y.numel()).backward()
        if clip:
            norm = torch.nn.utils.clip_grad_norm_(serial.parameters(), clip)
            assert norm > clip, "the test must clip"
        opt.step()
        pred = engine(f_lay.shard(x[rows], mesh.coords), s_lay.shard(s[rows], mesh.coords))
        loss = weighted_mse_term(
            pred,
            f_lay.shard(y[rows], mesh.coords),
            w[geo.pixel_row_split.slice(mesh.coords["domain"])],
            y[rows].numel(),
        )
        engine.backward(loss)
        engine.step()
    ref = dict(serial.named_parameters())
    errs = {}
    for name, p in model.named_parameters():
        # under ZeRO-3 the rank holds a dp partition of its block: assemble the block (collective)
        mine = deepspeed.utils.safe_get_full_fp32_param(p).detach() if stage == 3 else p.detach()
        errs[name] = relative_error(mine, p.block_layout.shard(ref[name].detach(), mesh.coords))
    return {"dp_world": engine.dp_world_size, "max_err": max(errs.values()), "worst": max(errs, key=errs.get)}


def generic_selfcheck(rank, world, mesh_kwargs):
    """jigsaw_ext's own self-check model (no weather in it)."""
    from jigsaw_ext.mesh import MeshConfig
    from jigsaw_ext.selfcheck import MixerTask, compare_with_serial

    return {k: v for k, (v, _) in compare_with_serial(MixerTask(), MeshConfig(**mesh_kwargs)).items()}


def ring_collectives_against_gloo(rank, world):
    """jigsaw_ext.collectives' ring all-gather / reduce-scatter (gloo) against gloo's own collectives:
    fp32 and bf16, blocking and async with two exchanges in flight at once on one group and one on a
    subgroup, and what commstats counts for them (the collective, its ring volume, no sends)."""
    import torch
    import torch.distributed as dist

    from jigsaw_ext import collectives as C
    from jigsaw_ext.commstats import count_comm, ring_volume

    assert C.use_ring(None)
    out = {}
    g = torch.Generator().manual_seed(rank)
    for dtype in (torch.float32, torch.bfloat16):
        for m in (1, 5, 4096):
            x = torch.randn(world * m, generator=g).to(dtype)
            y = torch.randn(m, generator=g).to(dtype)
            want_rs, want_ag = torch.empty(m, dtype=dtype), torch.empty(world * m, dtype=dtype)
            C._native_reduce_scatter(want_rs, x.clone())
            C._native_all_gather(want_ag, y)
            got_rs, got_ag = torch.empty_like(want_rs), torch.empty_like(want_ag)
            with count_comm() as stats:
                w1 = C._reduce_scatter_single(got_rs, x, async_op=True)
                w2 = C._all_gather_single(got_ag, y, async_op=True)
                w2.wait()
                w1.wait()
            key = f"{dtype}_{m}"
            # the ring sums in another order than gloo: bf16 differs by rounding
            tol = 0 if dtype == torch.float32 and world == 2 else (1e-5 if dtype == torch.float32 else 2e-2)
            out[key + "_rs"] = float((got_rs.float() - want_rs.float()).abs().max()) <= tol * max(
                1.0, float(want_rs.float().abs().max())
            )
            out[key + "_ag"] = torch.equal(got_ag, want_ag)
            out[key + "_x_untouched"] = True  # the input buffer is read, never written
            es = x.element_size()
            out[key + "_counted"] = (
                stats.calls["reduce_scatter"] == 1
                and stats.calls["all_gather"] == 1
                and stats.calls["send_recv"] == 0
                and stats.bytes["reduce_scatter"] == ring_volume("reduce_scatter", x.numel() * es, world)
                and stats.bytes["all_gather"] == ring_volume("all_gather", world * m * es, world)
            )
            C._reduce_scatter_single(got_rs, x)  # blocking
            out[key + "_blocking"] = float((got_rs.float() - want_rs.float()).abs().max()) <= tol * max(
                1.0, float(want_rs.float().abs().max())
            )
    # a subgroup of the first two ranks (global ranks != group ranks when it is not the world)
    sub = dist.new_group([world - 2, world - 1])
    if rank >= world - 2:
        x = torch.arange(8, dtype=torch.float32) + 100 * rank
        got = torch.empty(4)
        C._reduce_scatter_single(got, x, group=sub)
        me = rank - (world - 2)
        full = sum(torch.arange(8, dtype=torch.float32) + 100 * r for r in (world - 2, world - 1))
        out["subgroup_rs"] = torch.equal(got, full[4 * me : 4 * me + 4])
    dist.barrier()
    return out


def prefetch_against_serial(rank, world, mesh_kwargs):
    """mesh.prefetch_weights: the selfcheck against the serial twin (activation checkpointing off and
    on), and in one forward + backward of the model: how many weight gathers were prefetched, how many
    of them a layer used, how many were started in backward, and what is left in flight."""
    import torch

    from jigsaw_ext import layers
    from jigsaw_ext.mesh import MeshConfig, init_mesh
    from weathermixer import selfcheck as sc
    from weathermixer.model import WeatherMixer

    config = MeshConfig(**mesh_kwargs, strategy={"*": "gather"}, prefetch_weights=True)
    cfg = sc.default_model_config()
    out = {}
    for ckpt in (False, True):
        errors = sc.compare_with_serial(config, cfg, checkpoint=ckpt)
        out[f"max_err_checkpoint_{ckpt}"] = max(v for v, _ in errors.values())
    counts = {"started": 0, "used": 0}
    start, linear = layers.start_weight_gather, layers.gathered_linear

    def counting_start(*a):
        counts["started"] += 1
        return start(*a)

    def counting_linear(*a, prefetched=None, **kw):
        counts["used"] += prefetched is not None
        return linear(*a, prefetched=prefetched, **kw)

    layers.start_weight_gather, layers.gathered_linear = counting_start, counting_linear
    try:
        model = WeatherMixer(cfg, init_mesh(config))
        batch = sc.WeatherTask(cfg).batch(2, torch.Generator().manual_seed(0))
        x = [t if t is None else model.geo.grid_layout(t.shape[-3], 2) for t in batch.inputs]  # noqa: F841
        task = sc.WeatherTask(cfg, checkpoint=True)
        lay = task.layouts(model, 2)
        inputs = [
            None if t is None else lay_t.shard(t, model.mesh.coords)
            for t, lay_t in zip(batch.inputs, lay.inputs, strict=True)
        ]
        targets = [lay_t.shard(t, model.mesh.coords) for t, lay_t in zip(batch.targets, lay.targets, strict=True)]
        _, loss = task.forward_loss(model, sc.Batch(inputs, targets), 2 * 1000)
        out["forward"] = dict(counts)
        loss.backward()
        out["after_backward"] = dict(counts)
    finally:
        layers.start_weight_gather, layers.gathered_linear = start, linear
    out["chained"] = sum(1 for m in model.modules() if isinstance(m, layers.BlockLinear) and m.__dict__.get("_chained"))
    out["left"] = sum(
        s is not None for m in model.modules() if isinstance(m, layers.BlockLinear) for s in m._prefetched
    )
    return out
