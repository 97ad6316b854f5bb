"""The output store: a zarr store in the WeatherBench 2 forecast layout (time, prediction_timedelta,
[level,] latitude, longitude; the data set's variable names, latitude order and attributes, with a
`units` attribute from weathermixer.data.units where the data set has none), built
under OUT.partial and renamed to OUT when it is complete. A chunk holds one init and a block of its
leads, so the writers of different inits never share a chunk."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..data.units import with_units
from .inputs import Job

LEAD, LEVEL, LAT, LON, TIME, VALID = "prediction_timedelta", "level", "latitude", "longitude", "time", "valid_time"


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


# attributes that describe the truth's values and are not true of a forecast's
STALE_ATTRS = {"actual_range", "valid_range", "valid_min", "valid_max", "scale_factor", "add_offset", "missing_value"}


def _attrs(attrs: dict, drop: set = frozenset()) -> dict:
    """JSON-able attributes, without the encoding keys xarray manages itself (and `drop`)."""
    out = {}
    for k, v in attrs.items():
        if k.startswith("_") or k == "coordinates" or k in drop or k.startswith("GRIB_"):
            continue
        out[str(k)] = v.item() if isinstance(v, np.generic) else v.tolist() if isinstance(v, np.ndarray) else v
    return out


CHUNK_BYTES = 16 * 2**20


def leads_per_chunk(job: Job, steps: int) -> int:
    """Leads per store chunk: as many as fit in CHUNK_BYTES for the largest variable (at least one),
    so small grids do not become thousands of tiny chunks and large ones stay one lead per chunk."""
    ch = job.model.channels
    per_lead = 4 * job.model.grid[0] * job.model.grid[1] * (len(ch.levels) if ch.atmospheric else 1)
    return max(1, min(steps, CHUNK_BYTES // per_lead))


def create_store(
    path: Path, job: Job, data, inits, leads: pd.TimedeltaIndex, attrs: dict, zarr_format: int = 3
) -> None:
    """Coordinates (xarray's CF encoding; valid_time = time + prediction_timedelta as WeatherBench 2
    has it) and empty float32 arrays without the truth's value attributes (actual_range, ...); a chunk
    is one init x leads_per_chunk leads x the full grid (and all levels). zarr_format 2 for older readers."""
    import xarray as xr
    import zarr

    d, ds = job.data.dims, data.ds
    lat = np.asarray(ds[d.latitude].values)  # the data set's order (the reader serves north to south)
    coords = {
        TIME: inits,
        LEAD: leads,
        VALID: ((TIME, LEAD), np.add.outer(inits.values, leads.values)),
        LAT: (LAT, lat, _attrs(ds[d.latitude].attrs)),
        LON: (LON, np.asarray(ds[d.longitude].values), _attrs(ds[d.longitude].attrs)),
    }
    levels = job.model.channels.levels
    if job.model.channels.atmospheric:
        lev_coord = ds[d.level]
        coords[LEVEL] = (
            LEVEL,
            np.array([job.data.level(lev) for lev in levels], dtype=lev_coord.dtype),
            _attrs(lev_coord.attrs),
        )
    shutil.rmtree(path, ignore_errors=True)
    xr.Dataset(coords=coords, attrs=attrs).to_zarr(path, mode="w", consolidated=False, zarr_format=zarr_format)
    group = zarr.open_group(str(path), mode="r+", zarr_format=zarr_format)
    H, W = job.model.grid
    lc = leads_per_chunk(job, len(leads))
    for var in output_variables(job):
        dims = [TIME, LEAD] + ([LEVEL] if var.levels else []) + [LAT, LON]
        shape = [len(inits), len(leads)] + ([len(levels)] if var.levels else []) + [H, W]
        attributes = with_units(var.name, _attrs(ds[var.name].attrs, STALE_ATTRS))
        if zarr_format == 2:  # xarray's dimension names in format 2
            group.create_array(
                var.name,
                shape=shape,
                chunks=[1, lc] + shape[2:],
                dtype="float32",
                fill_value=np.nan,
                attributes={**attributes, "_ARRAY_DIMENSIONS": dims},
            )
        else:
            group.create_array(
                var.name,
                shape=shape,
                chunks=[1, lc] + shape[2:],
                dtype="float32",
                fill_value=np.nan,
                dimension_names=dims,
                attributes=attributes,
            )


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


def partial_path(out: str | Path) -> Path:
    """Where the store is built before it is complete: OUT.partial."""
    return Path(str(out).rstrip("/") + ".partial")


def publish(partial: Path, out: Path) -> None:
    """Consolidate the metadata of the complete store built at `partial` (readers open it with one
    request, xr.open_zarr's default) and replace `out` (if it exists) with it."""
    import warnings

    import zarr

    with warnings.catch_warnings():  # zarr 3 notes that consolidated metadata is not yet in the v3 spec
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(str(partial))
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)


def store_attributes(job: Job, mode: str, per_encode: int, skip_only: bool = False) -> dict:
    """The store's global attributes: the checkpoint, how the forecast was rolled out, from what data."""
    extra = {"model_part": "the per-pixel skip head alone (network tendency set to 0)"} if skip_only else {}
    return {
        "title": "WeatherMixer forecast",
        **extra,
        "source_checkpoint": str(job.checkpoint.resolve()),
        "checkpoint_step": int(job.info.get("step", -1)),
        "forecast_mode": mode,
        "latent_steps_per_encode": per_encode,
        "dt_hours": job.data.dt_hours,
        "reencode_default_from": job.reencode_origin or "the trained rollout length",
        "initial_conditions": job.data.path,
        "trained_rollout_mode": job.rollout_mode,
        "normalisation_statistics": job.stats_origin,
        "created_by": "python -m weathermixer.forecast",
    }
