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

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import xarray as xr

from ..config import ChannelsConfig
from ..config.data import DataConfig, daily_cycle_static, is_computed_static


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
        if cfg.resolved_format() == "grib":
            return open_grib(cfg.path)
        remote = "://" in cfg.path and not cfg.path.startswith("file://")
        return xr.open_zarr(cfg.path, chunks=None, consolidated=None if remote else False)
    except (ImportError, ModuleNotFoundError) as err:
        raise DataError(
            f"cannot open {where}: {err} (remote stores need fsspec plus gcsfs for gs:// "
            f"or s3fs for s3://; netCDF4 files need netCDF4 or h5netcdf)"
        ) from None
    except FileNotFoundError as err:
        raise DataError(f"data set not found: {where} ({err})") from None


def open_grib(path: str) -> xr.Dataset:
    """A GRIB file through cfgrib (the optional [grib] extra), without an index file beside it."""
    try:
        import cfgrib  # noqa: F401
    except ImportError:
        raise DataError(
            f"cannot open {path}: reading GRIB needs cfgrib and eccodes: pip install "
            f"'jigsaw-weathermixer[grib]' (or convert the file to zarr/netCDF)"
        ) from None
    return xr.open_dataset(path, engine="cfgrib", backend_kwargs={"indexpath": ""}, chunks=None)


def decode_integer_times(t: np.ndarray, units: str | None, where: str, dim: str) -> np.ndarray:
    """An integer/float time coordinate in CF units ('hours since 1940-01-01') as datetimes."""
    if not units or " since " not in units:
        raise DataError(
            f"{where}: time coordinate '{dim}' has dtype {t.dtype} and no CF units; set "
            f"data.time_units (e.g. 'hours since 1940-01-01') to decode it, and data.dims.time "
            f"if the time dimension has another name"
        )
    unit, origin = units.split(" since ", 1)
    try:
        return np.asarray(
            pd.Timestamp(origin.split("(")[0].strip()) + pd.to_timedelta(t, unit=unit.strip().rstrip("s"))
        )
    except (ValueError, TypeError) as err:
        raise DataError(f"{where}: cannot decode time coordinate '{dim}' with units {units!r}: {err}") from None


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
        self.chunks = ChunkCheck(self, store)
        d = cfg.dims
        self._dims = d
        for key, dim in (("time", d.time), ("latitude", d.latitude), ("longitude", d.longitude)):
            if dim not in self.ds.dims:
                raise DataError(
                    f"{self.where}: no dimension '{dim}' (data.dims.{key}); the data set's "
                    f"dimensions are {sorted(map(str, self.ds.dims))}"
                )
        self._read_grid()
        self._read_time()
        self.channels = self._resolve(channels)
        self.static = [self._static_channel(n) for n in channels.static if not is_computed_static(n)]
        # predicted channels whose per-pixel mean daily cycle is a static input (fitted by compute_stats)
        self.daily_cycle: list[str] = []
        for n in channels.static:
            if (dc := daily_cycle_static(n)) is None:
                continue
            if dc[1] not in channels.names:
                raise DataError(
                    f"static channel '{n}': '{dc[1]}' is not a predicted channel of the model "
                    f"(model.channels: {channels.names})"
                )
            if dc[1] not in self.daily_cycle:
                self.daily_cycle.append(dc[1])

    # validation ---------------------------------------------------------------------------------
    def _coord(self, dim: str) -> np.ndarray:
        if dim in self.ds.variables:
            return np.asarray(self.ds[dim].values)
        raise DataError(f"{self.where}: dimension '{dim}' has no coordinate variable (its values are needed)")

    def _read_grid(self):
        lat = self._coord(self._dims.latitude).astype(np.float64)
        lon = self._coord(self._dims.longitude).astype(np.float64)
        if (len(lat), len(lon)) != self.grid:
            raise DataError(
                f"{self.where}: grid ({self._dims.latitude}, {self._dims.longitude}) = "
                f"({len(lat)}, {len(lon)}) but model.grid is {list(self.grid)}"
            )
        dl = np.diff(lat)
        if len(lat) > 1 and not (np.all(dl > 0) or np.all(dl < 0)):
            raise DataError(f"{self.where}: latitude coordinate '{self._dims.latitude}' is not monotonic")
        self.flip = len(lat) > 1 and bool(dl[0] > 0)  # store ascending -> flip to north..south
        self.lat = lat[::-1].copy() if self.flip else lat
        self.lon = lon

    def _read_time(self):
        t = self._coord(self._dims.time)
        if np.issubdtype(t.dtype, np.number):
            dim = self._dims.time
            units = self.cfg.time_units or self.ds[dim].attrs.get("units") or self.ds.attrs.get("time_units")
            t = decode_integer_times(t, units, self.where, dim)
        if not np.issubdtype(t.dtype, np.datetime64):
            raise DataError(
                f"{self.where}: time coordinate '{self._dims.time}' has dtype {t.dtype}, "
                f"expected datetimes (CF-encoded times are decoded by xarray)"
            )
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
            steps = sorted({pd.Timedelta(d) / pd.Timedelta(hours=1) for d in diffs})
            raise DataError(
                f"{self.where}: gap in the time axis between {self.times[i]} and "
                f"{self.times[i + 1]} ({pd.Timedelta(diffs[i]) / pd.Timedelta(hours=1):g} h; "
                f"the step is {step / pd.Timedelta(hours=1):g} h); {len(bad)} irregular interval(s) "
                f"(steps seen: {', '.join(f'{h:g} h' for h in steps[:6])}). The model steps a fixed "
                f"dt: resample the data set to a regular step first (e.g. xarray's "
                f"ds.interp(time=pd.date_range(first, last, freq='6h')) or a selection of the times "
                f"that are a multiple of dt apart) and write it to zarr"
            )
        self.step = step
        hours = step / pd.Timedelta(hours=1)
        if self.cfg.step_hours is not None and abs(hours - self.cfg.step_hours) > 1e-9:
            raise DataError(f"{self.where}: time step is {hours:g} h but data.step_hours={self.cfg.step_hours:g}")
        k = self.cfg.dt_hours / hours
        if abs(k - round(k)) > 1e-6 or round(k) < 1:
            raise DataError(
                f"data.dt_hours={self.cfg.dt_hours:g} is not a multiple of the time step {hours:g} h of {self.where}"
            )
        self.k = int(round(k))  # data steps per model step

    def _var(self, var: str, channel: str, need_level: bool, allow_time: bool = True) -> xr.DataArray:
        if var not in self.ds.data_vars:
            alias = "" if var == channel else f" (data.variables maps '{channel}' to it)"
            raise DataError(
                f"{self.where}: variable '{var}' for model channel '{channel}'{alias} not found; "
                f"data variables: {sorted(map(str, self.ds.data_vars))}"
            )
        da = self.ds[var]
        d = self._dims
        want = ([d.time] if allow_time else []) + ([d.level] if need_level else []) + [d.latitude, d.longitude]
        missing = [x for x in want if x not in da.dims]
        extra = [x for x in da.dims if x not in want and not (x == d.time and not allow_time and da.sizes[x] == 1)]
        if missing or extra:
            raise DataError(
                f"{self.where}: variable '{var}' has dimensions {tuple(map(str, da.dims))}; "
                f"expected {tuple(want)}"
                + (f", missing {missing}" if missing else "")
                + (f", unexpected {extra}" if extra else "")
                + " (names set by data.dims)"
            )
        return da

    def _resolve(self, ch: ChannelsConfig) -> list[Channel]:
        out = [Channel(n, self.cfg.variable(n), None, None) for n in ch.surface]
        for c in out:
            self._var(c.var, c.name, need_level=False)
        if ch.atmospheric:
            if self._dims.level not in self.ds.dims:
                raise DataError(
                    f"{self.where}: no dimension '{self._dims.level}' (data.dims.level) for the "
                    f"atmospheric variables {ch.atmospheric}"
                )
            levels = self._coord(self._dims.level).astype(np.float64)
        for v in ch.atmospheric:
            var = self.cfg.variable(v)
            self._var(var, v, need_level=True)
            for lev in ch.levels:
                want = self.cfg.level(lev)
                hit = np.flatnonzero(np.isclose(levels, want))
                if not len(hit):
                    raise DataError(
                        f"{self.where}: level {want:g} of variable '{var}' not in the level "
                        f"coordinate '{self._dims.level}' {levels.tolist()} (model.channels.levels, "
                        f"data.levels)"
                    )
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

    def _read(self, channels: list[Channel], rows: slice, time) -> np.ndarray:
        """(channels, rows, lon) at one time index (None: a static variable), or (times, channels, rows,
        lon) at a sequence of time indices, read in one request per run of channels of one variable."""
        d = self._dims
        srows = self.store_rows(rows)
        many = time is not None and not isinstance(time, (int, np.integer))
        if many:
            t = np.asarray(time, dtype=np.int64)
            if len(t) and (t.min() < 0 or t.max() >= len(self.times)):
                raise IndexError(
                    f"{self.where}: time index {int(t.min() if t.min() < 0 else t.max())} out of "
                    f"range 0 .. {len(self.times) - 1}"
                )
            # a run of consecutive indices is a slice: zarr reads its chunks without fancy indexing
            when = slice(int(t[0]), int(t[-1]) + 1) if len(t) and np.all(np.diff(t) == 1) else t
        lead = (d.time,) if many else ()
        out = np.empty(
            ((len(t),) if many else ()) + (len(channels), rows.stop - rows.start, self.grid[1]), dtype=np.float32
        )
        i = 0
        while i < len(channels):  # one read per run of channels of the same variable
            j = i + 1
            while j < len(channels) and channels[j].var == channels[i].var and channels[i].level is not None:
                j += 1
            run = channels[i:j]
            sel = {d.latitude: srows}
            if d.time in self.ds[run[0].var].dims:
                sel[d.time] = (when if many else time) if time is not None else 0
            if run[0].level is not None:
                idx = [c.level_index for c in run]
                sel[d.level] = slice(idx[0], idx[-1] + 1) if idx == list(range(idx[0], idx[-1] + 1)) else idx
                block = self._values(run[0].var, sel, lead + (d.level, d.latitude, d.longitude))
            else:
                block = self._values(run[0].var, sel, lead + (d.latitude, d.longitude))[..., None, :, :]
            out[..., i:j, :, :] = block[..., ::-1, :] if self.flip else block
            i = j
        return out

    def _values(self, var: str, sel: dict, order: tuple) -> np.ndarray:
        """ds[var][sel] in dimension order `order`; a missing or undecodable zarr chunk is named."""
        try:
            x = self.ds[var].variable.isel(sel).transpose(*order).values
        except Exception as err:  # noqa: BLE001 - a codec's error names no chunk: find it and name it
            named = self.chunks.undecodable(var, sel, err)
            if named is err:
                raise
            raise named from err
        if self.chunks.enabled:  # an absent chunk reads as its fill value (NaN, 0, ...): name it
            self.chunks.check_present(var, sel, fatal=self.cfg.nonfinite == "error")
        return x

    def read_fields(self, time, rows: slice, channels: slice) -> np.ndarray:
        """(channels, rows, lon) float32 of model channels [channels] at time index `time`; with a
        sequence of time indices, (times, channels, rows, lon), one request per variable for all of them
        (a request per time costs ~1 ms of zarr and xarray overhead per variable, whatever its size)."""
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
            raise DataError(
                f"{self.where}: {T} time steps ({self.times[0]} .. {self.times[-1]}) are too few for "
                f"{span}: need at least {(leads + history) * k + 1}"
            )
        idx = np.arange(lo, hi + 1)
        if split in self.cfg.splits:
            a, b = (pd.Timestamp(x) for x in self.cfg.splits[split])
            t = self.times[idx]
            idx = idx[(t >= a) & (t <= b)]
            if not len(idx):
                raise DataError(
                    f"{self.where}: split '{split}' ({a} .. {b}, data.splits) contains no sample "
                    f"start with {span}; the data covers {self.times[0]} .. {self.times[-1]}"
                )
        elif self.cfg.splits:
            raise DataError(f"split '{split}' not in data.splits (has {sorted(self.cfg.splits)})")
        return idx


class NonFiniteWarning(UserWarning):
    """Values data.nonfinite='zero' sets to 0 (NaN/inf in the data, or a chunk absent from the store)."""


class ChunkCheck:
    """Names the zarr chunks behind a block read. zarr serves an absent chunk as its fill value (NaN
    for floats written by xarray, but 0 or any other value a writer chose: it would look like data)
    and a truncated or corrupt one as a bare codec error ("Zstd decompression error"); neither names
    the chunk. The keys of each variable this process reads are listed once (one `list_prefix` per
    variable, cached) and every read's chunks are looked up in that set: no request per read, and an
    absent chunk is found whatever its fill value."""

    def __init__(self, data: GriddedDataset, store=None):
        self.data, self._store, self._group = data, store, None
        self.enabled = store is not None or data.cfg.resolved_format() == "zarr"
        self._listed: dict[str, frozenset[str]] = {}
        self._warned: set[str] = set()

    def _stored(self, var: str, arr) -> frozenset[str]:
        """Every key the store holds under the array of `var` (listed once)."""
        from zarr.core.sync import sync

        if var not in self._listed:
            prefix = arr.store_path.path.strip("/")
            store = arr.store_path.store

            async def collect():
                return frozenset([k async for k in store.list_prefix(f"{prefix}/" if prefix else "")])

            self._listed[var] = sync(collect())
        return self._listed[var]

    def _array(self, var: str):
        import zarr

        if self._group is None:
            self._group = zarr.open_group(self._store if self._store is not None else self.data.cfg.path, mode="r")
            self._arrays = {}
        if var not in self._arrays:  # opening reads the array's metadata: once
            self._arrays[var] = self._group[var]
        return self._arrays[var]

    def _keys(self, var: str, sel: dict) -> tuple[object, list[tuple[str, tuple[int, ...]]]]:
        """(zarr array, [(store key, chunk coordinates)]) of the chunks (shards) a selection touches."""
        import itertools

        arr = self._array(var)
        grid = arr.shards or arr.chunks
        per_dim = []
        for dim, n, c in zip(self.data.ds[var].dims, arr.shape, grid, strict=True):
            s = sel.get(dim, slice(None))
            if isinstance(s, slice) and s.indices(n)[2] == 1:
                a, b, _ = s.indices(n)
                per_dim.append(list(range(a // c, (b - 1) // c + 1)) if b > a else [])
            else:
                per_dim.append(np.unique(np.atleast_1d(np.arange(n)[s]) // c).tolist())
        prefix = arr.store_path.path.strip("/")
        return arr, [
            ((f"{prefix}/" if prefix else "") + arr.metadata.encode_chunk_key(coords), coords)
            for coords in itertools.product(*per_dim)
        ]

    def _where(self, var: str, arr, coords: tuple[int, ...]) -> str:
        """'time A' or 'times A .. B' of a chunk, or 'static'."""
        dims, tdim, times = self.data.ds[var].dims, self.data.cfg.dims.time, self.data.times
        if tdim not in dims:
            return "static"
        i = dims.index(tdim)
        c = (arr.shards or arr.chunks)[i]
        a, b = coords[i] * c, min((coords[i] + 1) * c, len(times)) - 1
        if a == b:
            return f"time {times[a]:%Y-%m-%dT%H:%M}"
        return f"times {times[a]:%Y-%m-%dT%H:%M} .. {times[b]:%Y-%m-%dT%H:%M}"

    def check_present(self, var: str, sel: dict, fatal: bool) -> None:
        """Raise (fatal) or warn once per variable naming a chunk of this read absent from the store."""
        arr, keys = self._keys(var, sel)
        stored = self._stored(var, arr)
        missing = [(k, c) for k, c in keys if k not in stored]
        if not missing or (not fatal and var in self._warned):
            return
        k, c = missing[0]
        fill = arr.fill_value.item() if hasattr(arr.fill_value, "item") else arr.fill_value
        msg = (
            f"{self.data.where}: chunk '{k}' of variable '{var}' ({self._where(var, arr, c)}) is missing from "
            f"the store ({len(missing)} of the {len(keys)} chunk(s) of this read): zarr would serve it as its "
            f"fill value ({fill!r} here) as if it were data. Lost, or an all-fill chunk zarr did not "
            f"write (write_empty_chunks=False: write the store with write_empty_chunks=True)"
        )
        if fatal:
            raise DataError(msg + "; re-write it, or leave those times out of data.splits")
        self._warned.add(var)
        warnings.warn(
            msg + "; data.nonfinite='zero' sets its values to 0 (first absent chunk of this "
            "variable; counts follow in the non-finite summaries)",
            NonFiniteWarning,
            stacklevel=2,
        )

    def undecodable(self, var: str, sel: dict, err: Exception) -> Exception:
        """The read error `err`, as a DataError naming the chunk that cannot be decoded (if one is found)."""
        if not self.enabled:
            return err
        try:
            arr, keys = self._keys(var, sel)
        except Exception:  # noqa: BLE001 - cannot even open the array: the original error says more
            return err
        grid = arr.shards or arr.chunks
        for key, coords in keys:
            try:
                arr[tuple(slice(i * c, (i + 1) * c) for i, c in zip(coords, grid, strict=True))]
            except Exception as bad:  # noqa: BLE001
                return DataError(
                    f"{self.data.where}: cannot decode chunk '{key}' of variable '{var}' "
                    f"({self._where(var, arr, coords)}): {type(bad).__name__}: {bad} (a truncated or "
                    f"corrupt chunk: re-write it, or leave those times out of data.splits)"
                )
        return err


def check_finite(block: np.ndarray, names: list[str], time, lat: np.ndarray, lon: np.ndarray, where: str) -> None:
    """Raise naming the variable, time and location of the first NaN/inf in (C, rows, lon)."""
    bad = ~np.isfinite(block)
    if bad.any():
        c, r, q = np.argwhere(bad)[0]
        raise DataError(
            f"{where}: non-finite value {block[c, r, q]} in '{names[c]}' at time {time}, "
            f"latitude {lat[r]:g}, longitude {lon[q]:g} ({int(bad.sum())} non-finite value(s) "
            f"in this block; set data.nonfinite='zero' to mask them)"
        )
