"""WeatherMixer: patch embedding, token- and channel-mixing MLP blocks, latent rollout, decoder.

The model reads like the paper; parallelism lives in the layers (jigsaw_ext.layers). Activations
are blocks: (batch, tokens of this rank's latitude band, features of this rank's TP slice).
On the 1x1x1 mesh every collective is the identity and this is a plain MLP-Mixer.
With model.history = h the embedding takes the states t - h dt .. t as h + 1 input segments (the
residual and the blend head use the state at t).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from jigsaw_ext.init import init_parameters
from jigsaw_ext.layers import BlockLinear, DistLayerNorm, bucket_small_gradients, link_weight_prefetch
from jigsaw_ext.mesh import Mesh
from jigsaw_ext.mlp import BlockMLP, check_strategy_keys

from ..config import ModelConfig
from ..grid import Geometry
from .skip import PixelSkip, load_initial_coefficients, skip_num_parameters


class MixerBlock(nn.Module):
    """Pre-norm MLP-Mixer block on x of shape (B, T, D):
    token mixing   x += W2 . GELU(W1 . LN1(x)^T)      (over tokens, split over DOMAIN)
    channel mixing x += GELU(LN2(x) A1^T) A2^T        (over features, split over TP)
    Each MLP picks how it meets its data on this mesh and micro-batch (jigsaw_ext.mlp.BlockMLP)."""

    def __init__(self, geo: Geometry, micro_batch: int = 1, **kw):
        super().__init__()
        mesh, D = geo.mesh, geo.cfg.hidden
        features, tokens = geo.feature_split(D), geo.token_split
        # no bias on the token-mixing output: it would add a per-token constant across all features,
        # which every following LayerNorm removes (a dead parameter whose gradient is exactly 0)
        token_mixing = BlockMLP(
            mesh,
            "token_mixing",
            tokens,
            geo.token_hidden,
            row_split=features,
            row_dim=1,
            contract="domain",
            fc2_bias=False,
            micro_batch=micro_batch,
            norm="rows",
            **kw,
        )
        channel_mixing = BlockMLP(
            mesh,
            "channel_mixing",
            features,
            geo.channel_hidden,
            row_split=tokens,
            row_dim=1,
            contract="tp",
            micro_batch=micro_batch,
            norm="features",
            **kw,
        )
        # each LayerNorm is computed where its MLP's strategy has the whole feature axis (local=True)
        self.norm1 = DistLayerNorm(mesh, [features], local=token_mixing.fuses_norm, **kw)
        self.token_mixing = token_mixing
        self.norm2 = DistLayerNorm(mesh, [features], local=channel_mixing.fuses_norm, **kw)
        self.channel_mixing = channel_mixing

    def forward(self, x):
        x = x + self.token_mixing(x.transpose(1, 2), self.norm1).transpose(1, 2)
        return x + self.channel_mixing(x, self.norm2)


class BlendHead(nn.Module):
    """Learned per-pixel blend of prediction and input: Linear_{2C->C}(LN([LN(pred) || input]))."""

    def __init__(self, geo: Geometry, **kw):
        super().__init__()
        channels = geo.channel_split(geo.cfg.channels.n_fields)
        self.norm_pred = DistLayerNorm(geo.mesh, [channels], **kw)
        self.norm = DistLayerNorm(geo.mesh, [channels, channels], **kw)
        self.mix = BlockLinear(geo.mesh, [channels, channels], channels, contract="tp", **kw)

    def forward(self, pred, fields):
        pred, fields = pred.movedim(1, -1), fields.movedim(1, -1)  # channels last, per pixel
        return self.mix(*self.norm(self.norm_pred(pred), fields)).movedim(-1, 1)


def next_window(window: torch.Tensor, new_state: torch.Tensor) -> torch.Tensor:
    """The input window (B, h + 1, C, rows, lon) one step on: drop the oldest state, append `new_state`."""
    return torch.cat([window[:, 1:], new_state.unsqueeze(1)], dim=1)


class WeatherMixer(nn.Module):
    def __init__(self, cfg: ModelConfig, mesh: Mesh | None = None, device=None, dtype=None, micro_batch: int = 1):
        """micro_batch: the samples per forward the mixing MLPs choose their strategy for (mesh.strategy)."""
        super().__init__()
        mesh = mesh or Mesh.single()
        self.cfg, self.mesh = cfg, mesh
        self.geo = geo = Geometry(cfg, mesh)
        kw = dict(device=device, dtype=dtype)
        ch = cfg.channels
        features = geo.feature_split(cfg.hidden)
        # one input segment per time (t - history*dt .. t), then the static channels
        inputs = [geo.patch_feature_split(ch.n_fields)] * (cfg.history + 1) + (
            [geo.patch_feature_split(ch.n_static)] if ch.n_static else []
        )
        patch_out = geo.patch_feature_split(ch.n_fields)

        self.embed = BlockLinear(mesh, inputs, features, contract="tp", **kw)
        self.blocks = nn.ModuleList(MixerBlock(geo, micro_batch, **kw) for _ in range(cfg.blocks))
        self.norm = DistLayerNorm(mesh, [features], **kw)
        self.recovery = BlockLinear(mesh, [features, features], patch_out, contract="tp", **kw)
        self.blend = BlendHead(geo, **kw) if cfg.head == "blend" else None
        self.skip = PixelSkip(geo, **kw) if cfg.pixel_skip else None
        if device is None or torch.device(device).type != "meta":
            init_parameters(self, mesh, cfg.seed)
            if self.skip is not None and cfg.pixel_skip_init:
                load_initial_coefficients(self.skip, cfg.pixel_skip_init)
                if cfg.pixel_skip_zero_start:  # the network's tendency starts at 0: the model is the fit
                    self.zero_tendency()
        check_strategy_keys(self, mesh)
        bucket_small_gradients(self, mesh)  # one gradient all-reduce per axis for all biases and norms
        if mesh.prefetch_weights:  # each gathered layer starts the next one's weight gather
            link_weight_prefetch(self)

    # ------------------------------------------------------------------------------------------
    def forward(
        self,
        fields: torch.Tensor,
        static: torch.Tensor | None = None,
        steps: int | None = None,
        every_lead: bool = False,
        autoregressive: bool = False,
        checkpoint: bool = False,
    ):
        """Forecast `steps` time steps (default cfg.rollout) ahead of the state `fields`: the last lead,
        or the list of every lead. The one entry point, so a DeepSpeed engine wraps every use.

        Latent rollout: embed once, apply the block stack `steps` times, decode each lead.
        autoregressive: each decoded lead is fed back in as the next input (one step at a time; with
        history the input window moves on by one state).
        fields: (B, n_fields_local, rows_local, lon) this rank's block, or with model.history = h
        (B, h + 1, n_fields_local, rows_local, lon) ordered t - h dt .. t; static like the former.
        checkpoint: keep only each rollout step's input for backward and recompute the step's
        activations there (activation checkpointing across rollout steps: memory of one step, about
        one more forward of the block stack in compute)."""
        if autoregressive:
            leads, x = [], fields
            for _ in range(steps or 1):
                y = self.forecast_leads(x, static, 1, checkpoint=checkpoint)[0]
                leads.append(y)
                x = next_window(x, y) if self.cfg.history else y
        else:
            leads = self.forecast_leads(fields, static, steps, every_lead, checkpoint)
        return leads if every_lead else leads[-1]

    def forecast_leads(
        self, fields, static=None, steps=None, every_lead=True, checkpoint: bool = False
    ) -> list[torch.Tensor]:
        """Latent rollout: embed once, apply the block stack `steps` times, decode each lead
        (or only the last one)."""
        steps = steps or self.cfg.rollout
        if (static is None) != (self.cfg.channels.n_static == 0):
            raise ValueError(
                f"model expects {self.cfg.channels.n_static} static channels "
                f"(model.channels.static), got {'none' if static is None else 'a tensor'}"
            )
        states = self._states(fields)
        inputs = [self.geo.patchify(x) for x in states] + ([self.geo.patchify(static)] if static is not None else [])
        z0 = self.embed(*inputs)
        z, leads = z0, []
        for step in range(1, steps + 1):
            z = torch_checkpoint(self.block_stack, z, use_reentrant=False) if checkpoint else self.block_stack(z)
            if every_lead or step == steps:
                leads.append(self.decode(z, z0, states[-1], states, static, step))
        return leads

    def block_stack(self, z):
        for block in self.blocks:
            z = block(z)
        return z

    def _states(self, fields) -> list[torch.Tensor]:
        """The input states t - h dt .. t as a list of (B, C, rows, lon) blocks."""
        h = self.cfg.history
        if h == 0 and fields.dim() == 4:
            return [fields]
        if fields.dim() != 5 or fields.shape[1] != h + 1:
            raise ValueError(
                f"model.history={h} expects fields of shape (batch, {h + 1} times, channels, rows, "
                f"lon)"
                + (" or (batch, channels, rows, lon)" if h == 0 else "")
                + f", got {tuple(fields.shape)} (data.history must match model.history)"
            )
        return list(fields.unbind(1))

    def decode(self, z, z0, fields, states=None, static=None, lead: int = 1):
        """The state at lead `lead`: the decoded tendency added to (or blended with) `fields`, or with
        model.pixel_skip to the skip head's per-pixel linear function of the input `states` (t - h dt .. t)."""
        pred = self.geo.unpatchify(self.recovery(self.norm(z), z0))
        if self.skip is not None:
            fields = self.skip(states if states is not None else [fields], static, lead)
        return pred + fields if self.blend is None else self.blend(pred, fields)

    @torch.no_grad()
    def zero_tendency(self) -> None:
        """The decoder's weights and bias (this rank's blocks) set to 0: the network adds nothing, and a
        model with the skip head forecasts with the head alone (pixel_skip_zero_start, --skip-only)."""
        for p in self.recovery.parameters():
            p.zero_()

    # exact sizes -------------------------------------------------------------------------------
    def num_parameters(self) -> int:
        return num_parameters(self.cfg)

    def flops_per_sample(self, steps: int | None = None, all_leads: bool = False) -> int:
        return flops_per_sample(self.cfg, steps, all_leads)

    def local_num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def num_parameters(cfg: ModelConfig) -> int:
    """Exact logical parameter count (independent of the mesh)."""
    g = Geometry(cfg, Mesh.single())
    T, D, Hs, Hc, P = g.tokens, cfg.hidden, g.token_hidden, g.channel_hidden, g.patch_pixels
    C, S = cfg.channels.n_fields, cfg.channels.n_static
    embed = ((cfg.history + 1) * C + S) * P * D + D
    block = 2 * T * Hs + Hs + 2 * D * Hc + Hc + D + 4 * D  # the paper's count has + T (see MixerBlock)
    recovery = 2 * D * C * P + C * P
    head = 0 if cfg.head == "tendency" else 2 * C + 4 * C + 2 * C * C + C
    return embed + cfg.blocks * block + 2 * D + recovery + head + skip_num_parameters(cfg)


def flops_per_sample(cfg: ModelConfig, steps: int | None = None, all_leads: bool = False) -> int:
    """Exact matmul FLOPs (2 per multiply-add) of one forward pass for one sample.

    all_leads=True counts decoding every lead of the rollout (rollout training), else only the last."""
    g = Geometry(cfg, Mesh.single())
    steps = steps or cfg.rollout
    T, D, Hs, Hc, P = g.tokens, cfg.hidden, g.token_hidden, g.channel_hidden, g.patch_pixels
    C, S = cfg.channels.n_fields, cfg.channels.n_static
    pixels = cfg.grid[0] * cfg.grid[1]
    embed = 2 * T * ((cfg.history + 1) * C + S) * P * D
    block = 4 * T * D * Hs + 4 * T * D * Hc
    decode = 2 * T * 2 * D * C * P + (0 if cfg.head == "tendency" else 2 * pixels * 2 * C * C)
    return embed + steps * cfg.blocks * block + (steps if all_leads else 1) * decode
