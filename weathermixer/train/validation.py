"""Validation during training: latitude-weighted RMSE per channel and lead on held-out samples,
for the model and for persistence, summed over the whole world, in physical units for the
headline variables; the loss with the training weights."""

from __future__ import annotations

import json
import math

import pandas as pd
import torch
import torch.distributed as dist

from .loss import per_channel_sse, weighted_loss_term


@torch.no_grad()
def validate(trainer) -> dict:
    """Collective. Every forward goes through the trainer's engine (eval mode)."""
    from ..data import ShardedSampleLoader

    job, mesh = trainer.job, trainer.mesh
    quota = math.ceil(job.validation.samples / mesh.size("dp"))  # samples per dp replica
    if getattr(trainer, "val_data", None) is None:
        trainer.val_data = ShardedSampleLoader(
            trainer.data_cfg,
            job.model,
            mesh,
            "val",
            batch=min(job.validation.batch, quota),
            seed=job.train.seed,
            shuffle=False,
            infinite=False,
        )
    trainer.engine.eval()
    try:
        sse, loss = _sums(trainer, quota)
    finally:
        trainer.engine.train()
    dist.all_reduce(sse)
    dist.all_reduce(loss)
    return _summary(trainer, sse, loss)


def _sums(trainer, quota: int):
    """This rank's squared-error sums: sse[model|persistence, lead, channel], loss[weighted sum, samples]."""
    K, C = trainer.job.rollout, trainer.job.model.channels.n_fields
    sse = torch.zeros(2, K, C, dtype=torch.float64, device=trainer.device)
    loss = torch.zeros(2, dtype=torch.float64, device=trainer.device)
    data, seen = trainer.val_data, 0
    data.sampler.epoch, data.sampler.step = 0, 0
    for sample in data:
        if seen >= quota:
            break
        seen += len(sample.times)
        preds = trainer.forecast(
            trainer._to(sample.fields, trainer.dtype), trainer._to(sample.static, trainer.dtype), K, sample.times
        )
        x0 = trainer._to(sample.fields if sample.fields.dim() == 4 else sample.fields[:, -1])  # the state at t
        for lead, (p, y) in enumerate(zip(preds, sample.targets)):
            y = trainer._to(y)
            sse[0, lead, trainer.chans] += per_channel_sse(p.float(), y, trainer.w_lat)
            sse[1, lead, trainer.chans] += per_channel_sse(x0, y, trainer.w_lat)
            loss[0] += weighted_loss_term(p.float().double(), y.double(), trainer.w_lat, trainer.w_chan, 1)
        loss[1] += len(sample.times) / trainer.mesh.size("model")  # each rank of the model group counts them
    data.stop()
    return sse, loss


def _summary(trainer, sse, loss) -> dict:
    K, C, (H, W) = trainer.job.rollout, trainer.job.model.channels.n_fields, trainer.job.model.grid
    n = loss[1].item()
    mse = (sse / (n * H * W)).cpu()
    phys = mse.sqrt() * trainer.std.view(1, 1, -1)
    out = {
        "samples": int(round(n)),
        "val_loss": loss[0].item() / (n * C * H * W * K),
        "rmse_norm_lead1": mse[0, 0].mean().sqrt().item(),
        "persistence_norm_lead1": mse[1, 0].mean().sqrt().item(),
        "headline": {},
    }
    hours = trainer.data_cfg.dt_hours
    for label, c in trainer.headline:
        for lead in range(K):
            out["headline"][f"{label}@{(lead + 1) * hours:g}h"] = (phys[0, lead, c].item(), phys[1, lead, c].item())
    return out


# the forecast's re-encoding interval -------------------------------------------------------------
FORECAST_DEFAULTS = "forecast_defaults.json"


def reencode_candidates(job) -> list[int]:
    K = job.rollout
    if job.validation.reencode_candidates is not None:
        return sorted({int(r) for r in job.validation.reencode_candidates if r >= 1})
    return sorted({2**i for i in range(K.bit_length()) if 2**i <= K} | {K})


@torch.no_grad()
def reencode_scores(trainer, candidates: list[int], steps: int, quota: int) -> torch.Tensor:
    """Collective. Mean latitude- and channel-weighted MSE (normalised units) over forecast steps
    1..`steps` of each candidate re-encoding interval, on up to `quota` validation samples per dp
    replica; every forward goes through the engine."""
    from ..data import ShardedSampleLoader
    from ..data.loader import static_at
    from ..model.mixer import next_window

    job, mesh = trainer.job, trainer.mesh
    loader = ShardedSampleLoader(
        trainer.data_cfg.model_copy(update={"leads": steps}),
        job.model,
        mesh,
        "val",
        batch=min(job.validation.batch, quota),
        seed=job.train.seed,
        shuffle=False,
        infinite=False,
    )
    dt = pd.Timedelta(hours=trainer.data_cfg.dt_hours)
    sums = torch.zeros(len(candidates) + 1, dtype=torch.float64, device=trainer.device)  # per candidate, samples
    trainer.engine.eval()
    try:
        seen = 0
        for sample in loader:
            if seen >= quota:
                break
            seen += len(sample.times)
            for c, per_encode in enumerate(candidates):
                x, done = trainer._to(sample.fields, trainer.dtype), 0
                while done < steps:
                    k = min(per_encode, steps - done)
                    st = static_at(sample.static, loader, [t + done * dt for t in sample.times])
                    leads = trainer.engine(x, trainer._to(st, trainer.dtype), steps=k, every_lead=True)
                    for j, p in enumerate(leads):
                        y = trainer._to(sample.targets[done + j])
                        sums[c] += weighted_loss_term(p.float().double(), y.double(), trainer.w_lat, trainer.w_chan, 1)
                    for p in leads[-(job.model.history + 1) :] if job.model.history else []:
                        x = next_window(x, p)
                    x = x if job.model.history else leads[-1]
                    done += k
            sums[-1] += len(sample.times) / mesh.size("model")
    finally:
        loader.stop()
        trainer.engine.train()
    dist.all_reduce(sums)
    C, (H, W) = job.model.channels.n_fields, job.model.grid
    return (sums[:-1] / (sums[-1] * C * H * W * steps)).cpu()


def choose_reencode_every(trainer, step: int) -> dict | None:
    """Collective, at the last training step only: score the re-encoding candidates on the validation
    split (reencode_scores) and write the best as the forecast's default to <checkpoint dir>/
    forecast_defaults.json (read by weathermixer.forecast). None when not due or the split is too short."""
    from jigsaw_ext.files import atomic_write_text

    from ..data import DataError

    job = trainer.job
    candidates = reencode_candidates(job)
    if step != job.train.steps or not candidates:
        return None
    steps = job.validation.reencode_steps or 4 * job.rollout
    quota = math.ceil(job.validation.samples / trainer.mesh.size("dp"))
    try:
        mse = reencode_scores(trainer, candidates, steps, quota)
    except DataError as err:  # the same on every rank: the val split cannot serve `steps` leads
        if trainer.rank == 0:
            trainer.log(f"forecast re-encoding interval not chosen: {err}")
        return None
    best = candidates[int(torch.argmin(mse))]
    result = {
        "reencode_every": best,
        "chosen_at_step": step,
        "forecast_steps": steps,
        "dt_hours": trainer.data_cfg.dt_hours,
        "rollout_mode": job.train.rollout_mode,
        "mean_mse_normalised": {str(r): float(m) for r, m in zip(candidates, mse)},
        "how": "validation split, mean latitude- and channel-weighted MSE over forecast steps 1..forecast_steps",
    }
    if trainer.rank == 0:
        trainer.ckpt.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(trainer.ckpt.root / FORECAST_DEFAULTS, json.dumps(result, indent=1))
        trainer.log(
            f"forecast default: re-encode every {best} step(s) (validation MSE over {steps} steps: "
            + ", ".join(f"{r}: {m:.4g}" for r, m in zip(candidates, mse.tolist()))
            + ")"
        )
    return result
