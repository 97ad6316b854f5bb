"""What is evaluated: opening the forecast and truth, naming the scored fields, and checking the two
data sets against each other to choose variables, levels, inits and leads (a Plan); also the
headline fields and the lead hours of the map figures. Every check that fails is an EvaluationError
naming what does not match.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from ..data.times import describe_times
from .metrics import LAT, LON, TIME, EvaluationError

LEAD, LEVEL = "prediction_timedelta", "level"
DIM_ALIASES = {"lat": LAT, "lon": LON, "init_time": TIME, "lead_time": LEAD}
HOUR = pd.Timedelta(hours=1)


# opening and naming -----------------------------------------------------------------------------------
def open_dataset(path: str, what: str) -> xr.Dataset:
    """Open a zarr store (lazily, no dask), a netCDF file or a GRIB file (the [grib] extra); common dim
    aliases renamed (lat -> latitude)."""
    p = Path(path)
    if "://" not in str(path) and not p.exists():
        raise EvaluationError(f"{what} not found: {path}")
    try:
        if p.is_file() and p.suffix.lower() in (".grib", ".grb", ".grib2", ".grb2"):
            from ..data.reader import DataError, open_grib

            try:
                ds = open_grib(str(path))
            except DataError as err:
                raise EvaluationError(str(err)) from None
        elif p.is_file():
            ds = xr.open_dataset(path, engine="h5netcdf")
        else:
            ds = xr.open_zarr(path, chunks=None, consolidated=False)
    except Exception as err:  # any backend failure: one line naming the file
        raise EvaluationError(f"cannot open {what} {path}: {type(err).__name__}: {err}") from None
    rename = {a: b for a, b in DIM_ALIASES.items() if a in ds.dims and b not in ds.dims}
    return ds.rename(rename) if rename else ds


def level_str(level) -> str:
    level = float(level)
    return str(int(level)) if level.is_integer() else f"{level:g}"


def lead_str(hours: float) -> str:
    return f"{hours:g}"


def key_of(var: str, level) -> str:
    """The name of one scored field: 'geopotential@500' or '2m_temperature'."""
    return var if level is None else f"{var}@{level_str(level)}"


# what is evaluated ------------------------------------------------------------------------------------
@dataclass
class Plan:
    """The validated selection: variables and levels, inits, leads, and the forecast's latitude order."""

    levels: dict[str, list | None]  # forecast variable -> its levels (None: no level dim)
    keys: dict[str, tuple[str, object]]  # scored field -> (variable, level)
    init_index: np.ndarray  # positions on the forecast's time axis
    inits: pd.DatetimeIndex
    lead_index: np.ndarray  # positions on the forecast's prediction_timedelta axis
    leads: pd.TimedeltaIndex
    lat_order: np.ndarray  # forecast latitude positions in the truth's latitude order
    lat: np.ndarray  # truth latitudes (the evaluation order)
    lon: np.ndarray

    @property
    def lead_hours(self) -> list[float]:
        return [lead / HOUR for lead in self.leads]

    @cached_property
    def valid_times(self) -> pd.DatetimeIndex:
        """Every valid time init + lead, sorted, each once."""
        return pd.DatetimeIndex(np.unique(np.add.outer(self.inits.values, self.leads.values).ravel()))


def _coord(ds: xr.Dataset, dim: str, what: str) -> np.ndarray:
    if dim not in ds.dims:
        raise EvaluationError(f"{what} has no dimension '{dim}' (dimensions: {sorted(map(str, ds.dims))})")
    if dim not in ds.coords:
        raise EvaluationError(f"{what}: dimension '{dim}' has no coordinate values")
    return np.asarray(ds[dim].values)


def _match_grid(fc: xr.Dataset, tr: xr.Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    flat, tlat = (_coord(d, LAT, w).astype(np.float64) for d, w in ((fc, "forecast"), (tr, "truth")))
    flon, tlon = (_coord(d, LON, w).astype(np.float64) for d, w in ((fc, "forecast"), (tr, "truth")))
    if (len(flat), len(flon)) != (len(tlat), len(tlon)):
        raise EvaluationError(
            f"grids differ: forecast {len(flat)}x{len(flon)} (latitude x longitude), "
            f"truth {len(tlat)}x{len(tlon)}; regrid one of them first"
        )
    order = np.argsort(flat)[np.argsort(np.argsort(tlat))]  # forecast rows in the truth's order
    if not np.allclose(flat[order], tlat, atol=1e-6):
        raise EvaluationError(
            f"latitudes differ: forecast {flat.min():g} .. {flat.max():g}, truth "
            f"{tlat.min():g} .. {tlat.max():g} (max difference "
            f"{np.abs(flat[order] - tlat).max():g} deg)"
        )
    if not np.allclose(flon, tlon, atol=1e-6):
        raise EvaluationError(
            f"longitudes differ: forecast {flon[0]:g} .. {flon[-1]:g}, truth {tlon[0]:g} .. "
            f"{tlon[-1]:g} (max difference {np.abs(flon - tlon).max():g} deg)"
        )
    return order, tlat, tlon


def _levels(fc: xr.Dataset, tr: xr.Dataset, var: str) -> list | None:
    f, t = fc[var], tr[var]
    want_f = {TIME, LEAD, LAT, LON} | ({LEVEL} if LEVEL in f.dims else set())
    extra = [d for d in f.dims if d not in want_f]
    if extra:
        raise EvaluationError(
            f"forecast variable '{var}' has unsupported dimension(s) {extra} (dims {f.dims}; "
            f"expected time, {LEAD}, optional level, latitude, longitude)"
        )
    missing = [d for d in (TIME, LEAD, LAT, LON) if d not in f.dims]
    if missing:
        raise EvaluationError(f"forecast variable '{var}' lacks dimension(s) {missing} (dims {f.dims})")
    want_t = {TIME, LAT, LON} | ({LEVEL} if LEVEL in f.dims else set())
    if set(t.dims) != want_t:
        raise EvaluationError(
            f"truth variable '{var}' has dims {t.dims}; the forecast's '{var}' needs {sorted(want_t)}"
        )
    if LEVEL not in f.dims:
        return None
    flev, tlev = f[LEVEL].values.astype(np.float64), t[LEVEL].values.astype(np.float64)
    absent = [level_str(v) for v in flev if not np.isclose(tlev, v).any()]
    if absent:
        raise EvaluationError(
            f"'{var}': forecast level(s) {', '.join(absent)} not in the truth data (levels "
            f"{', '.join(map(level_str, tlev))})"
        )
    return f[LEVEL].values.tolist()


def plan_evaluation(
    fc: xr.Dataset,
    tr: xr.Dataset,
    variables: list[str] | None = None,
    leads_hours: list[float] | None = None,
    init_start=None,
    init_end=None,
) -> Plan:
    """Validate forecast against truth and choose what to score; errors name what does not match."""
    for d in (TIME, LEAD, LAT, LON):
        _coord(fc, d, "forecast")
    for d in (TIME, LAT, LON):
        _coord(tr, d, "truth")
    lat_order, lat, lon = _match_grid(fc, tr)
    gridded = _scored_variables(fc, tr, variables)
    levels = {v: _levels(fc, tr, v) for v in gridded}
    keys = {}
    for v, levs in levels.items():
        for lev in levs or [None]:
            keys[key_of(v, lev)] = (v, lev)
    truth_times = pd.DatetimeIndex(tr[TIME].values)
    init_index, inits = _scored_inits(fc, truth_times, init_start, init_end)
    lead_index, leads = _scored_leads(fc, leads_hours)
    for lead in leads:
        valid = inits + lead
        outside = valid[truth_times.get_indexer(valid) < 0]
        if len(outside):
            raise EvaluationError(
                f"lead {lead / HOUR:g} h: valid time(s) not in the truth data (which ends "
                f"{truth_times[-1]:%Y-%m-%dT%H:%M}): {describe_times(outside)}; use --leads or --init-end"
            )
    return Plan(levels, keys, init_index, inits, lead_index, leads, lat_order, lat, lon)


def _scored_variables(fc: xr.Dataset, tr: xr.Dataset, variables: list[str] | None) -> list[str]:
    """The forecast's variables to score (`variables`, else every one with time and lead dims), each in the truth."""
    gridded = [str(v) for v in fc.data_vars if {TIME, LEAD}.issubset(fc[v].dims)]
    if variables:
        absent = [v for v in variables if v not in fc.data_vars]
        if absent:
            raise EvaluationError(f"variable(s) {absent} not in the forecast (it has {sorted(gridded)})")
        gridded = list(variables)
    if not gridded:
        raise EvaluationError(
            f"the forecast has no variable with dims ({TIME}, {LEAD}, ...); data variables: "
            f"{sorted(map(str, fc.data_vars))}"
        )
    absent = [v for v in gridded if v not in tr.data_vars]
    if absent:
        raise EvaluationError(
            f"variable(s) {absent} of the forecast missing from the truth data (it has "
            f"{sorted(map(str, tr.data_vars))})"
        )
    return gridded


def _scored_inits(fc: xr.Dataset, truth_times: pd.DatetimeIndex, init_start, init_end):
    """(index into the forecast's init times, those times): the inits in init_start .. init_end, each a
    time of the truth data."""
    fc_inits = pd.DatetimeIndex(fc[TIME].values)
    lo = pd.Timestamp(init_start) if init_start else fc_inits.min()
    hi = pd.Timestamp(init_end) if init_end else fc_inits.max()
    init_index = np.flatnonzero((fc_inits >= lo) & (fc_inits <= hi))
    if not len(init_index):
        raise EvaluationError(f"no forecast init time in {lo} .. {hi} (the forecast has {describe_times(fc_inits)})")
    inits = fc_inits[init_index]
    outside = inits[truth_times.get_indexer(inits) < 0]
    if len(outside):
        raise EvaluationError(
            f"init time(s) not in the truth data ({truth_times[0]:%Y-%m-%dT%H:%M} .. "
            f"{truth_times[-1]:%Y-%m-%dT%H:%M}, {len(truth_times)} times): {describe_times(outside)}"
        )
    return init_index, inits


def _scored_leads(fc: xr.Dataset, leads_hours: list[float] | None):
    """(index into the forecast's leads, those leads): `leads_hours` (each in the forecast), else all."""
    fc_leads = pd.TimedeltaIndex(fc[LEAD].values)
    have = [lead / HOUR for lead in fc_leads]
    if not leads_hours:
        lead_index = np.arange(len(fc_leads))
        return lead_index, fc_leads[lead_index]
    lead_index = []
    for h in leads_hours:
        hit = np.flatnonzero(np.isclose(have, h))
        if not len(hit):
            raise EvaluationError(f"lead {h:g} h not in the forecast (leads: {', '.join(map(lead_str, have))} h)")
        lead_index.append(int(hit[0]))
    lead_index = np.array(lead_index)
    return lead_index, fc_leads[lead_index]


def truth_var(tr: xr.Dataset, var: str, levels: list | None) -> xr.DataArray:
    """The truth variable at the forecast's levels (matched to within rounding by _levels)."""
    return tr[var] if levels is None else tr[var].sel({LEVEL: levels}, method="nearest")


# headline fields and map leads ------------------------------------------------------------------------
def resolve_headline(spec, keys: dict[str, tuple[str, object]]) -> dict[str, str]:
    """label -> scored field. `spec`: comma-separated text or a list of short names (z500, t850, t2m,
    u10: the table of weathermixer.train.loss.channel_name), `variable@level` or plain variable names; None
    gives the table's z500, t850, t2m, u10 that are present, else the first four fields."""
    from ..train.loss import DEFAULT_HEADLINE, channel_name  # the one short-name table (it lives with the loss)

    def from_short(name: str) -> str | None:
        full = channel_name(name)
        if full == name:
            return None
        var, _, lev = full.rpartition("_")
        return key_of(var, lev) if var and lev.isdigit() else full

    if spec is None:
        found = {s: from_short(s) for s in DEFAULT_HEADLINE if from_short(s) in keys}
        return found or {k: k for k in list(keys)[:4]}
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    out = {}
    for name in filter(None, names):
        if "@" in name:
            var, _, lev = name.partition("@")
            try:
                key = key_of(var, float(lev))
            except ValueError:
                raise EvaluationError(f"headline {name!r}: level {lev!r} is not a number") from None
        elif name in keys:
            key = name
        elif any(v == name for v, _ in keys.values()):
            levs = [level_str(lev) for v, lev in keys.values() if v == name]
            raise EvaluationError(f"headline {name!r} has levels {', '.join(levs)}: name one, e.g. {name}@{levs[0]}")
        else:
            key = from_short(name) or name
        if key not in keys:
            raise EvaluationError(f"headline {name!r} ({key}) is not an evaluated field; fields: {', '.join(keys)}")
        out[name] = key
    if not out:
        raise EvaluationError("--headline names no field")
    return out


def check_map_leads(plan: Plan, map_leads: list[float] | None) -> list[float]:
    """The lead hours of the map figures: the requested ones, all evaluated; default first and last."""
    have = plan.lead_hours
    if map_leads is None:
        return sorted({have[0], have[-1]})
    for h in map_leads:
        if not np.isclose(have, h).any():
            raise EvaluationError(f"map lead {h:g} h is not an evaluated lead ({', '.join(map(lead_str, have))} h)")
    return list(map_leads)
