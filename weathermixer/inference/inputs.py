"""What a forecast reads before it runs: the init times and lead steps asked for, the checkpoint's job
(model, data set, statistics, time step, with the CLI overrides), the mesh check, and the data set of
initial conditions opened as this rank's block loader. Bad input raises ForecastError, one line naming
what does not match."""

from __future__ import annotations

import atexit
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ..data.times import describe_times

if TYPE_CHECKING:
    from ..config import ModelConfig
    from ..data import DataConfig

HOUR = pd.Timedelta(hours=1)


class ForecastError(ValueError):
    """Bad input to a forecast; the message names what does not match."""


# ------------------------------------------------------------------------------------------------
# inputs that need no data
def _timestamp(text: str, what: str) -> pd.Timestamp:
    try:
        return pd.Timestamp(text)
    except ValueError as err:
        raise ForecastError(f"{what}: cannot parse {text!r} as a time ({err})") from None


def parse_init_times(values: list[str], every_hours: float | None) -> pd.DatetimeIndex:
    """START END with --init-every HOURS (inclusive), or one comma-separated list."""
    if len(values) == 2 and "," not in "".join(values):
        if every_hours is None:
            raise ForecastError("--init-times START END needs --init-every HOURS (or give a comma-separated list)")
        if every_hours <= 0:
            raise ForecastError(f"--init-every {every_hours:g}: must be > 0 hours")
        start, end = (_timestamp(v, "--init-times") for v in values)
        if end < start:
            raise ForecastError(f"--init-times {start} {end}: the end is before the start")
        return pd.date_range(start, end, freq=pd.Timedelta(hours=every_hours))
    if len(values) != 1:
        raise ForecastError(
            f"--init-times takes START END (with --init-every) or one comma-separated list, got "
            f"{len(values)} values: {' '.join(values)}"
        )
    if every_hours is not None:
        raise ForecastError("--init-every applies to --init-times START END, not to a list of init times")
    inits = pd.DatetimeIndex([_timestamp(v.strip(), "--init-times") for v in values[0].split(",") if v.strip()])
    if not len(inits):
        raise ForecastError("--init-times names no init time")
    dup = inits[inits.duplicated()]
    if len(dup):
        raise ForecastError(f"--init-times: duplicated init time(s) {describe_times(dup.unique())}")
    return inits.sort_values()


def lead_steps(lead_hours: float, dt_hours: float) -> int:
    """Number of model steps of a lead; the lead must be a positive multiple of the step."""
    n = lead_hours / dt_hours
    if lead_hours <= 0 or abs(n - round(n)) > 1e-9:
        raise ForecastError(
            f"--lead-hours {lead_hours:g} is not a positive multiple of the model step "
            f"{dt_hours:g} h (data.dt_hours of the checkpoint's job)"
        )
    return int(round(n))


@dataclass(frozen=True)
class Job:
    """What the checkpoint's job says about the model and its data, with CLI overrides applied."""

    checkpoint: Path
    info: dict  # the checkpoint's job info (job.json / consolidated index)
    model: ModelConfig
    data: DataConfig  # gridded (for a synthetic job: the store it generated)
    rollout_mode: str  # how it was trained: latent / autoregressive
    trained_leads: int  # K, the most leads it was trained to produce from one encoding (latent mode)
    stats_origin: str = ""  # where the normalisation statistics come from (for the store's attributes)
    reencode_every: int | None = None  # chosen on the validation set at the end of training, if recorded
    reencode_origin: str = ""


def forecast_defaults(where: Path) -> tuple[int | None, str]:
    """The re-encoding interval training chose on its validation set (forecast_defaults.json in the
    checkpoint root, or in a consolidated checkpoint's directory), and the file it came from."""
    for folder in (where, where.parent):
        path = folder / "forecast_defaults.json"
        if path.is_file():
            try:
                value = int(json.loads(path.read_text())["reencode_every"])
            except (ValueError, KeyError, TypeError) as err:
                raise ForecastError(
                    f"{path}: cannot read reencode_every ({err}); remove the file or repair it"
                ) from None
            return value, str(path)
    return None, ""


def _stats_file(stats: dict) -> str:
    """The checkpoint's statistics as a file for the data loader (removed at exit)."""
    fd, path = tempfile.mkstemp(prefix="weathermixer-stats-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(stats, f)
    atexit.register(lambda: os.path.exists(path) and os.unlink(path))
    return path


def _job_data(where: str, info: dict, job, data_path: str | None):
    """(the data config to forecast from, where it comes from): the data set recorded in the checkpoint,
    the synthetic store its job wrote, or its job's data section; data_path (--data-path) replaces the path."""
    from ..config import ConfigError, parse
    from ..config.data import DataConfig

    recorded = info.get("data")  # the gridded data config the run read (self-contained checkpoints)
    if recorded:
        try:
            data = parse(DataConfig, recorded, f"{where} (the checkpoint's data set)")
        except ConfigError as err:
            raise ForecastError(f"--checkpoint {where}: cannot read its data configuration: {err}") from None
        if data_path:
            data = data.model_copy(update={"path": data_path})
        origin = "the data set recorded in the checkpoint"
    elif job.data.source == "synthetic":  # the store written by the training job, read like any other
        data = job.data.gridded(job.model, 1)
        path = data_path or data.path
        data = data.model_copy(update={"path": path, "stats": f"{path}.stats.json"})
        origin = "the synthetic store of the checkpoint's job (weathermixer.data.path)"
    else:
        data = job.data.model_copy(update={"path": data_path, "fake": False} if data_path else {})
        origin = "the checkpoint's weathermixer.data.path"
    return data, origin


def read_job(checkpoint: str, data_path: str | None, stats: str | None) -> Job:
    from jigsaw_ext.checkpoint import CheckpointFormatError, read_job_info, resolve

    from ..config import ConfigError, parse
    from ..config.train import TrainJobConfig

    try:
        where = resolve(checkpoint)
        info = read_job_info(where)
    except CheckpointFormatError as err:
        raise ForecastError(f"--checkpoint: {err}") from None
    try:
        job = parse(TrainJobConfig, info["weathermixer"], f"{where} (the checkpoint's job)")
    except (KeyError, ConfigError) as err:
        raise ForecastError(f"--checkpoint {where}: cannot read its job configuration: {err}") from None
    data, origin = _job_data(where, info, job, data_path)
    # statistics: --stats, else the ones recorded in the checkpoint, else the job's stats file
    if stats:
        data, stats_origin = data.model_copy(update={"stats": stats}), stats
    elif info.get("stats") is not None and not data.fake:
        data, stats_origin = data.model_copy(update={"stats": _stats_file(info["stats"])}), "checkpoint"
    else:
        stats_origin = data.stats or "none"
    if data.fake:
        raise ForecastError(
            f"--checkpoint {where}: its job trained on fake data (data.fake=true); give the data "
            f"set to forecast from with --data-path"
        )
    if data.history and data.history != job.model.history:
        raise ForecastError(
            f"data.history={data.history} but model.history={job.model.history} in the checkpoint's "
            f"job: the model embeds model.history previous states"
        )
    if "://" not in data.path and not Path(data.path).exists():
        hint = "" if data_path else f" ({origin}; relative paths are read from the working directory: give --data-path)"
        raise ForecastError(f"data set not found: {data.path}{hint}")
    if data.stats and "://" not in data.stats and not Path(data.stats).exists():
        raise ForecastError(
            f"normalisation statistics not found: {data.stats} (the ones the model was trained "
            f"with; this checkpoint does not record them: give --stats)"
        )
    return Job(
        where,
        info,
        job.model,
        data,
        job.train.rollout_mode,
        job.rollout if job.train.rollout_mode == "latent" else 1,
        stats_origin,
        *forecast_defaults(Path(where)),
    )


def check_mesh(dp: int, domain: int, tp: int, world: int) -> None:
    if dp * domain * tp != world:
        raise ForecastError(
            f"--dp {dp} x --domain {domain} x --tp {tp} = {dp * domain * tp} ranks, but the job "
            f"has world size {world} (WORLD_SIZE): set them so that their product is {world}"
        )


# ------------------------------------------------------------------------------------------------
# the data set of initial conditions
def check_inits(inits: pd.DatetimeIndex, data, history: int = 0) -> None:
    """Every init must be a time of the data set with the next model step present (the loader
    reads a sample's first target with its input) and, with model.history = h, the h previous states."""
    times = data.times
    first, last = history * data.k, len(times) - 1 - data.k
    span = (
        f"{times[min(first, len(times) - 1)]:%Y-%m-%dT%H:%M} .. {times[max(last, 0)]:%Y-%m-%dT%H:%M} every "
        f"{data.step / HOUR:g} h"
        + (f"; model.history={history} needs the {history} previous states" if history else "")
    )
    pos = times.get_indexer(inits)
    bad = inits[(pos < first) | (pos > last)]
    if len(bad):
        raise ForecastError(
            f"init time(s) {describe_times(bad)} outside the initial conditions of the data set {data.where} ({span})"
        )


def open_data(job: Job, mesh, inits: pd.DatetimeIndex):
    """(GriddedDataset, loader of this rank's blocks, full mean and std of the predicted channels).

    The loader's split covers the init times; samples are picked by init time (its sampler is not
    used, so it is given a one-replica view of the mesh with this rank's domain and tp coordinates)."""
    from jigsaw_ext.mesh import Mesh, MeshConfig

    from ..data import DataError, GriddedDataset, Normalizer, ShardedSampleLoader
    from ..grid import MeshMismatch

    cfg = job.data.model_copy(update={"leads": 1, "prefetch": 0, "splits": {"test": (str(inits[0]), str(inits[-1]))}})
    ch = job.model.channels
    where = (
        f"checkpoint {job.checkpoint} (model channels {ch.names}, static {list(ch.static)}, grid "
        f"{list(job.model.grid)})"
    )
    try:
        data = GriddedDataset(cfg, ch, job.model.grid)
    except DataError as err:
        raise ForecastError(f"{where} does not match the data set: {err}") from None
    check_inits(inits, data, job.model.history)
    group_view = Mesh.virtual(MeshConfig(domain=mesh.size("domain"), tp=mesh.size("tp")), mesh.coord("model"))
    try:
        loader = ShardedSampleLoader(
            cfg, job.model, group_view, "test", batch=1, shuffle=False, infinite=False, dataset=data
        )
        mean, std = (
            Normalizer.load(cfg.stats).fields(ch.names)
            if cfg.stats
            else (np.zeros(ch.n_fields, np.float32), np.ones(ch.n_fields, np.float32))
        )
    except MeshMismatch as err:
        raise ForecastError(f"mesh {mesh.config}: {err}") from None
    except (DataError, ValueError) as err:
        raise ForecastError(f"{where} does not match the data set or its statistics: {err}") from None
    return data, loader, mean, std
