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
at lead 1 with the time features of its own start (weathermixer.data.loader.static_at), and the
autoregressive mode uses lead 1 at every step.

Layout: w is (L, F, channels, rows, lon), channels split over TP and latitude rows over DOMAIN exactly
like the input fields (Geometry.grid_layout), so each rank holds the coefficients of its own block
and the head itself needs no communication. The only collective: when mesh.tp > 1 and the static inputs
include time features, each TP rank needs them but holds only its slice of the static channels, so
they are summed over TP (one all-reduce of n_time x batch x block pixels, the size of one field
channel; none on TP = 1 or without time features).

Anchor inputs (model.pixel_skip_inputs = "anchor", model.pixel_skip_day = D steps in a day): the
features of lead l are x(t - dt), x(t), x(t + l dt - 1 day) (the state at the valid hour one day
earlier: an input state while l <= D; read when history >= D - 1, else left out), the channel's
per-pixel daily-cycle climatology at the valid hour, clim(t + l dt) = mean + cos1 cos(w h_l) + sin1
sin(w h_l) + cos2 cos(2 w h_l) + sin2 sin(2 w h_l) (the daily_cycle_<term>_<channel> static inputs,
normalised like the channel; a term that is not an input counts as 0; h_l the valid hour, got from the
start hour's sin/cos by the rotation 2 pi l / D), the time features and 1. Persistence (w = 0), the
daily-cycle climatology (w_clim = 1, w_x(t) = -1), same-hour-yesterday (w_yday = 1, w_x(t) = -1) and
the regression baseline are points of this space: a least-squares start (skip_fit) fits at least as
well as each of them on the training split, and the network learns a residual. The climatology is
linear in the static inputs, so a forecast that re-encodes gets it at each segment's valid hours from
the segment's start hour (static_at) with no change. On TP > 1 the time features and the daily-cycle
terms are summed over TP in one all-reduce (n_time + the number of daily-cycle inputs, each one field
channel of the block; none on TP = 1).

Changes inputs (pixel_skip_inputs = "changes"): the anchor without the level, y_l = x(t) + w_l .
(x(t - dt) - x(t), x(t + l dt - 1 day) - x(t), clim(t + l dt) - clim(t), time features), no constant: a
uniform shift of the input states shifts the forecast by the same amount (level-equivariant).
Persistence, same-hour-yesterday and the daily-cycle change x(t) + clim(t + l dt) - clim(t) are special
cases; the regression baseline and the climatology, which revert to the training period's level, are
not. With a few weeks of training data that level is the one thing a fit cannot carry to the next weeks
(on the UK sample the validation days sit ~2.5 K from the training mean; README "Skill on real data").

pixel_skip_scale: w = scale * (stored parameter), so the optimizer's per-step change of a coefficient
is scale x lr (per-pixel coefficients see only their own pixel's gradient; without it they would move
no more than the network's weights per step).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from jigsaw_ext.collectives import sum_partials
from jigsaw_ext.layers import make_param
from jigsaw_ext.layout import Layout

from ..config import DAILY_CYCLE_PREFIX, DAILY_CYCLE_TERMS, TIME_FEATURES
from ..grid import Geometry


def skip_time_features(cfg) -> list[int]:
    """Indices in model.channels.static of the time features the skip head reads."""
    if cfg.pixel_skip_inputs == "states":
        return []
    return [i for i, n in enumerate(cfg.channels.static) if n in TIME_FEATURES]


def skip_daily_cycle(cfg) -> list[list[int | None]]:
    """Per predicted channel, the static index of each DAILY_CYCLE_TERMS term (None: not an input, taken as 0)."""
    static = list(cfg.channels.static)
    return [
        [
            static.index(f"{DAILY_CYCLE_PREFIX}{t}_{c}") if f"{DAILY_CYCLE_PREFIX}{t}_{c}" in static else None
            for t in DAILY_CYCLE_TERMS
        ]
        for c in cfg.channels.names
    ]


ANCHORS = ("anchor", "changes")


def skip_yesterday(cfg) -> bool:
    """Whether the anchor reads x(t + l dt - 1 day): when it is an input state for every lead."""
    return cfg.pixel_skip_inputs in ANCHORS and cfg.history >= cfg.pixel_skip_day - 1


def skip_state_features(cfg) -> int:
    """How many features are states: t - h dt .. t ("all", "states"); x(t - dt), x(t), [yesterday] ("anchor")."""
    if cfg.pixel_skip_inputs == "changes":
        return 1 + skip_yesterday(cfg)
    return 2 + skip_yesterday(cfg) if cfg.pixel_skip_inputs == "anchor" else cfg.history + 1


def skip_constant(cfg) -> bool:
    """Whether the features end with the constant 1 ("all", "anchor")."""
    return cfg.pixel_skip_inputs in ("all", "anchor")


def skip_features(cfg) -> int:
    """F: the state features, the climatology at the valid hour (anchor), the time features and the constant."""
    if cfg.pixel_skip_inputs == "states":
        return cfg.history + 1
    anchor = cfg.pixel_skip_inputs in ANCHORS
    return skip_state_features(cfg) + anchor + len(skip_time_features(cfg)) + skip_constant(cfg)


def skip_feature_names(cfg) -> list[str]:
    """The features in the order of the coefficients' second axis."""
    static = list(cfg.channels.static)
    yday = skip_yesterday(cfg)
    if cfg.pixel_skip_inputs == "anchor":
        names = (
            ["x(t - dt)", "x(t)"] + (["x(t + l dt - 1 day)"] if yday else []) + ["daily-cycle climatology at t + l dt"]
        )
    elif cfg.pixel_skip_inputs == "changes":
        names = (
            ["x(t - dt) - x(t)"]
            + (["x(t + l dt - 1 day) - x(t)"] if yday else [])
            + ["daily-cycle climatology at t + l dt - at t"]
        )
    else:
        names = [f"x(t - {j} dt)" if j else "x(t)" for j in range(cfg.history, -1, -1)]
    if cfg.pixel_skip_inputs != "states":
        names += [static[i] for i in skip_time_features(cfg)]
    return names + (["1"] if skip_constant(cfg) else [])


def skip_num_parameters(cfg) -> int:
    return cfg.pixel_skip * skip_features(cfg) * cfg.channels.n_fields * cfg.grid[0] * cfg.grid[1]


class PixelSkip(nn.Module):
    def __init__(self, geo: Geometry, device=None, dtype=None):
        super().__init__()
        cfg, mesh = geo.cfg, geo.mesh
        self.geo, self.leads, self.scale = geo, cfg.pixel_skip, cfg.pixel_skip_scale
        self.time_index = skip_time_features(cfg)
        self.constant = skip_constant(cfg)
        self.anchor = cfg.pixel_skip_inputs in ANCHORS
        self.changes = cfg.pixel_skip_inputs == "changes"
        self.day, self.yesterday = cfg.pixel_skip_day, skip_yesterday(cfg)
        # anchor: the daily-cycle terms of every channel, gathered beside the time features
        cycle = skip_daily_cycle(cfg) if self.anchor else []
        self.cycle_index = sorted({i for terms in cycle for i in terms if i is not None})
        self.cycle_terms = [[None if i is None else self.cycle_index.index(i) for i in terms] for terms in cycle]
        if self.anchor:
            names = list(cfg.channels.static)
            self.hour_pos = [self.time_index.index(names.index(n)) for n in ("sin_hour_of_day", "cos_hour_of_day")]
        C = cfg.channels.n_fields
        grid = geo.grid_layout(C, 1)  # (batch, channel, lat, lon) as the fields are laid out
        layout = Layout((self.leads, skip_features(cfg), C, *cfg.grid), (None, None, *grid.splits[1:]))
        self.weight = make_param(layout, mesh, ("const", 0.0), device=device, dtype=dtype)

    def gather_static(self, static, index: list[int], like: torch.Tensor) -> list[torch.Tensor]:
        """The static channels `index` (of model.channels.static) as (B, rows_local, lon) blocks on every TP
        rank: each rank holds a slice of the static channels, so they are summed over TP (one all-reduce)."""
        if not index:
            return []
        geo = self.geo
        split = geo.channel_split(geo.cfg.channels.n_static)
        tp = geo.mesh.coord("tp")
        lo, n = split.offset(tp), split.size(tp)
        zero = like.new_zeros(like.shape[0], *like.shape[2:])
        local = torch.stack([static[:, i - lo] if lo <= i < lo + n else zero for i in index], 1)
        return list(sum_partials(local, geo.mesh.group("tp")).unbind(1))

    def time_features(self, static, like: torch.Tensor) -> list[torch.Tensor]:
        """The static time-feature channels as (B, rows_local, lon) blocks on every TP rank."""
        return self.gather_static(static, self.time_index, like)

    def climatology(self, cycle: list[torch.Tensor], time: list[torch.Tensor], lead: int, like: torch.Tensor):
        """The daily-cycle climatology at the valid hour of `lead`, (B, C_local, rows_local, lon): the start
        hour's phase (sin/cos_hour_of_day) turned by 2 pi lead / day, then mean + the two harmonics."""
        s0, c0 = time[self.hour_pos[0]], time[self.hour_pos[1]]
        a = 2 * math.pi * lead / self.day
        s1 = s0 * math.cos(a) + c0 * math.sin(a)
        c1 = c0 * math.cos(a) - s0 * math.sin(a)
        basis = (None, c1, s1, c1 * c1 - s1 * s1, 2 * s1 * c1)  # DAILY_CYCLE_TERMS at the valid hour
        geo = self.geo
        chans = geo.channel_split(geo.cfg.channels.n_fields).slice(geo.mesh.coord("tp"))
        out = []
        for terms in self.cycle_terms[chans]:
            clim = torch.zeros_like(like[:, 0])
            for j, k in enumerate(terms):
                if k is not None:
                    clim = clim + (cycle[k] if basis[j] is None else cycle[k] * basis[j])
            out.append(clim)
        return torch.stack(out, 1)

    def features(self, states: list[torch.Tensor], static, lead: int) -> list[torch.Tensor]:
        """The head's features of lead `lead`, each (B, C_local, rows_local, lon) or broadcastable to it
        (time features and the constant: (B, 1, rows_local, lon))."""
        x = states[-1]
        if self.anchor:
            gathered = self.gather_static(static, self.time_index + self.cycle_index, x)
            time, cycle = gathered[: len(self.time_index)], gathered[len(self.time_index) :]
            yday = [states[-1 - (self.day - lead)]] if self.yesterday else []
            clim = self.climatology(cycle, time, lead, x)
            if self.changes:  # level-free: differences of states, the daily cycle's change from t to t + l dt
                feats = [states[-2] - x, *[y - x for y in yday], clim - self.climatology(cycle, time, 0, x)]
            else:
                feats = [states[-2], x, *yday, clim]
        else:
            time = self.time_features(static, x)
            feats = list(states)
        feats += [t.unsqueeze(1) for t in time]
        if self.constant:
            feats.append(torch.ones_like(x[:, :1]))
        return feats

    def forward(self, states: list[torch.Tensor], static, lead: int) -> torch.Tensor:
        """x(t) + the linear function of lead `lead` (1-based) of `states` (t - h dt .. t, each
        (B, C_local, rows_local, lon)) and the time features in `static`."""
        if not 1 <= lead <= self.leads:
            raise ValueError(
                f"model.pixel_skip={self.leads} has skip coefficients for leads 1..{self.leads}, "
                f"asked for lead {lead}: re-encode at most every {self.leads} steps (forecast "
                f"--reencode-every) or train with a larger model.pixel_skip"
            )
        x = states[-1]
        w = self.weight[lead - 1].unsqueeze(1) * self.scale  # (F, 1, C_local, rows_local, lon)
        feats = self.features(states, static, lead)
        if self.constant:  # the constant's term without a multiplication by 1
            feats = feats[:-1]
        out = x + w[len(feats)] if self.constant else x
        for f, v in enumerate(feats):
            out = out + w[f] * v
        return out


# the least-squares initialisation ------------------------------------------------------------------
FEATURE_NAMES = "features (skip_feature_names): the states, [anchor: yesterday, climatology,] time features, 1"


@torch.no_grad()
def load_initial_coefficients(skip: PixelSkip, path: str) -> None:
    """Fill this rank's block of the skip coefficients from a fit file (the full logical tensor)."""
    import os

    import numpy as np

    if not os.path.isfile(path):  # a step of the job's workflow was skipped: say which
        raise FileNotFoundError(
            f"model.pixel_skip_init={path}: no such fit file; write it first with `python -m "
            f"weathermixer.model.skip_fit --config JOB --leads {skip.leads} --out {path}` "
            "(after the job's stats file: the fit reads its normalisation and daily cycle)"
        )
    with np.load(path) as f:
        coef, statics = f["coef"], [str(s) for s in f["static"]]
        inputs = str(f["inputs"]) if "inputs" in f else None  # fits from before the anchor inputs: not stored
        day = int(f["day"]) if "day" in f else 0
    cfg, w = skip.geo.cfg, skip.weight
    mode = (
        ""
        if inputs in (None, cfg.pixel_skip_inputs) and (not skip.anchor or day == skip.day)
        else f" (fitted for pixel_skip_inputs={inputs}, pixel_skip_day={day})"
    )
    if (
        mode
        or coef.shape[0] < skip.leads
        or coef.shape[1:] != w.block_layout.shape[1:]
        or statics != [cfg.channels.static[i] for i in skip.time_index]
    ):
        raise ValueError(
            f"model.pixel_skip_init={path}: coefficients of shape {coef.shape} with time features "
            f"{statics}{mode}; this model needs {w.block_layout.shape} with "
            f"{[cfg.channels.static[i] for i in skip.time_index]}, pixel_skip_inputs="
            f"{cfg.pixel_skip_inputs} (refit it for this job)"
        )
    full = torch.from_numpy(coef[: skip.leads]).to(w.dtype) / skip.scale
    w.copy_(w.block_layout.shard(full, skip.geo.mesh.coords))
