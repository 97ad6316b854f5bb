"""Validation during training: latitude-weighted RMSE per channel and lead on held-out samples,
for the model and for persistence, summed over the whole world, in physical units for the
headline variables; the loss with the training weights."""
from __future__ import annotations

import math

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
        trainer.val_data = ShardedSampleLoader(trainer.data_cfg, job.model, mesh, "val",
                                               batch=min(job.validation.batch, quota), seed=job.train.seed,
                                               shuffle=False, infinite=False)
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
        preds = trainer.forecast(trainer._to(sample.fields, trainer.dtype), trainer._to(sample.static, trainer.dtype), K)
        x0 = trainer._to(sample.fields)
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
    out = {"samples": int(round(n)), "val_loss": loss[0].item() / (n * C * H * W * K),
           "rmse_norm_lead1": mse[0, 0].mean().sqrt().item(),
           "persistence_norm_lead1": mse[1, 0].mean().sqrt().item(), "headline": {}}
    hours = trainer.data_cfg.dt_hours
    for label, c in trainer.headline:
        for lead in range(K):
            out["headline"][f"{label}@{(lead + 1) * hours:g}h"] = (phys[0, lead, c].item(), phys[1, lead, c].item())
    return out
