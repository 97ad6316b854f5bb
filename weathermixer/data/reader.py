"""Lazy, block-wise reads of a gridded data set (WeatherBench 2 ERA5 zarr layout or any mapped one).

Opening validates everything once (variables, levels, dimensions, grid, time axis) with errors that
name the file, variable, dimension or time. Reads then fetch only the requested block: one time,
a range of latitude rows, a range of model channels. With xarray's lazy backend (no dask) a block
read touches only the zarr chunks overlapping it.

Latitude order: rows are returned NORTH TO SOUTH (descending latitude, as ERA5 and the model's
synthetic data); a store with ascending latitude is flipped on read (the row range is mapped to the
store's contiguous range first, so reads stay chunk-aligned).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import xarray as xr

from ..config import ChannelsConfig
from .config import COMPUTED_STATIC, DataConfig


class DataError(ValueError):
    pass


def open_dataset(cfg: DataConfig, store=None) -> xr.Dataset:
    """Open lazily (no data read). `store`: a zarr store object to use instead of cfg.path."""
    where = cfg.path or "<store>"
    try:
        if store is not None:
            return xr.open_zarr(store, chunks=None, consolidated=False)
        if cfg.resolved_format() == "netcdf":
            return xr.open_dataset(cfg.path, chunks=None)
        remote = "://" in cfg.path and not cfg.path.startswith("file://")
        return xr.open_zarr(cfg.path, chunks=None, consolidated=None if remote else False)
    except (ImportError, ModuleNotFoundError) as err:
        raise DataError(f"cannot open {where}: {err} (remote stores need fsspec plus gcsfs for gs:// "
                        f"or s3fs for s3://; netCDF4 files need netCDF4 or h5netcdf)") from None
    except FileNotFoundError as err:
        raise DataError(f"data set not found: {where} ({err})") from None


@dataclass(frozen=True)
class Channel:
    name: str  # model channel name, e.g. temperature_850
    var: str  # the data set's variable
    level: int | None  # model level (None for surface / static)
    level_index: int | None  # index on the data set's level dimension


class GriddedDataset:
    """The data set of one job, validated against the model's channels and grid."""

    def __init__(self, cfg: DataConfig, channels: ChannelsConfig, grid: tuple[int, int], store=None):
        self.cfg, self.grid = cfg, tuple(grid)
        self.where = cfg.path or "<store>"
        self.ds = open_dataset(cfg, store)
        d = cfg.dims
        self._dims = d
        for key, dim in (("time", d.time), ("latitude", d.latitude), ("longitude", d.longitude)):
            if dim not in self.ds.dims:
                raise DataError(f"{self.where}: no dimension '{dim}' (data.dims.{key}); the data set's "
                                f"dimensions are {sorted(map(str, self.ds.dims))}")
        self._read_grid()
        self._read_time()
        self.channels = self._resolve(channels)
        self.static = [self._static_channel(n) for n in channels.static if n not in COMPUTED_STATIC]

    # validation ---------------------------------------------------------------------------------
    def _coord(self, dim: str) -> np.ndarray:
        if dim in self.ds.variables:
            return np.asarray(self.ds[dim].values)
        raise DataError(f"{self.where}: dimension '{dim}' has no coordinate variable (its values are needed)")

    def _read_grid(self):
        lat = self._coord(self._dims.latitude).astype(np.float64)
        lon = self._coord(self._dims.longitude).astype(np.float64)
        if (len(lat), len(lon)) != self.grid:
            raise DataError(f"{self.where}: grid ({self._dims.latitude}, {self._dims.longitude}) = "
                            f"({len(lat)}, {len(lon)}) but model.grid is {list(self.grid)}")
        dl = np.diff(lat)
        if len(lat) > 1 and not (np.all(dl > 0) or np.all(dl < 0)):
            raise DataError(f"{self.where}: latitude coordinate '{self._dims.latitude}' is not monotonic")
        self.flip = len(lat) > 1 and bool(dl[0] > 0)  # store ascending -> flip to north..south
        self.lat = lat[::-1].copy() if self.flip else lat
        self.lon = lon

    def _read_time(self):
        t = self._coord(self._dims.time)
        if not np.issubdtype(t.dtype, np.datetime64):
            raise DataError(f"{self.where}: time coordinate '{self._dims.time}' has dtype {t.dtype}, "
                            f"expected datetimes (CF-encoded times are decoded by xarray)")
        self.times = pd.DatetimeIndex(t)
        if len(t) < 2:
            raise DataError(f"{self.where}: only {len(t)} time step(s)")
        diffs = np.diff(t)
        if np.any(diffs <= np.timedelta64(0)):
            i = int(np.argmax(diffs <= np.timedelta64(0)))
            raise DataError(f"{self.where}: time axis not increasing at {self.times[i]} -> {self.times[i + 1]}")
        step = pd.Timedelta(np.min(diffs))
        bad = np.flatnonzero(diffs != np.min(diffs))
        if len(bad):
            i = bad[0]
            raise DataError(f"{self.where}: gap in the time axis between {self.times[i]} and "
                            f"{self.times[i + 1]} ({pd.Timedelta(diffs[i]) / pd.Timedelta(hours=1):g} h; "
                            f"the step is {step / pd.Timedelta(hours=1):g} h); {len(bad)} irregular interval(s)")
        self.step = step
        hours = step / pd.Timedelta(hours=1)
        if self.cfg.step_hours is not None and abs(hours - self.cfg.step_hours) > 1e-9:
            raise DataError(f"{self.where}: time step is {hours:g} h but data.step_hours={self.cfg.step_hours:g}")
        k = self.cfg.dt_hours / hours
        if abs(k - round(k)) > 1e-6 or round(k) < 1:
            raise DataError(f"data.dt_hours={self.cfg.dt_hours:g} is not a multiple of the time step "
                            f"{hours:g} h of {self.where}")
        self.k = int(round(k))  # data steps per model step

    def _var(self, var: str, channel: str, need_level: bool, allow_time: bool = True) -> xr.DataArray:
        if var not in self.ds.data_vars:
            alias = "" if var == channel else f" (data.variables maps '{channel}' to it)"
            raise DataError(f"{self.where}: variable '{var}' for model channel '{channel}'{alias} not found; "
                            f"data variables: {sorted(map(str, self.ds.data_vars))}")
        da = self.ds[var]
        d = self._dims
        want = ([d.time] if allow_time else []) + ([d.level] if need_level else []) + [d.latitude, d.longitude]
        missing = [x for x in want if x not in da.dims]
        extra = [x for x in da.dims if x not in want and not (x == d.time and not allow_time and da.sizes[x] == 1)]
        if missing or extra:
            raise DataError(f"{self.where}: variable '{var}' has dimensions {tuple(map(str, da.dims))}; "
                            f"expected {tuple(want)}" + (f", missing {missing}" if missing else "")
                            + (f", unexpected {extra}" if extra else "")
                            + " (names set by data.dims)")
        return da

    def _resolve(self, ch: ChannelsConfig) -> list[Channel]:
        out = [Channel(n, self.cfg.variable(n), None, None) for n in ch.surface]
        for c in out:
            self._var(c.var, c.name, need_level=False)
        if ch.atmospheric:
            if self._dims.level not in self.ds.dims:
                raise DataError(f"{self.where}: no dimension '{self._dims.level}' (data.dims.level) for the "
                                f"atmospheric variables {ch.atmospheric}")
            levels = self._coord(self._dims.level).astype(np.float64)
        for v in ch.atmospheric:
            var = self.cfg.variable(v)
            self._var(var, v, need_level=True)
            for lev in ch.levels:
                want = self.cfg.level(lev)
                hit = np.flatnonzero(np.isclose(levels, want))
                if not len(hit):
                    raise DataError(f"{self.where}: level {want:g} of variable '{var}' not in the level "
                                    f"coordinate '{self._dims.level}' {levels.tolist()} (model.channels.levels, "
                                    f"data.levels)")
                out.append(Channel(f"{v}_{lev}", var, lev, int(hit[0])))
        return out

    def _static_channel(self, name: str) -> Channel:
        var = self.cfg.variable(name)
        self._var(var, name, need_level=False, allow_time=False)
        return Channel(name, var, None, None)

    # reads --------------------------------------------------------------------------------------
    def store_rows(self, rows: slice) -> slice:
        """Model rows (north..south) -> the store's contiguous row range."""
        if not self.flip:
            return rows
        h = self.grid[0]
        return slice(h - rows.stop, h - rows.start)

    def _read(self, channels: list[Channel], rows: slice, time: int | None) -> np.ndarray:
        d = self._dims
        srows = self.store_rows(rows)
        out = np.empty((len(channels), rows.stop - rows.start, self.grid[1]), dtype=np.float32)
        i = 0
        while i < len(channels):  # one read per run of channels of the same variable
            j = i + 1
            while j < len(channels) and channels[j].var == channels[i].var and channels[i].level is not None:
                j += 1
            run = channels[i:j]
            da = self.ds[run[0].var].variable
            sel = {d.latitude: srows}
            if d.time in da.dims:
                sel[d.time] = time if time is not None else 0
            if run[0].level is not None:
                idx = [c.level_index for c in run]
                sel[d.level] = (slice(idx[0], idx[-1] + 1) if idx == list(range(idx[0], idx[-1] + 1)) else idx)
                block = da.isel(sel).transpose(d.level, d.latitude, d.longitude).values
            else:
                block = da.isel(sel).transpose(d.latitude, d.longitude).values[None]
            out[i:j] = block[:, ::-1] if self.flip else block
            i = j
        return out

    def read_fields(self, time: int, rows: slice, channels: slice) -> np.ndarray:
        """(channels, rows, lon) float32 of model channels [channels] at time index `time`."""
        return self._read(self.channels[channels], rows, time)

    def read_static(self, names: list[str], rows: slice) -> np.ndarray:
        by_name = {c.name: c for c in self.static}
        return self._read([by_name[n] for n in names], rows, None)

    # samples ------------------------------------------------------------------------------------
    def sample_starts(self, split: str, leads: int, history: int) -> np.ndarray:
        """Time indices t with t - history*k >= 0 and t + leads*k inside the data, in the split's dates."""
        T, k = len(self.times), self.k
        lo, hi = history * k, T - 1 - leads * k
        span = f"{leads} lead(s) and {history} history step(s) of {self.cfg.dt_hours:g} h"
        if hi < lo:
            raise DataError(f"{self.where}: {T} time steps ({self.times[0]} .. {self.times[-1]}) are too few for "
                            f"{span}: need at least {(leads + history) * k + 1}")
        idx = np.arange(lo, hi + 1)
        if split in self.cfg.splits:
            a, b = (pd.Timestamp(x) for x in self.cfg.splits[split])
            t = self.times[idx]
            idx = idx[(t >= a) & (t <= b)]
            if not len(idx):
                raise DataError(f"{self.where}: split '{split}' ({a} .. {b}, data.splits) contains no sample "
                                f"start with {span}; the data covers {self.times[0]} .. {self.times[-1]}")
        elif self.cfg.splits:
            raise DataError(f"split '{split}' not in data.splits (has {sorted(self.cfg.splits)})")
        return idx


def check_finite(block: np.ndarray, names: list[str], time, lat: np.ndarray, lon: np.ndarray,
                 where: str) -> None:
    """Raise naming the variable, time and location of the first NaN/inf in (C, rows, lon)."""
    bad = ~np.isfinite(block)
    if bad.any():
        c, r, q = np.argwhere(bad)[0]
        raise DataError(f"{where}: non-finite value {block[c, r, q]} in '{names[c]}' at time {time}, "
                        f"latitude {lat[r]:g}, longitude {lon[q]:g} ({int(bad.sum())} non-finite value(s) "
                        f"in this block; set data.nonfinite='zero' to mask them)")
