"""Compare a WeatherMixer on a DP x DOMAIN x TP mesh with its single-process twin.

    python -m weathermixer.selfcheck --dp 1 --domain 2 --tp 2 [--dtype fp32|bf16] [--optimizer adamw]

The check of jigsaw_ext.selfcheck (forward output, loss, input gradient, every parameter gradient,
parameters after 3 optimizer steps, each against the same block of the serial result) run on the
weather model. The default model has uneven shards on most meshes (25 x 24 grid, 2 x 3 patches
zero-padded to 13 patch rows), an empty static-channel shard on TP=3/4, the blend head, one history
input (model.history = 1: the states at t - dt and t) and a 2-step latent rollout, and its loss is the
latitude-weighted MSE of every lead.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch

from jigsaw_ext import selfcheck as generic
from jigsaw_ext.layout import Layout
from jigsaw_ext.selfcheck import Batch, SelfCheckTask

from .config import ChannelsConfig, ModelConfig


def default_model_config(**overrides) -> ModelConfig:
    base = dict(
        grid=(25, 24),
        patch=(2, 3),
        pad_to_patch=True,
        hidden=32,
        token_fraction=0.5,
        channel_fraction=1.5,
        blocks=2,
        rollout=2,
        head="blend",
        seed=1234,
        history=1,
        channels=ChannelsConfig(
            surface=["t2m", "u10"], atmospheric=["z", "t", "q"], levels=[500, 850], static=["lsm", "orography"]
        ),
    )
    base.update(overrides)
    return ModelConfig(**base)


@dataclass(frozen=True)
class WeatherTask(SelfCheckTask):
    cfg: ModelConfig = field(default_factory=default_model_config)
    autoregressive: bool = False  # roll out in data space (each lead fed back; the history window moves on)
    checkpoint: bool = False  # activation checkpointing across rollout steps

    def check_mesh(self, mesh) -> None:
        from .grid import Geometry

        Geometry(self.cfg, mesh)

    def build(self, mesh):
        from .model.mixer import WeatherMixer

        return WeatherMixer(self.cfg, mesh)

    def batch(self, size: int, gen: torch.Generator) -> Batch:
        C, S, k, h = self.cfg.channels.n_fields, self.cfg.channels.n_static, self.cfg.rollout, self.cfg.history
        window = torch.randn(size, h + 1, C, *self.cfg.grid, generator=gen)  # states t - h dt .. t
        static = torch.randn(size, S, *self.cfg.grid, generator=gen) if S else None
        state = window[:, -1]
        return Batch(
            [window if h else state, static],
            [state + 0.3 * (i + 1) * torch.randn(state.shape, generator=gen) for i in range(k)],
        )

    def layouts(self, model, size: int) -> Batch:
        geo, ch, h = model.geo, self.cfg.channels, self.cfg.history
        state = geo.grid_layout(ch.n_fields, size)
        window = Layout((size, h + 1, *state.shape[1:]), (None, None, *state.splits[1:])) if h else state
        return Batch([window, geo.grid_layout(ch.n_static, size) if ch.n_static else None], [state] * self.cfg.rollout)

    def forward_loss(self, model, batch: Batch, count: int):
        from .train.loss import latitude_weights, weighted_mse_term

        rows = model.geo.pixel_row_split.slice(model.mesh.coords["domain"])
        weights = latitude_weights(torch.linspace(-90, 90, self.cfg.grid[0]))[rows].to(batch.inputs[0].device)
        leads = model(
            *batch.inputs,
            every_lead=True,
            autoregressive=self.autoregressive,
            checkpoint=self.checkpoint,
            steps=self.cfg.rollout,
        )
        loss = sum(
            weighted_mse_term(p.float(), t, weights, count) for p, t in zip(leads, batch.targets, strict=True)
        ) / len(leads)
        return leads[-1], loss


def compare_with_serial(
    mesh_config, model_config: ModelConfig | None = None, dtype: str = "fp32", optimizer: str = "sgd", **task
) -> dict:
    """The generic comparison on the weather model (run on an initialised process group); `task`:
    autoregressive=, checkpoint= (WeatherTask's rollout options)."""
    return generic.compare_with_serial(
        WeatherTask(model_config or default_model_config(), **task), mesh_config, dtype, optimizer=optimizer
    )


def main(argv=None) -> int:
    return generic.main(
        argv, task=WeatherTask(), prog="python -m weathermixer.selfcheck", doc=__doc__, preload=("weathermixer.model",)
    )


if __name__ == "__main__":
    sys.exit(main())
