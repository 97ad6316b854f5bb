"""The rollout on the mesh: the model loaded with its checkpoint's weights next to this rank's loader of
the initial conditions, the autoregressive / latent rollout of one batch of init times, the all-gather
of each decoded lead over the model group, and the loop over this dp replica's batches that hands the
full leads to the store writer (timed for --timings)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .inputs import ForecastError, Job, open_data
from .store import StoreWriter

if TYPE_CHECKING:
    from ..data import GriddedDataset, ShardedSampleLoader
    from ..grid import Geometry
    from ..model.mixer import WeatherMixer


@dataclass(frozen=True)
class Plan:
    """What to forecast and how: init times, model steps of dt, latent steps per encode, inits per pass."""

    inits: pd.DatetimeIndex
    steps: int
    dt: pd.Timedelta
    mode: str  # autoregressive / latent
    per_encode: int
    batch: int
    zarr_format: int = 3
    skip_only: bool = False  # the skip head alone (--skip-only)


@dataclass(frozen=True)
class Loaded:
    """This rank's part of a forecast: the model with its weights and the data set of initial conditions."""

    geo: Geometry
    data: GriddedDataset
    loader: ShardedSampleLoader  # this rank's blocks
    mean: np.ndarray  # of the predicted channels (physical units)
    std: np.ndarray
    model: WeatherMixer  # in eval mode


def load(job: Job, mesh, inits: pd.DatetimeIndex, device, tendency: bool = True) -> Loaded:
    """The geometry of the mesh, the data set, and the model with the checkpoint's weights.
    tendency=False: the decoder's weights and bias set to 0, so the network adds nothing and a model with
    the skip head (model.pixel_skip) forecasts with the head's per-pixel linear function alone."""
    from jigsaw_ext.checkpoint import CheckpointFormatError, load_into_model

    from ..grid import Geometry, MeshMismatch
    from ..model.mixer import WeatherMixer

    try:
        geo = Geometry(job.model, mesh)
    except MeshMismatch as e:
        raise ForecastError(f"mesh {mesh.config}: {e}") from None
    data, loader, mean, std = open_data(job, mesh, inits)
    if job.stats_origin == "checkpoint" and os.path.exists(job.data.stats):
        os.unlink(job.data.stats)  # read by now (the loader keeps the arrays)
    # the checkpoint holds every weight: no initial skip coefficients to read (their file may be gone)
    model = WeatherMixer(job.model.model_copy(update={"pixel_skip_init": None}), mesh, device=device)
    try:
        load_into_model(model, job.checkpoint)
    except CheckpointFormatError as e:
        raise ForecastError(f"--checkpoint: {e}") from None
    if not tendency:
        model.zero_tendency()
    model.eval()
    return Loaded(geo, data, loader, mean, std, model)


def rollout(model, fields, static, loader, inits, steps: int, per_encode: int, dt: pd.Timedelta):
    """Yield (lead index, this rank's block of the forecast) for leads 1..steps: blocks of
    `per_encode` latent steps, each started from the last decoded state (with model.history = h, from
    the last h + 1 states, decoded or initial)."""
    from ..data.loader import static_at
    from ..model.mixer import next_window

    x, done = fields, 0
    while done < steps:
        k = min(per_encode, steps - done)
        s = static_at(static, loader, [t + done * dt for t in inits])
        leads = model.forecast_leads(x, s, k)
        for j, y in enumerate(leads):
            yield done + j, y
        if model.cfg.history:
            for y in leads[-(model.cfg.history + 1) :]:
                x = next_window(x, y)
        else:
            x = leads[-1]
        done += k


def gather_full(x, mesh, geo):
    """(B, channels of this tp rank, rows of this domain rank, lon) -> (B, C, H, W) on every rank of
    the model group (uneven and empty shards handled by the collectives)."""
    from jigsaw_ext.collectives import all_gather

    x = all_gather(x, mesh.group("tp"), geo.channel_split(geo.cfg.channels.n_fields).sizes, dim=1)
    return all_gather(x, mesh.group("domain"), geo.pixel_row_split.sizes, dim=2)


@dataclass
class LoopTimes:
    """Seconds of the forecast loop (every rank done), and rank-local model and gather + write time."""

    seconds: float = 0.0
    model_s: float = 0.0
    gather_write_s: float = 0.0


def forecast_batch(
    run: Loaded, mesh, plan: Plan, a: int, b: int, device, autocast, writer: StoreWriter | None, times: LoopTimes
) -> None:
    """Forecast inits a..b-1 of the plan: read their initial state, roll out, gather and write each lead."""
    import torch

    inits = plan.inits
    ids = np.searchsorted(run.loader.starts, run.data.times.get_indexer(inits[a:b]))
    sample = run.loader.load_batch(ids)
    fields = sample.fields.to(device)
    static = None if sample.static is None else sample.static.to(device)
    with torch.no_grad(), autocast:
        clock = time.perf_counter()
        for lead, y in rollout(
            run.model, fields, static, run.loader, list(inits[a:b]), plan.steps, plan.per_encode, plan.dt
        ):
            times.model_s += time.perf_counter() - clock
            clock = time.perf_counter()
            full = gather_full(y.float(), mesh, run.geo)
            if writer is not None:
                writer.add(a, lead, full.cpu().numpy())
            times.gather_write_s += time.perf_counter() - clock
            clock = time.perf_counter()


def forecast_all(
    run: Loaded, mesh, plan: Plan, device, bf16: bool, writer: StoreWriter | None, bar: bool, world: int
) -> LoopTimes:
    """This dp replica's batches of inits (replica r takes batches r, r + dp, ...); returns when every
    rank is done. `bar`: show a progress bar of the inits of all replicas."""
    import torch
    import torch.distributed as dist

    from ..progress import progress as progress_display

    B, dp = plan.batch, mesh.size("dp")
    batches = [(i, min(i + B, len(plan.inits))) for i in range(0, len(plan.inits), B)]
    mine = batches[mesh.coord("dp") :: dp]
    progress = progress_display(len(plan.inits), "forecast", "init", enabled=bar)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    cuda, times = device.type == "cuda", LoopTimes()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for j, (a, b) in enumerate(mine):
        forecast_batch(run, mesh, plan, a, b, device, autocast, writer, times)
        round_ = batches[j * dp : (j + 1) * dp]
        progress.update(sum(e - s for s, e in round_))
    progress.close()
    if cuda:
        torch.cuda.synchronize()
    if world > 1:
        dist.barrier()  # every writer is done
    times.seconds = time.perf_counter() - t0
    return times
