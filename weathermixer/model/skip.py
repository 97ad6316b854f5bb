"""A per-pixel linear skip head: the state the tendency is added to, learned per grid point and lead.

With model.pixel_skip = L > 0 the decoded state at lead l (1 <= l <= L) of a latent rollout is

    y_l = tendency_l + x(t) + sum_f w[l, f, c, i, j] * feature_f[c, i, j]

at every channel c and grid point (i, j), where the features are the input states x(t), x(t - dt) ..
x(t - history dt) of the same channel, the static time features of the job (sin/cos of the hour of day
and of the day of year among model.channels.static) and 1 (model.pixel_skip_inputs "all"), or the
input states only (pixel_skip_inputs "states": a per-pixel damping of the state and its recent change,
no per-pixel climate of its own). With w = 0 (the initial value) this is the
plain tendency head; the least-squares optimum of w alone is the per-pixel linear regression baseline
of weathermixer.evaluation.baselines (at history 1 with hour-of-day inputs: the same features).

Why one set of coefficients per lead, with the time features of the *start* time: the valid-hour
harmonics of lead l are a fixed rotation of the start hour's (cos w(h + l dt) = cos(w l dt) cos(wh) -
sin(w l dt) sin(wh)), which per-lead coefficients absorb exactly, so the model needs neither dt nor the
valid time; and the best linear predictor's weight on x(t) decays with the lead (per-lead damping),
which coefficients shared across leads cannot express. A latent rollout of more than L steps without
re-encoding is therefore an error; a forecast that re-encodes every K <= L steps starts each segment
at lead 1 with the time features of its own start (weathermixer.inference.rollout.static_at), and the
autoregressive mode uses lead 1 at every step.

Layout: w is (L, F, channels, rows, lon), channels split over TP and latitude rows over DOMAIN exactly
like the input fields (Geometry.grid_layout), so each rank holds the coefficients of its own block
and the head itself needs no communication. The only collective: when mesh.tp > 1 and the static inputs
include time features, each TP rank needs them but holds only its slice of the static channels, so
they are summed over TP (one all-reduce of n_time x batch x block pixels, the size of one field
channel; none on TP = 1 or without time features).

pixel_skip_scale: w = scale * (stored parameter), so the optimizer's per-step change of a coefficient
is scale x lr (per-pixel coefficients see only their own pixel's gradient; without it they would move
no more than the network's weights per step).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from jigsaw_ext.collectives import sum_partials
from jigsaw_ext.layers import make_param
from jigsaw_ext.layout import Layout

from .geometry import Geometry

# the scalar time features a static channel may be (weathermixer.data.config.TIME_FEATURES; repeated
# here so the model does not import the data package)
TIME_FEATURES = ("sin_hour_of_day", "cos_hour_of_day", "sin_day_of_year", "cos_day_of_year")


def skip_time_features(cfg) -> list[int]:
    """Indices in model.channels.static of the time features the skip head reads."""
    if cfg.pixel_skip_inputs == "states":
        return []
    return [i for i, n in enumerate(cfg.channels.static) if n in TIME_FEATURES]


def skip_features(cfg) -> int:
    """F: the input states, the time features and the constant (pixel_skip_inputs "all"), or the states."""
    return cfg.history + 1 + (0 if cfg.pixel_skip_inputs == "states" else len(skip_time_features(cfg)) + 1)


def skip_num_parameters(cfg) -> int:
    return cfg.pixel_skip * skip_features(cfg) * cfg.channels.n_fields * cfg.grid[0] * cfg.grid[1]


class PixelSkip(nn.Module):
    def __init__(self, geo: Geometry, device=None, dtype=None):
        super().__init__()
        cfg, mesh = geo.cfg, geo.mesh
        self.geo, self.leads, self.scale = geo, cfg.pixel_skip, cfg.pixel_skip_scale
        self.time_index = skip_time_features(cfg)
        self.constant = cfg.pixel_skip_inputs == "all"
        C = cfg.channels.n_fields
        grid = geo.grid_layout(C, 1)  # (batch, channel, lat, lon) as the fields are laid out
        layout = Layout((self.leads, skip_features(cfg), C, *cfg.grid), (None, None, *grid.splits[1:]))
        self.weight = make_param(layout, mesh, ("const", 0.0), device=device, dtype=dtype)

    def time_features(self, static, like: torch.Tensor) -> list[torch.Tensor]:
        """The static time-feature channels as (B, rows_local, lon) blocks on every TP rank."""
        if not self.time_index:
            return []
        geo = self.geo
        split = geo.channel_split(geo.cfg.channels.n_static)
        tp = geo.mesh.coord("tp")
        lo, n = split.offset(tp), split.size(tp)
        zero = like.new_zeros(like.shape[0], *like.shape[2:])
        local = torch.stack([static[:, i - lo] if lo <= i < lo + n else zero for i in self.time_index], 1)
        return list(sum_partials(local, geo.mesh.group("tp")).unbind(1))

    def forward(self, states: list[torch.Tensor], static, lead: int) -> torch.Tensor:
        """x(t) + the linear function of lead `lead` (1-based) of `states` (t - h dt .. t, each
        (B, C_local, rows_local, lon)) and the time features in `static`."""
        if not 1 <= lead <= self.leads:
            raise ValueError(f"model.pixel_skip={self.leads} has skip coefficients for leads 1..{self.leads}, "
                             f"asked for lead {lead}: re-encode at most every {self.leads} steps (forecast "
                             f"--reencode-every) or train with a larger model.pixel_skip")
        x = states[-1]
        w = self.weight[lead - 1].unsqueeze(1) * self.scale  # (F, 1, C_local, rows_local, lon)
        feats = list(states) + [t.unsqueeze(1) for t in self.time_features(static, x)]
        out = x + w[-1] if self.constant else x
        for f, v in enumerate(feats):
            out = out + w[f] * v
        return out


# the least-squares initialisation ------------------------------------------------------------------
FEATURE_NAMES = "features: the states t - h dt .. t, the time features of model.channels.static, 1"


@torch.no_grad()
def load_initial_coefficients(skip: PixelSkip, path: str) -> None:
    """Fill this rank's block of the skip coefficients from a fit file (the full logical tensor)."""
    import numpy as np

    with np.load(path) as f:
        coef, statics = f["coef"], [str(s) for s in f["static"]]
    cfg, w = skip.geo.cfg, skip.weight
    if coef.shape[0] < skip.leads or coef.shape[1:] != w.block_layout.shape[1:] or \
            statics != [cfg.channels.static[i] for i in skip.time_index]:
        raise ValueError(f"model.pixel_skip_init={path}: coefficients of shape {coef.shape} with time features "
                         f"{statics}; this model needs {w.block_layout.shape} with "
                         f"{[cfg.channels.static[i] for i in skip.time_index]} (refit it for this job)")
    full = torch.from_numpy(coef[: skip.leads]).to(w.dtype) / skip.scale
    w.copy_(w.block_layout.shard(full, skip.geo.mesh.coords))
