"""Workers for tests/integration/test_engine_path.py: the training job's Trainer on a mesh, in-process (the
same code train.py runs), and an independent serial twin in plain PyTorch."""

from __future__ import annotations

import fnmatch
import math

import torch


def serial_twin(job_path: str, settings: list[str], steps: int) -> dict:
    """Plain PyTorch on one process: WeatherMixer on the whole globe, torch.optim.AdamW with the
    job's groups, linear warm-up + cosine schedule, global-norm clipping; each optimizer step
    accumulates the gradients of `gradient_accumulation_steps` micro batches of micro x dp samples
    (the samples that the dp replicas of the distributed run see at those micro steps). No
    DeepSpeed, no Trainer. Returns the parameters after `steps` steps and the gradient norms."""
    from jigsaw_ext.mesh import Mesh
    from weathermixer.data import Normalizer, ShardedSampleLoader
    from weathermixer.model import WeatherMixer
    from weathermixer.train.config import load_train_job
    from weathermixer.train.job import prepare_data
    from weathermixer.train.loss import channel_loss_weights, row_weights, weighted_loss_term

    torch.manual_seed(0)
    job, ds = load_train_job(job_path, settings=settings)
    tc, cfg = job.train, job.model
    dp, micro, gas = job.mesh.dp, ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
    data_cfg = prepare_data(job, rank=0)
    data_cfg = data_cfg.model_copy(update={"leads": max(data_cfg.leads or 0, job.rollout)})
    loader = ShardedSampleLoader(data_cfg, cfg, Mesh.single(), "train", batch=micro * dp, seed=tc.seed)
    stats = Normalizer.load(data_cfg.stats).stats
    w_lat, w_chan = (
        row_weights(loader.lat.copy(), slice(None), job.loss.latitude_weights, "cpu")[1],  # the loss's rows
        channel_loss_weights(cfg.channels, job.loss, stats),
    )

    model = WeatherMixer(cfg, Mesh.single())
    opt_params = ds["optimizer"]["params"]
    no_decay = [n for n, _ in model.named_parameters() if fnmatch.fnmatchcase(n, "*.bias") or "norm" in n]
    groups = [
        {"params": [p for n, p in model.named_parameters() if n not in no_decay]},
        {"params": [p for n, p in model.named_parameters() if n in no_decay], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(
        groups, lr=tc.lr, betas=opt_params["betas"], eps=opt_params["eps"], weight_decay=opt_params["weight_decay"]
    )

    def lr_factor(s):  # s optimizer steps taken
        if s < tc.warmup:
            return (s + 1) / (tc.warmup + 1)
        progress = min(1.0, (s - tc.warmup) / max(1, tc.steps - tc.warmup))
        return tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    clip, norms, K = ds.get("gradient_clipping", 0.0), [], job.rollout
    C, (H, W) = cfg.channels.n_fields, cfg.grid
    batches = iter(loader)
    for s in range(steps):
        for g in opt.param_groups:
            g["lr"] = tc.lr * lr_factor(s)
        opt.zero_grad()
        for _ in range(gas):
            sample = next(batches)
            x, st = sample.fields, sample.static
            z0 = model.embed(*[model.geo.patchify(x)] + ([model.geo.patchify(st)] if st is not None else []))
            z, loss = z0, 0.0
            for lead in range(K):  # latent rollout, every lead decoded, written out here on purpose
                for block in model.blocks:
                    z = block(z)
                loss = loss + weighted_loss_term(
                    model.decode(z, z0, x), sample.targets[lead], w_lat, w_chan, micro * dp * C * H * W
                )
            (loss / K / gas).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip else float("inf"))))
        opt.step()
    loader.stop()
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()}, "grad_norms": norms}


def trainer_against_twin(rank, world, job_path, settings, twin_params):
    """Run the Trainer (as train.py does) and compare this rank's block of every parameter's fp32
    master copy with the twin's. Also report DeepSpeed's ZeRO-3 trace state and micro-step count."""
    import deepspeed.ops
    from deepspeed.utils import safe_get_full_fp32_param

    from weathermixer.train.config import load_train_job
    from weathermixer.train.job import check_job
    from weathermixer.train.trainer import Trainer

    deepspeed.ops.__compatible_ops__ = {"deepspeed_shm_comm": False}
    job, ds = load_train_job(job_path, settings=settings)
    ds = check_job(job, ds, world, cuda=False)
    trainer = Trainer(job, ds, log=lambda *a, **k: None)
    result = trainer.run()
    assert result.exit_code == 0
    engine, coords = trainer.engine, trainer.mesh.coords
    errs = {}
    for name, p in trainer.model.named_parameters():
        mine = safe_get_full_fp32_param(p)  # collective under ZeRO-1/2/3
        mine = (p.detach() if mine is None else mine).float()
        want = p.block_layout.shard(twin_params[name], coords).float()
        errs[name] = ((mine - want).norm() / want.norm().clamp_min(1e-30)).item()
    out = {
        "max_err": max(errs.values()),
        "worst": max(errs, key=errs.get),
        "losses": result.losses,
        "global_steps": engine.global_steps,
        "micro_steps": engine.micro_steps,
    }
    offload = getattr(engine.optimizer, "parameter_offload", None)
    if offload is not None:
        coord = offload.get_param_coordinator()
        out["zero3_trace_complete"] = coord.is_complete_trace()
    return out
