"""Forecast verification scores on a latitude-longitude grid (definitions: docs/metrics.md, and the
published scores to compare with: docs/reference_scores.md, both in the source repository).

Weights (WeatherBench 2's, the default): w_i = the area of row i's cell on the sphere / the mean cell
area, cell bounds halfway between latitudes (non-zero on pole rows); weighting="cos" gives cos(lat_i) /
mean(cos(lat)) (WeatherBench 1's; zero on pole rows). Applied ONCE, inside the spatial mean:
MSE_t = mean_{lat,lon} w (f - o)^2 for each init time t. RMSE comes in two forms that
differ when the error varies between inits:

    "wb2" (WeatherBench 2, the default)  sqrt(mean_t MSE_t)
    "wb1" (WeatherBench 1)               mean_t sqrt(MSE_t)       (<= the wb2 form, by Jensen)

Bias is mean_t mean_{lat,lon} w (f - o). ACC is the WeatherBench 2 form: per init the uncentred
correlation of anomalies against a climatology, sum w f'o' / sqrt(sum w f'^2 sum w o'^2), then the
mean over inits. It is undefined (NaN here) when a forecast anomaly is identically zero, e.g. for
the climatology forecast itself.

Arrays: xarray DataArrays with dims `latitude`, `longitude` and optionally `time` (the dimension
averaged over) plus any others (level, lead), which are kept. A numpy array is read as
(time, latitude, longitude), (latitude, longitude) or (latitude,) by its number of axes. `lat`
defaults to the array's latitude coordinate.

The climatology is a mean per (day of year, hour of day) over a training period, built by streaming
over time blocks (see build_climatology).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import xarray as xr

from ..latitudes import DEFAULT_WEIGHTING, latitude_weights

LAT, LON, TIME = "latitude", "longitude", "time"
RMSE_FORMS = {"wb2": "sqrt(mean_t MSE_t) (WeatherBench 2)", "wb1": "mean_t sqrt(MSE_t) (WeatherBench 1)"}
DAYS = 366  # days of year 1..366


class EvaluationError(ValueError):
    """Bad input to an evaluation; the message names what does not match."""


# spatial means ----------------------------------------------------------------------------------------
def _as_da(x) -> xr.DataArray:
    if isinstance(x, xr.DataArray):
        return x
    x = np.asarray(x)
    if not 1 <= x.ndim <= 3:
        raise ValueError(
            f"numpy arrays are read as (time, latitude, longitude); got {x.ndim} axes "
            f"(pass an xarray.DataArray with named dims instead)"
        )
    return xr.DataArray(x, dims=(TIME, LAT, LON)[3 - x.ndim :] if x.ndim > 1 else (LAT,))


def _weights(x: xr.DataArray, lat, weighting: str = DEFAULT_WEIGHTING) -> xr.DataArray:
    if LAT not in x.dims:
        raise ValueError(f"array has no '{LAT}' dimension (dims {x.dims})")
    if lat is None:
        if LAT not in x.coords:
            raise ValueError(f"no '{LAT}' coordinate on the array: pass lat=")
        lat = x[LAT].values
    lat = np.asarray(lat)
    if lat.shape != (x.sizes[LAT],):
        raise ValueError(f"lat has {lat.size} values but the array has {x.sizes[LAT]} latitudes")
    return xr.DataArray(latitude_weights(lat, weighting), dims=(LAT,))


def _pair(forecast, truth) -> tuple[xr.DataArray, xr.DataArray]:
    f, o = _as_da(forecast), _as_da(truth)
    try:  # the same coordinates or none: arithmetic must never silently intersect two grids
        return xr.align(f, o, join="exact")
    except ValueError as err:
        raise ValueError(f"forecast and truth coordinates differ: {err}") from None


def spatial_mean(x, lat=None, weighting: str = DEFAULT_WEIGHTING) -> xr.DataArray:
    """mean_{lat,lon} w x: the latitude-weighted mean, keeping every other dimension."""
    x = _as_da(x)
    dims = [d for d in (LAT, LON) if d in x.dims]
    return (x * _weights(x, lat, weighting)).mean(dims)


def mse(forecast, truth, lat=None, weighting: str = DEFAULT_WEIGHTING) -> xr.DataArray:
    """MSE_t = mean_{lat,lon} w (f - o)^2 per init time (and level, lead, ...)."""
    f, o = _pair(forecast, truth)
    return spatial_mean((f - o) ** 2, lat, weighting)


def rmse_from_mse(mse_t: xr.DataArray, form: str = "wb2", time_dim: str = TIME) -> xr.DataArray:
    """Combine per-init MSE_t over `time_dim` in the WB2 or WB1 form (module docstring)."""
    if form not in RMSE_FORMS:
        raise ValueError(f"RMSE form {form!r}: choose one of {sorted(RMSE_FORMS)}")
    if time_dim not in mse_t.dims:
        return np.sqrt(mse_t)
    return np.sqrt(mse_t.mean(time_dim)) if form == "wb2" else np.sqrt(mse_t).mean(time_dim)


def rmse(
    forecast, truth, lat=None, form: str = "wb2", time_dim: str = TIME, weighting: str = DEFAULT_WEIGHTING
) -> xr.DataArray:
    """Latitude-weighted RMSE; `form` "wb2" = sqrt(mean_t MSE_t), "wb1" = mean_t sqrt(MSE_t)."""
    return rmse_from_mse(mse(forecast, truth, lat, weighting), form, time_dim)


def mean_error(forecast, truth, lat=None, weighting: str = DEFAULT_WEIGHTING) -> xr.DataArray:
    """mean_{lat,lon} w (f - o) per init time."""
    f, o = _pair(forecast, truth)
    return spatial_mean(f - o, lat, weighting)


def bias_from_mean_error(mean_error_t: xr.DataArray, time_dim: str = TIME) -> xr.DataArray:
    """mean_t of the per-init mean errors."""
    return mean_error_t.mean(time_dim) if time_dim in mean_error_t.dims else mean_error_t


def bias(forecast, truth, lat=None, time_dim: str = TIME, weighting: str = DEFAULT_WEIGHTING) -> xr.DataArray:
    """mean_t mean_{lat,lon} w (f - o)."""
    return bias_from_mean_error(mean_error(forecast, truth, lat, weighting), time_dim)


def acc_per_time(fc_anom, truth_anom, lat=None, weighting: str = DEFAULT_WEIGHTING) -> xr.DataArray:
    """sum w f'o' / sqrt(sum w f'^2 sum w o'^2) per init; NaN where either anomaly is all zero."""
    f, o = _pair(fc_anom, truth_anom)
    num = spatial_mean(f * o, lat, weighting)
    den = np.sqrt(spatial_mean(f**2, lat, weighting) * spatial_mean(o**2, lat, weighting))
    return num / den.where(den > 0)


def acc_from_per_time(acc_t: xr.DataArray, time_dim: str = TIME) -> xr.DataArray:
    """mean_t of the per-init ACC; NaN if it is undefined at any init."""
    return acc_t.mean(time_dim, skipna=False) if time_dim in acc_t.dims else acc_t


def acc(fc_anom, truth_anom, lat=None, time_dim: str = TIME, weighting: str = DEFAULT_WEIGHTING) -> xr.DataArray:
    """Anomaly correlation coefficient, WB2 form: the mean over inits of acc_per_time."""
    return acc_from_per_time(acc_per_time(fc_anom, truth_anom, lat, weighting), time_dim)


# climatology ------------------------------------------------------------------------------------------
def _doy_hour(times) -> tuple[np.ndarray, np.ndarray]:
    t = pd.DatetimeIndex(times)
    return np.asarray(t.day_of_year), np.asarray(t.hour)


def _circular_distance(a, b) -> np.ndarray:
    d = np.abs(np.asarray(a) - np.asarray(b)) % DAYS
    return np.minimum(d, DAYS - d)


@dataclass
class Climatology:
    """Mean per (day of year, hour of day) of one variable over a training period.

    `data` has dims (dayofyear, hour, ...the variable's other dims); `available` marks the cells
    that hold a value; `filled` lists the cells taken from the nearest day of year with data (same
    hour) because their own window held no training time."""

    data: xr.DataArray
    available: np.ndarray
    start: pd.Timestamp
    end: pd.Timestamp
    window_days: int
    n_times: int
    filled: list[dict] = field(default_factory=list)

    def at(self, times) -> xr.DataArray:
        """The climatology at each of `times` (dims time, ...); an error names a time it lacks."""
        times = pd.DatetimeIndex(np.atleast_1d(np.asarray(times, dtype="datetime64[ns]")))
        doy, hour = _doy_hour(times)
        days = self.data["dayofyear"].values
        hours = self.data["hour"].values
        di = pd.Index(days).get_indexer(doy)
        hi = pd.Index(hours).get_indexer(hour)
        ok = (di >= 0) & (hi >= 0)
        ok[ok] = self.available[di[ok], hi[ok]]
        if not ok.all():
            t = times[np.flatnonzero(~ok)[0]]
            raise EvaluationError(
                f"climatology ({self.start:%Y-%m-%d} .. {self.end:%Y-%m-%d}) has no value for {t:%Y-%m-%dT%H:%M} "
                f"(day of year {t.day_of_year}, hour {t.hour}; hours in the training period: "
                f"{', '.join(map(str, hours))}); {int((~ok).sum())} time(s) affected"
            )
        values = self.data.values[di, hi]
        dims = (TIME,) + self.data.dims[2:]
        coords = {d: self.data[d] for d in self.data.dims[2:] if d in self.data.coords}
        return xr.DataArray(values, dims=dims, coords={**coords, TIME: times}, name=self.data.name)


def build_climatology(
    truth: xr.DataArray,
    start,
    end,
    window_days: int = 0,
    for_times=None,
    fallback: str = "nearest",
    block: int = 64,
    progress=None,
) -> Climatology:
    """Climatology of `truth` (dims time, ...) over times in [start, end]: for each (day of year d,
    hour h) the mean of all training times t at hour h with day of year d within +- window_days
    calendar days of t (every time counts once per cell: the window mean is sample-weighted).

    for_times: only the (day, hour) cells of these times are computed and only the training times
    they need are read (a test month reads about a month per training year); None = every cell.
    fallback: a needed cell without training data takes the nearest day of year that has data at
    the same hour ("nearest", recorded in .filled) or raises EvaluationError ("error").
    progress: optional callable(n_done, n_total) after each block read."""
    if fallback not in ("nearest", "error"):
        raise ValueError(f"climatology fallback {fallback!r}: choose 'nearest' or 'error'")
    if window_days < 0:
        raise ValueError(f"climatology window {window_days} days: must be >= 0")
    start, end = pd.Timestamp(start), pd.Timestamp(end)
    idx = _training_rows(truth, start, end)
    train = pd.DatetimeIndex(truth[TIME].values)[idx]
    hours = np.unique(train.hour)
    hpos = np.searchsorted(hours, train.hour)
    target, counts = _window_cells(train, hpos, len(hours), window_days)
    need = _needed_cells(for_times, hours, start, end)
    source, filled = _source_cells(need, counts, hours, fallback, start, end, window_days)
    sums, cell_of = _cell_sums(truth, idx, target, hpos, source, counts.shape, block, progress)
    data, available = _cell_means(truth, need, hours, source, sums, cell_of, counts)
    return Climatology(data, available, start, end, int(window_days), int(len(idx)), filled)


def _training_rows(truth: xr.DataArray, start: pd.Timestamp, end: pd.Timestamp) -> np.ndarray:
    """Positions on the truth's time axis of the training times in [start, end]; an error if none."""
    all_times = pd.DatetimeIndex(truth[TIME].values)
    idx = np.flatnonzero((all_times >= start) & (all_times <= end))
    if not len(idx):
        raise EvaluationError(
            f"climatology period {start} .. {end} holds no time of the truth data "
            f"({all_times[0]} .. {all_times[-1]}); choose training years inside it"
        )
    return idx


def _window_cells(
    train: pd.DatetimeIndex, hpos: np.ndarray, n_hours: int, window_days: int
) -> tuple[np.ndarray, np.ndarray]:
    """target (T, K): the day of year of training time t shifted by the K window offsets; counts
    (day of year, hour position): how many training times each cell averages (row 0 unused)."""
    # a training time t counts for the cells (day of year of t + k days, hour of t), |k| <= window:
    # calendar days, so 31 December neighbours 1 January in every year
    offsets = np.arange(-window_days, window_days + 1)
    target = np.stack([np.asarray((train + pd.Timedelta(days=int(k))).day_of_year) for k in offsets], 1)  # (T, K)
    counts = np.zeros((DAYS + 1, n_hours), dtype=np.int64)  # row 0 unused: rows are days of year
    np.add.at(counts, (target, hpos[:, None]), 1)
    return target, counts


def _needed_cells(for_times, hours: np.ndarray, start: pd.Timestamp, end: pd.Timestamp) -> set[tuple[int, int]]:
    """The (day of year, hour) cells to compute: those of `for_times`, or all; an error for an hour
    of day the training period lacks."""
    if for_times is None:
        need = {(d, int(h)) for d in range(1, DAYS + 1) for h in hours}
    else:
        nd, nh = _doy_hour(pd.DatetimeIndex(np.atleast_1d(np.asarray(for_times, dtype="datetime64[ns]"))))
        need = set(zip(nd.tolist(), nh.tolist(), strict=True))
    missing_hours = sorted({h for _, h in need} - set(hours.tolist()))
    if missing_hours:
        raise EvaluationError(
            f"climatology period {start:%Y-%m-%d} .. {end:%Y-%m-%d} has no time at hour(s) "
            f"{missing_hours} of day (it has {hours.tolist()}); the data's hours must cover the "
            f"forecast valid times"
        )
    return need


def _source_cells(
    need: set,
    counts: np.ndarray,
    hours: np.ndarray,
    fallback: str,
    start: pd.Timestamp,
    end: pd.Timestamp,
    window_days: int,
) -> tuple[dict, list[dict]]:
    """needed cell (day, hour) -> the cell (day, hour position) whose training times supply it: itself,
    or with fallback "nearest" the nearest day of year with data (listed in `filled`)."""
    source, filled = {}, []
    for d, h in sorted(need):
        j = int(np.searchsorted(hours, h))
        if counts[d, j] > 0:
            source[(d, h)] = (d, j)
            continue
        if fallback == "error":
            raise EvaluationError(
                f"climatology period {start:%Y-%m-%d} .. {end:%Y-%m-%d} has no data for day of year {d} at hour {h} "
                f"(window +-{window_days} days); use more training years, a wider window or fallback 'nearest'"
            )
        have = np.flatnonzero(counts[1:, j] > 0) + 1
        near = int(have[np.argmin(_circular_distance(have, d))])  # ties: the earlier day of year
        source[(d, h)] = (near, j)
        filled.append({"dayofyear": int(d), "hour": int(h), "from_dayofyear": near})
    return source, filled


def _cell_sums(
    truth: xr.DataArray,
    idx: np.ndarray,
    target: np.ndarray,
    hpos: np.ndarray,
    source: dict,
    shape: tuple[int, int],
    block: int,
    progress,
) -> tuple[np.ndarray, dict]:
    """Sums of the training times over each source cell, streamed over blocks of `block` times; only
    the training times some source cell uses are read. Returns sums (cell row, ...) and cell -> row."""
    cell_of = {c: i for i, c in enumerate(sorted(set(source.values())))}
    lookup = np.full(shape, -1)  # (day of year, hour) -> accumulator row, -1: not needed
    for c, i in cell_of.items():
        lookup[c] = i
    cell = lookup[target, hpos[:, None]]  # (T, K)
    rest = truth.isel({TIME: 0}, drop=True)
    sums = np.zeros((len(cell_of),) + rest.shape, dtype=np.float64)
    rows = np.flatnonzero((cell >= 0).any(1))  # read only the training times some needed cell uses
    for b0 in range(0, len(rows), block):
        r = rows[b0 : b0 + block]
        x = np.asarray(truth.isel({TIME: idx[r]}).values, dtype=np.float64)
        t, k = np.nonzero(cell[r] >= 0)
        np.add.at(sums, cell[r][t, k], x[t])
        if progress:
            progress(min(b0 + block, len(rows)), len(rows))
    return sums, cell_of


def _cell_means(
    truth: xr.DataArray, need: set, hours: np.ndarray, source: dict, sums: np.ndarray, cell_of: dict, counts: np.ndarray
) -> tuple[xr.DataArray, np.ndarray]:
    """The climatology's data (dayofyear, hour, ...) for the needed days and which cells hold a value."""
    rest = truth.isel({TIME: 0}, drop=True)
    days = np.array(sorted({d for d, _ in need}))
    out = np.full((len(days), len(hours)) + rest.shape, np.nan, dtype=np.float64)
    available = np.zeros((len(days), len(hours)), dtype=bool)
    for (d, _hour), c in source.items():
        i, j = int(np.searchsorted(days, d)), c[1]
        out[i, j] = sums[cell_of[c]] / counts[c]
        available[i, j] = True
    coords = {d: rest[d] for d in rest.dims if d in rest.coords}
    data = xr.DataArray(
        out,
        dims=("dayofyear", "hour") + rest.dims,
        coords={"dayofyear": days, "hour": hours, **coords},
        name=truth.name,
    )
    return data, available
