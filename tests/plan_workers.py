"""Workers of tests/integration/test_plan.py: what a real CPU run sends, counted by jigsaw_ext.commstats."""

import torch


def _inputs(model, mesh, cfg, batch, seed=0):
    gen = torch.Generator().manual_seed(seed)
    geo, ch = model.geo, cfg.channels
    x = torch.randn(geo.grid_layout(ch.n_fields, batch).local_shape(mesh.coords), generator=gen)
    s = torch.randn(geo.grid_layout(ch.n_static, batch).local_shape(mesh.coords), generator=gen)
    return x, s


def model_step_comm(rank, world, mesh_kwargs, overrides, batch, strategies=("gather", "stationary", "features")):
    """Bytes and calls per collective kind of one forward + backward of the model on a real mesh,
    for each strategy forced on every layer kind: {strategy: stats}."""
    from jigsaw_ext.commstats import count_comm
    from jigsaw_ext.mesh import MeshConfig, init_mesh
    from weathermixer.model import WeatherMixer
    from weathermixer.selfcheck import default_model_config

    cfg = default_model_config(**overrides)
    out = {}
    groups = init_mesh(MeshConfig(**mesh_kwargs))
    for strategy in strategies:
        mesh = groups.with_options(strategy={"*": strategy})
        model = WeatherMixer(cfg, mesh, micro_batch=batch)
        x, s = _inputs(model, mesh, cfg, batch)
        with count_comm() as stats:
            model(x, s, steps=cfg.rollout).float().square().sum().backward()
        out[strategy] = stats.as_dict()
    return out


def engine_step_comm(rank, world, mesh_kwargs, overrides, batch, zero):
    """Bytes per kind of the second training step through a DeepSpeed engine (ZeRO `zero`)."""
    import deepspeed
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__ = {"deepspeed_shm_comm": False}
    from jigsaw_ext.commstats import count_comm
    from jigsaw_ext.mesh import MeshConfig, init_mesh
    from weathermixer.model import WeatherMixer
    from weathermixer.selfcheck import default_model_config

    deepspeed.init_distributed(dist_backend="gloo")
    cfg = default_model_config(**overrides)
    mesh = init_mesh(MeshConfig(**mesh_kwargs))
    model = WeatherMixer(cfg, mesh, micro_batch=batch)
    ds_config = {
        "train_micro_batch_size_per_gpu": batch,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": zero},
        "steps_per_print": 10**9,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
    }
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=ds_config, mpu=mesh.mpu()
    )
    x, s = _inputs(model, mesh, cfg, batch)
    out = []
    for _ in range(2):
        with count_comm() as stats:
            engine.backward(engine(x, s, steps=cfg.rollout).float().square().sum())
            engine.step()
        out.append(stats.as_dict())
    return out[-1]


def model_step_flops(rank, world, meshes, overrides, batch, configs):
    """FlopCounterMode's count of one forward and of its backward on every mesh (dp x domain x tp, over
    all `world` ranks) and mesh setting in `configs`: {(mesh, config): (forward, backward)}."""
    from torch.utils.flop_counter import FlopCounterMode

    from jigsaw_ext.mesh import MeshConfig, init_mesh
    from jigsaw_ext.plan.trace import in_place_flop_formulas
    from weathermixer.model import WeatherMixer
    from weathermixer.selfcheck import default_model_config

    cfg = default_model_config(**overrides)
    out = {}
    for dims in meshes:
        groups = init_mesh(MeshConfig(dp=dims[0], domain=dims[1], tp=dims[2]))  # once per mesh: collective, slow
        for name, settings in configs.items():
            if any(dims[1 if axis == "domain" else 2] == 1 for axis in settings.get("replicate_weights_over", ())):
                continue  # nothing to replicate over
            mesh = groups.with_options(**settings)
            model = WeatherMixer(cfg, mesh, micro_batch=batch)
            x, s = _inputs(model, mesh, cfg, batch)
            # (FlopCounterMode leaves out in-place products such as addmm_; counted here like their
            # out-of-place forms, which the conservation test in tests/unit/test_plan_work.py holds)
            with FlopCounterMode(display=False, custom_mapping=in_place_flop_formulas()) as fwd:
                loss = model(x, s, steps=cfg.rollout).float().square().sum()
            with FlopCounterMode(display=False, custom_mapping=in_place_flop_formulas()) as bwd:
                loss.backward()
            out[(dims, name)] = (fwd.get_total_flops(), bwd.get_total_flops())
    return out
