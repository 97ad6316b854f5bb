"""Validation during training: latitude-weighted RMSE per channel and lead on held-out samples,
for the model and for persistence, summed over the whole world, in physical units for the
headline variables; the loss with the training weights. At the last step, the forecast's default
re-encoding interval, chosen on the same split.

    validator = Validator(job, mesh, data_cfg, engine, forecast, to_device, ...)   # what it needs, named
    if validator.should_validate(step):
        v = validator.validate()                                                     # collective
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
import torch.distributed as dist

from .loss import per_channel_sse, weighted_loss_term

FORECAST_DEFAULTS = "forecast_defaults.json"


def reencode_candidates(job) -> list[int]:
    K = job.rollout
    if job.validation.reencode_candidates is not None:
        return sorted({int(r) for r in job.validation.reencode_candidates if r >= 1})
    return sorted({2**i for i in range(K.bit_length()) if 2**i <= K} | {K})


@dataclass(eq=False)
class Validator:
    """Collective methods: every rank calls them together. Every forward goes through `engine`
    (eval mode during validation, train mode again afterwards)."""

    job: object  # TrainJobConfig
    mesh: object  # jigsaw_ext.mesh.Mesh
    data_cfg: object  # the data config the training split was opened with
    engine: object  # the DeepSpeed engine
    forecast: Callable  # (fields, static, k, times) -> k leads (the trainer's rollout through engine)
    to_device: Callable  # (tensor, dtype=None) -> the tensor on this rank's device
    dtype: torch.dtype  # the model's compute dtype
    device: torch.device
    chans: object  # this rank's channel indices
    w_lat: torch.Tensor  # latitude weights of this rank's rows
    w_chan: torch.Tensor  # per-channel loss weights of this rank's channels
    std: torch.Tensor  # per-channel standard deviation (physical units), ones without stats
    headline: list  # (label, channel index) reported in physical units
    defaults_dir: Path  # where forecast_defaults.json is written (the checkpoint folder)
    rank: int
    log: Callable = print
    val_data: object = field(default=None, init=False)  # opened at the first validation

    def should_validate(self, step: int) -> bool:
        """At the last step, and every validation.every steps."""
        every = self.job.validation.every
        return step == self.job.train.steps or bool(every and step % every == 0)

    def quota(self) -> int:
        """Validation samples per dp replica."""
        return math.ceil(self.job.validation.samples / self.mesh.size("dp"))

    def _loader(self, data_cfg, quota: int):
        from ..data import ShardedSampleLoader

        job = self.job
        return ShardedSampleLoader(
            data_cfg,
            job.model,
            self.mesh,
            "val",
            batch=min(job.validation.batch, quota),
            seed=job.train.seed,
            shuffle=False,
            infinite=False,
        )

    @torch.no_grad()
    def validate(self) -> dict:
        """Validation RMSE of the model and of persistence, and the loss with the training weights."""
        quota = self.quota()
        if self.val_data is None:
            self.val_data = self._loader(self.data_cfg, quota)
        self.engine.eval()
        try:
            sse, loss = self._sums(quota)
        finally:
            self.engine.train()
        dist.all_reduce(sse)
        dist.all_reduce(loss)
        return self._summary(sse, loss)

    def _sums(self, quota: int):
        """This rank's squared-error sums: sse[model|persistence, lead, channel], loss[weighted sum, samples]."""
        K, C = self.job.rollout, self.job.model.channels.n_fields
        sse = torch.zeros(2, K, C, dtype=torch.float64, device=self.device)
        loss = torch.zeros(2, dtype=torch.float64, device=self.device)
        data, seen = self.val_data, 0
        data.sampler.epoch, data.sampler.step = 0, 0
        for sample in data:
            if seen >= quota:
                break
            seen += len(sample.times)
            preds = self.forecast(
                self.to_device(sample.fields, self.dtype), self.to_device(sample.static, self.dtype), K, sample.times
            )
            x0 = self.to_device(sample.fields if sample.fields.dim() == 4 else sample.fields[:, -1])  # the state at t
            for lead, (p, y) in enumerate(zip(preds, sample.targets[: len(preds)], strict=True)):
                y = self.to_device(y)
                sse[0, lead, self.chans] += per_channel_sse(p.float(), y, self.w_lat)
                sse[1, lead, self.chans] += per_channel_sse(x0, y, self.w_lat)
                loss[0] += weighted_loss_term(p.float().double(), y.double(), self.w_lat, self.w_chan, 1)
            loss[1] += len(sample.times) / self.mesh.size("model")  # each rank of the model group counts them
        data.stop()
        return sse, loss

    def _summary(self, sse, loss) -> dict:
        K, C, (H, W) = self.job.rollout, self.job.model.channels.n_fields, self.job.model.grid
        n = loss[1].item()
        mse = (sse / (n * H * W)).cpu()
        phys = mse.sqrt() * self.std.view(1, 1, -1)
        out = {
            "samples": int(round(n)),
            "val_loss": loss[0].item() / (n * C * H * W * K),
            "rmse_norm_lead1": mse[0, 0].mean().sqrt().item(),
            "persistence_norm_lead1": mse[1, 0].mean().sqrt().item(),
            "headline": {},
        }
        hours = self.data_cfg.dt_hours
        for label, c in self.headline:
            for lead in range(K):
                out["headline"][f"{label}@{(lead + 1) * hours:g}h"] = (phys[0, lead, c].item(), phys[1, lead, c].item())
        return out

    @torch.no_grad()
    def reencode_scores(self, candidates: list[int], steps: int, quota: int) -> torch.Tensor:
        """Collective. Mean latitude- and channel-weighted MSE (normalised units) over forecast steps
        1..`steps` of each candidate re-encoding interval, on up to `quota` validation samples per dp
        replica; every forward goes through the engine."""
        from ..data.loader import static_at
        from ..model.mixer import next_window

        job, mesh = self.job, self.mesh
        loader = self._loader(self.data_cfg.model_copy(update={"leads": steps}), quota)
        dt = pd.Timedelta(hours=self.data_cfg.dt_hours)
        sums = torch.zeros(len(candidates) + 1, dtype=torch.float64, device=self.device)  # per candidate, samples
        self.engine.eval()
        try:
            seen = 0
            for sample in loader:
                if seen >= quota:
                    break
                seen += len(sample.times)
                for c, per_encode in enumerate(candidates):
                    x, done = self.to_device(sample.fields, self.dtype), 0
                    while done < steps:
                        k = min(per_encode, steps - done)
                        st = static_at(sample.static, loader, [t + done * dt for t in sample.times])
                        leads = self.engine(x, self.to_device(st, self.dtype), steps=k, every_lead=True)
                        for j, p in enumerate(leads):
                            y = self.to_device(sample.targets[done + j])
                            sums[c] += weighted_loss_term(p.float().double(), y.double(), self.w_lat, self.w_chan, 1)
                        for p in leads[-(job.model.history + 1) :] if job.model.history else []:
                            x = next_window(x, p)
                        x = x if job.model.history else leads[-1]
                        done += k
                sums[-1] += len(sample.times) / mesh.size("model")
        finally:
            loader.stop()
            self.engine.train()
        dist.all_reduce(sums)
        C, (H, W) = job.model.channels.n_fields, job.model.grid
        return (sums[:-1] / (sums[-1] * C * H * W * steps)).cpu()

    def choose_reencode_every(self, step: int) -> dict | None:
        """Collective, at the last training step only: score the re-encoding candidates on the validation
        split (reencode_scores) and write the best as the forecast's default to <checkpoint dir>/
        forecast_defaults.json (read by weathermixer.forecast). None when not due or the split is too short."""
        from jigsaw_ext.files import atomic_write_text

        from ..data import DataError

        job = self.job
        candidates = reencode_candidates(job)
        if step != job.train.steps or not candidates:
            return None
        steps = job.validation.reencode_steps or 4 * job.rollout
        try:
            mse = self.reencode_scores(candidates, steps, self.quota())
        except DataError as err:  # the same on every rank: the val split cannot serve `steps` leads
            if self.rank == 0:
                self.log(f"forecast re-encoding interval not chosen: {err}")
            return None
        best = candidates[int(torch.argmin(mse))]
        result = {
            "reencode_every": best,
            "chosen_at_step": step,
            "forecast_steps": steps,
            "dt_hours": self.data_cfg.dt_hours,
            "rollout_mode": job.train.rollout_mode,
            "mean_mse_normalised": {str(r): float(m) for r, m in zip(candidates, mse, strict=True)},
            "how": "validation split, mean latitude- and channel-weighted MSE over forecast steps 1..forecast_steps",
        }
        if self.rank == 0:
            self.defaults_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.defaults_dir / FORECAST_DEFAULTS, json.dumps(result, indent=1))
            self.log(
                f"forecast default: re-encode every {best} step(s) (validation MSE over {steps} steps: "
                + ", ".join(f"{r}: {m:.4g}" for r, m in zip(candidates, mse.tolist(), strict=True))
                + ")"
            )
        return result
