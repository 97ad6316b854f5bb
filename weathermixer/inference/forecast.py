"""python -m weathermixer.forecast --checkpoint CKPT --init-times ... --lead-hours 240 --out FC.zarr

Forecasts from initial conditions in the data set, on any mesh, written in physical units to a zarr
store in the WeatherBench 2 forecast layout (readable by `python -m weathermixer.evaluate`):

    time (init), prediction_timedelta (dt, 2 dt, .., lead), [level,] latitude, longitude

with the data set's variable names, latitude order and attributes. CKPT is a training checkpoint
tag directory, a checkpoint root (its `latest` pointer) or a consolidated checkpoint; the model,
data set, normalisation statistics and time step come from the job it records. A checkpoint carries
the statistics it was trained with (and the data set's variable, level and dimension mapping), so
neither the training config nor its stats file is needed: only the data set of the initial
conditions (--data-path overrides the recorded one; --stats overrides the recorded statistics).
Checkpoints are read without unpickling code (jigsaw_ext.safe_load).

    python -m weathermixer.forecast --checkpoint runs/x/checkpoints --init-times 2020-05-16 2020-06-15 \\
        --init-every 12 --lead-hours 240 --out fc.zarr
    ... --init-times 2020-05-16T00,2020-05-20T12          (an explicit list)
    torchrun --nproc_per_node 8 -m weathermixer.forecast ... --dp 2 --domain 2 --tp 2

One model step is the data's dt (data.dt_hours): a lead must be a multiple of it. Rollout:
  autoregressive (default)  encode the state, apply the block stack `--reencode-every` times and
                            decode each lead, feed the last decoded state back in; static time
                            features follow the valid time of each input. Default: the rollout
                            length K the checkpoint was trained with in latent mode (train.rollout,
                            else model.rollout), 1 for a model trained autoregressively. On the
                            quickstart (K = 2, benchmarks/results_forecast_cpu_2core.json) K beats
                            re-encoding every step from 72 h on (at 120 h one-step re-encoding has
                            twice the error of persistence), one-step is better for the
                            temperatures at 24 h
  latent                    encode the initial state once, apply the block stack once per lead and
                            decode every lead (the model's latent rollout, as in latent training;
                            leads past K were never trained: it loses to persistence at 24 h there)

Parallelism: a model group (DOMAIN x TP ranks) runs one forecast, each rank reading only its block of
the initial state (its latitude rows and channels); dp replicas take disjoint batches of init times.
Each decoded lead is all-gathered over the group (uneven shards padded inside the collective) and
written by the group's first rank; a store chunk holds one init (and a block of its leads), so
writers never share a chunk. The store is built under OUT.partial and renamed when every rank has
finished. Bad input (init times outside the data, a lead that is not a multiple of the step, a data
set or statistics that do not match the checkpoint's channels or grid, a mesh that does not match
the launch) is one line naming what does not match, exit code 2.
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ..data.times import describe_times

if TYPE_CHECKING:
    from ..config import ModelConfig
    from ..data import DataConfig

EXIT_FAILED, EXIT_BAD_INPUT = 1, 2
LEAD, LEVEL, LAT, LON, TIME = "prediction_timedelta", "level", "latitude", "longitude", "time"
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
        raise ForecastError(f"--init-times takes START END (with --init-every) or one comma-separated list, got "
                            f"{len(values)} values: {' '.join(values)}")
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
        raise ForecastError(f"--lead-hours {lead_hours:g} is not a positive multiple of the model step "
                            f"{dt_hours:g} h (data.dt_hours of the checkpoint's job)")
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


def _stats_file(stats: dict) -> str:
    """The checkpoint's statistics as a file for the data loader (removed at exit)."""
    fd, path = tempfile.mkstemp(prefix="weathermixer-stats-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(stats, f)
    atexit.register(lambda: os.path.exists(path) and os.unlink(path))
    return path


def read_job(checkpoint: str, data_path: str | None, stats: str | None) -> Job:
    from jigsaw_ext.checkpoint import CheckpointFormatError, read_job_info, resolve

    from ..config import ConfigError, parse
    from ..train.config import TrainJobConfig

    try:
        where = resolve(checkpoint)
        info = read_job_info(where)
    except CheckpointFormatError as err:
        raise ForecastError(f"--checkpoint: {err}") from None
    try:
        job = parse(TrainJobConfig, info["weathermixer"], f"{where} (the checkpoint's job)")
    except (KeyError, ConfigError) as err:
        raise ForecastError(f"--checkpoint {where}: cannot read its job configuration: {err}") from None
    recorded = info.get("data")  # the gridded data config the run read (self-contained checkpoints)
    if recorded:
        from ..data import DataConfig

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
    # statistics: --stats, else the ones recorded in the checkpoint, else the job's stats file
    if stats:
        data, stats_origin = data.model_copy(update={"stats": stats}), stats
    elif info.get("stats") is not None and not data.fake:
        data, stats_origin = data.model_copy(update={"stats": _stats_file(info["stats"])}), "checkpoint"
    else:
        stats_origin = data.stats or "none"
    if data.fake:
        raise ForecastError(f"--checkpoint {where}: its job trained on fake data (data.fake=true); give the data "
                            f"set to forecast from with --data-path")
    if data.history:
        raise ForecastError(f"data.history={data.history}: the model takes one input time; forecasts with "
                            f"history inputs are not supported")
    if "://" not in data.path and not Path(data.path).exists():
        hint = "" if data_path else f" ({origin}; relative paths are read from the working directory: give --data-path)"
        raise ForecastError(f"data set not found: {data.path}{hint}")
    if data.stats and "://" not in data.stats and not Path(data.stats).exists():
        raise ForecastError(f"normalisation statistics not found: {data.stats} (the ones the model was trained "
                            f"with; this checkpoint does not record them: give --stats)")
    return Job(where, info, job.model, data, job.train.rollout_mode,
               job.rollout if job.train.rollout_mode == "latent" else 1, stats_origin)


def check_mesh(dp: int, domain: int, tp: int, world: int) -> None:
    if dp * domain * tp != world:
        raise ForecastError(f"--dp {dp} x --domain {domain} x --tp {tp} = {dp * domain * tp} ranks, but the job "
                            f"has world size {world} (WORLD_SIZE): set them so that their product is {world}")


# ------------------------------------------------------------------------------------------------
# the data set and the rollout
def check_inits(inits: pd.DatetimeIndex, data) -> None:
    """Every init must be a time of the data set with the next model step present (the loader
    reads a sample's first target with its input)."""
    times = data.times
    last = len(times) - 1 - data.k
    span = (f"{times[0]:%Y-%m-%dT%H:%M} .. {times[max(last, 0)]:%Y-%m-%dT%H:%M} every "
            f"{data.step / HOUR:g} h")
    pos = times.get_indexer(inits)
    bad = inits[(pos < 0) | (pos > last)]
    if len(bad):
        raise ForecastError(f"init time(s) {describe_times(bad)} outside the initial conditions of the data set "
                            f"{data.where} ({span})")


def open_data(job: Job, mesh, inits: pd.DatetimeIndex):
    """(GriddedDataset, loader of this rank's blocks, full mean and std of the predicted channels).

    The loader's split covers the init times; samples are picked by init time (its sampler is not
    used, so it is given a one-replica view of the mesh with this rank's domain and tp coordinates)."""
    from jigsaw_ext.mesh import Mesh, MeshConfig

    from ..data import DataError, GriddedDataset, Normalizer, ShardedSampleLoader
    from ..model.geometry import MeshMismatch

    cfg = job.data.model_copy(update={"leads": 1, "prefetch": 0, "splits": {
        "test": (str(inits[0]), str(inits[-1]))}})
    ch = job.model.channels
    where = f"checkpoint {job.checkpoint} (model channels {ch.names}, static {list(ch.static)}, grid " \
            f"{list(job.model.grid)})"
    try:
        data = GriddedDataset(cfg, ch, job.model.grid)
    except DataError as err:
        raise ForecastError(f"{where} does not match the data set: {err}") from None
    check_inits(inits, data)
    group_view = Mesh.virtual(MeshConfig(domain=mesh.size("domain"), tp=mesh.size("tp")), mesh.coord("model"))
    try:
        loader = ShardedSampleLoader(cfg, job.model, group_view, "test", batch=1, shuffle=False,
                                     infinite=False, dataset=data)
        mean, std = (Normalizer.load(cfg.stats).fields(ch.names) if cfg.stats
                     else (np.zeros(ch.n_fields, np.float32), np.ones(ch.n_fields, np.float32)))
    except MeshMismatch as err:
        raise ForecastError(f"mesh {mesh.config}: {err}") from None
    except (DataError, ValueError) as err:
        raise ForecastError(f"{where} does not match the data set or its statistics: {err}") from None
    return data, loader, mean, std


def static_at(static, loader, times: list[pd.Timestamp]):
    """The static block with its time features (hour of day, day of year) at `times`, one per sample."""
    from ..data import TIME_FEATURES
    from ..data.loader import _computed  # the loader's own formula, so the features match training

    idx = [i for i, n in enumerate(loader.static_names) if n in TIME_FEATURES]
    if static is None or not idx:
        return static
    static = static.clone()
    for b, t in enumerate(times):
        for i in idx:
            static[b, i] = float(_computed(loader.static_names[i], loader.lat[:1], loader.lon[:1], t)[0, 0])
    return static


def rollout(model, fields, static, loader, inits, steps: int, per_encode: int, dt: pd.Timedelta):
    """Yield (lead index, this rank's block of the forecast) for leads 1..steps: blocks of
    `per_encode` latent steps, each started from the last decoded state."""
    x, done = fields, 0
    while done < steps:
        k = min(per_encode, steps - done)
        s = static_at(static, loader, [t + done * dt for t in inits])
        leads = model.forecast_leads(x, s, k)
        for j, y in enumerate(leads):
            yield done + j, y
        x, done = leads[-1], done + k


def gather_full(x, mesh, geo):
    """(B, channels of this tp rank, rows of this domain rank, lon) -> (B, C, H, W) on every rank of
    the model group (uneven and empty shards handled by the collectives)."""
    from jigsaw_ext.collectives import all_gather

    x = all_gather(x, mesh.group("tp"), geo.channel_split(geo.cfg.channels.n_fields).sizes, dim=1)
    return all_gather(x, mesh.group("domain"), geo.pixel_row_split.sizes, dim=2)


# ------------------------------------------------------------------------------------------------
# the output store
@dataclass(frozen=True)
class OutputVariable:
    name: str  # the data set's variable name
    channels: list[int]  # model channel indices (one per level, or one for a surface variable)
    levels: bool


def output_variables(job: Job) -> list[OutputVariable]:
    ch, cfg = job.model.channels, job.data
    out = [OutputVariable(cfg.variable(n), [i], False) for i, n in enumerate(ch.surface)]
    base = len(ch.surface)
    for j, v in enumerate(ch.atmospheric):
        first = base + j * len(ch.levels)
        out.append(OutputVariable(cfg.variable(v), list(range(first, first + len(ch.levels))), True))
    return out


def _attrs(attrs: dict) -> dict:
    """JSON-able attributes, without the encoding keys xarray manages itself."""
    out = {}
    for k, v in attrs.items():
        if k.startswith("_") or k == "coordinates":
            continue
        out[str(k)] = v.item() if isinstance(v, np.generic) else v.tolist() if isinstance(v, np.ndarray) else v
    return out


CHUNK_BYTES = 16 * 2 ** 20


def leads_per_chunk(job: Job, steps: int) -> int:
    """Leads per store chunk: as many as fit in CHUNK_BYTES for the largest variable (at least one),
    so small grids do not become thousands of tiny chunks and large ones stay one lead per chunk."""
    ch = job.model.channels
    per_lead = 4 * job.model.grid[0] * job.model.grid[1] * (len(ch.levels) if ch.atmospheric else 1)
    return max(1, min(steps, CHUNK_BYTES // per_lead))


def create_store(path: Path, job: Job, data, inits, leads: pd.TimedeltaIndex, attrs: dict) -> None:
    """Coordinates (xarray's CF encoding) and empty float32 arrays; a chunk is one init x
    leads_per_chunk leads x the full grid (and all levels)."""
    import xarray as xr
    import zarr

    d, ds = job.data.dims, data.ds
    lat = np.asarray(ds[d.latitude].values)  # the data set's order (the reader serves north to south)
    coords = {TIME: inits, LEAD: leads, LAT: (LAT, lat, _attrs(ds[d.latitude].attrs)),
              LON: (LON, np.asarray(ds[d.longitude].values), _attrs(ds[d.longitude].attrs))}
    levels = job.model.channels.levels
    if job.model.channels.atmospheric:
        lev_coord = ds[d.level]
        coords[LEVEL] = (LEVEL, np.array([job.data.level(lev) for lev in levels], dtype=lev_coord.dtype),
                         _attrs(lev_coord.attrs))
    shutil.rmtree(path, ignore_errors=True)
    xr.Dataset(coords=coords, attrs=attrs).to_zarr(path, mode="w", consolidated=False)
    group = zarr.open_group(str(path), mode="r+")
    H, W = job.model.grid
    lc = leads_per_chunk(job, len(leads))
    for var in output_variables(job):
        dims = [TIME, LEAD] + ([LEVEL] if var.levels else []) + [LAT, LON]
        shape = [len(inits), len(leads)] + ([len(levels)] if var.levels else []) + [H, W]
        group.create_array(var.name, shape=shape, chunks=[1, lc] + shape[2:], dtype="float32", fill_value=np.nan,
                           dimension_names=dims, attributes=_attrs(ds[var.name].attrs))


class StoreWriter:
    """Writes decoded leads (physical units, the data set's latitude order) into their region of the
    store, a whole chunk of leads at a time."""

    def __init__(self, path: Path, job: Job, flip: bool, mean: np.ndarray, std: np.ndarray, steps: int):
        import zarr

        group = zarr.open_group(str(path), mode="r+")
        self.vars = [(group[v.name], v) for v in output_variables(job)]
        self.flip, self.mean, self.std = flip, mean[:, None, None], std[:, None, None]
        self.steps, self.per_chunk = steps, leads_per_chunk(job, steps)
        self.pending: list[np.ndarray] = []

    def add(self, first_init: int, lead: int, full: np.ndarray) -> None:
        """full: (B, C, H, W) normalised model output at lead index `lead` of inits first_init ..
        first_init + B - 1; leads arrive in order."""
        x = full * self.std + self.mean
        self.pending.append(x[..., ::-1, :] if self.flip else x)
        if (lead + 1) % self.per_chunk == 0 or lead + 1 == self.steps:
            block = np.stack(self.pending, axis=1)  # (B, leads, C, H, W)
            rows, cols = slice(first_init, first_init + block.shape[0]), slice(lead + 1 - block.shape[1], lead + 1)
            for arr, var in self.vars:
                arr[rows, cols] = block[:, :, var.channels] if var.levels else block[:, :, var.channels[0]]
            self.pending = []


# ------------------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m weathermixer.forecast", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint tag dir, checkpoint root (latest) or "
                                                       "consolidated checkpoint")
    p.add_argument("--init-times", nargs="+", required=True, metavar="TIME",
                   help="START END (with --init-every) or a comma-separated list of init times")
    p.add_argument("--init-every", type=float, metavar="HOURS", help="spacing of the init times from START to END")
    p.add_argument("--lead-hours", type=float, required=True, help="last lead; a multiple of the model step")
    p.add_argument("--out", required=True, help="output zarr store")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--mode", choices=["autoregressive", "latent"], default="autoregressive")
    p.add_argument("--reencode-every", type=int, metavar="STEPS",
                   help="autoregressive: latent steps per encode (default: the trained rollout length)")
    p.add_argument("--dp", type=int, default=1, help="data-parallel replicas (over init times)")
    p.add_argument("--domain", type=int, default=1, help="ranks splitting the globe of one forecast")
    p.add_argument("--tp", type=int, default=1, help="ranks splitting the channels of one forecast")
    p.add_argument("--batch", type=int, default=1, help="init times per forward pass")
    p.add_argument("--data-path", help="data set to read the initial conditions from (default: the job's)")
    p.add_argument("--stats", help="normalisation statistics (default: the job's)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (default fp32)")
    p.add_argument("--timings", metavar="JSON", help="write throughput figures to this file (rank 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _validate_args(args) -> None:
    for flag in ("dp", "domain", "tp", "batch"):
        if getattr(args, flag) < 1:
            raise ForecastError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= 1")
    if args.reencode_every is not None:
        if args.mode != "autoregressive":
            raise ForecastError("--reencode-every applies to --mode autoregressive")
        if args.reencode_every < 1:
            raise ForecastError(f"--reencode-every {args.reencode_every}: must be >= 1")
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ForecastError(f"--out {out} exists; choose another path or pass --overwrite")


class _PeerFailed(RuntimeError):
    """Another rank failed while setting up (and printed why); carries the job's exit code."""

    def __init__(self, rank: int, code: int):
        super().__init__(f"rank {rank} failed")
        self.code = code


def _agree(err: BaseException | None, rank: int, device) -> None:
    """Collective: the lowest failing rank raises its error, the others _PeerFailed with the same
    exit code (one message, no rank left in a collective)."""
    from jigsaw_ext.mesh import failed_ranks

    bad = failed_ranks(err, EXIT_BAD_INPUT if isinstance(err, ForecastError) else EXIT_FAILED, device)
    if bad:
        first = min(bad)
        if rank == first:
            raise err
        raise _PeerFailed(first, bad[first])


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if rank == 0 else (lambda msg: None)
    try:  # everything that needs no process group and no data: the same answer on every rank
        _validate_args(args)
        check_mesh(args.dp, args.domain, args.tp, world)
        inits = parse_init_times(args.init_times, args.init_every)
        job = read_job(args.checkpoint, args.data_path, args.stats)
        dt = pd.Timedelta(hours=job.data.dt_hours)
        steps = lead_steps(args.lead_hours, job.data.dt_hours)
    except ForecastError as err:
        say(f"error: {err}")
        return EXIT_BAD_INPUT

    import torch.distributed as dist

    from jigsaw_ext.mesh import Mesh, MeshConfig, init_mesh, init_process_group

    own_group = False
    if world > 1:
        own_group = not dist.is_initialized()
        init_process_group()
        mesh = init_mesh(MeshConfig(dp=args.dp, domain=args.domain, tp=args.tp))
    else:
        mesh = Mesh.single()
    try:
        return _run(args, job, mesh, inits, steps, dt, rank, world)
    except ForecastError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        code = EXIT_BAD_INPUT
    except _PeerFailed as err:
        code = err.code
    except Exception as err:  # noqa: BLE001 - an I/O error, a dead peer: bring the job down
        traceback.print_exc()
        print(f"forecast (rank {rank}): {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        if world > 1:
            os._exit(EXIT_FAILED)  # a collective with a dead peer could block the teardown
        return EXIT_FAILED
    finally:
        if own_group and dist.is_initialized():
            dist.destroy_process_group()
    return code


def _run(args, job: Job, mesh, inits, steps: int, dt, rank: int, world: int) -> int:
    import torch
    import torch.distributed as dist

    from jigsaw_ext.checkpoint import CheckpointFormatError, load_into_model

    from ..model.geometry import Geometry, MeshMismatch
    from ..model.mixer import WeatherMixer
    from ..train.trainer import set_threads

    set_threads()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    out, partial = Path(args.out), Path(str(args.out).rstrip("/") + ".partial")
    writer_rank = mesh.coord("model") == 0
    per_encode = steps if args.mode == "latent" else (args.reencode_every or job.trained_leads)

    err = None
    try:
        try:
            geo = Geometry(job.model, mesh)
        except MeshMismatch as e:
            raise ForecastError(f"mesh {mesh.config}: {e}") from None
        data, loader, mean, std = open_data(job, mesh, inits)
        if job.stats_origin == "checkpoint" and os.path.exists(job.data.stats):
            os.unlink(job.data.stats)  # read by now (the loader keeps the arrays)
        model = WeatherMixer(job.model, mesh, device=device)
        try:
            load_into_model(model, job.checkpoint)
        except CheckpointFormatError as e:
            raise ForecastError(f"--checkpoint: {e}") from None
        model.eval()
    except Exception as e:  # noqa: BLE001 - agreed on below, then raised on the rank that had it
        err = e
    _agree(err, rank, device)

    leads = pd.TimedeltaIndex([dt * (i + 1) for i in range(steps)])
    if rank == 0:
        attrs = {"title": "WeatherMixer forecast", "source_checkpoint": str(job.checkpoint.resolve()),
                 "checkpoint_step": int(job.info.get("step", -1)), "forecast_mode": args.mode,
                 "latent_steps_per_encode": per_encode, "dt_hours": job.data.dt_hours,
                 "initial_conditions": job.data.path, "trained_rollout_mode": job.rollout_mode,
                 "normalisation_statistics": job.stats_origin,
                 "created_by": "python -m weathermixer.forecast"}
        create_store(partial, job, data, inits, leads, attrs)
    if world > 1:
        dist.barrier()

    # batches of inits; dp replica r takes batches r, r + dp, ...
    B, dp = args.batch, mesh.size("dp")
    batches = [(i, min(i + B, len(inits))) for i in range(0, len(inits), B)]
    mine = batches[mesh.coord("dp")::dp]
    writer = StoreWriter(partial, job, data.flip, mean, std, steps) if writer_rank else None
    from tqdm import tqdm

    bar = tqdm(total=len(inits), desc="forecast", unit="init", disable=rank != 0 or args.quiet,
               file=sys.stderr, dynamic_ncols=True, mininterval=1.0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    t_model = t_out = 0.0
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for j, (a, b) in enumerate(mine):
        ids = np.searchsorted(loader.starts, data.times.get_indexer(inits[a:b]))
        sample = loader.load_batch(ids)
        fields = sample.fields.to(device)
        static = None if sample.static is None else sample.static.to(device)
        with torch.no_grad(), autocast:
            clock = time.perf_counter()
            for lead, y in rollout(model, fields, static, loader, list(inits[a:b]), steps, per_encode, dt):
                t_model += time.perf_counter() - clock
                clock = time.perf_counter()
                full = gather_full(y.float(), mesh, geo)
                if writer is not None:
                    writer.add(a, lead, full.cpu().numpy())
                t_out += time.perf_counter() - clock
                clock = time.perf_counter()
        round_ = batches[j * dp:(j + 1) * dp]
        bar.update(sum(e - s for s, e in round_))
    bar.close()
    if cuda:
        torch.cuda.synchronize()
    if world > 1:
        dist.barrier()  # every writer is done
    t_loop = time.perf_counter() - t0
    if rank == 0:
        if out.exists():
            shutil.rmtree(out)
        partial.rename(out)
        n = len(inits) * steps
        timings = {"inits": len(inits), "leads": steps, "model_steps": n, "seconds": t_loop,
                   "steps_per_s": n / t_loop, "inits_per_s": len(inits) / t_loop,
                   "rank0_model_s": t_model, "rank0_gather_write_s": t_out, "mesh": mesh.config.model_dump(),
                   "mode": args.mode, "latent_steps_per_encode": per_encode, "batch": B, "device": str(device)}
        if args.timings:
            Path(args.timings).write_text(json.dumps(timings, indent=1))
        print(f"wrote {out}: {len(inits)} init(s) x {steps} lead(s) of {job.data.dt_hours:g} h ({args.mode}, "
              f"{per_encode} latent step(s) per encode) on mesh {mesh.config}; {t_loop:.1f} s, "
              f"{n / t_loop:.1f} model steps/s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
