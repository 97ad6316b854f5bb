"""python -m weathermixer.evaluate --forecast FC.zarr --truth DATA --out REPORT_DIR [options]

Scores a gridded forecast (WeatherBench 2 forecast layout: dims time = init, prediction_timedelta,
optional level, latitude, longitude; variables named as in the truth) against a gridded truth data
set (zarr store or netCDF file; dims time, optional level, latitude, longitude), together with two
baselines on the same inits, leads and grid:

    persistence   forecast(t, L) = truth(t)
    climatology   forecast(t, L) = clim(day of year and hour of t + L)

Latitude-weighted RMSE, bias and ACC for every variable, level and lead (definitions in
weathermixer.evaluation.metrics and docs/reference_scores.md). The climatology comes from the training period
only (--climatology-years or --clim-start/--clim-end; default: the truth times before the first
init). Writes REPORT_DIR/metrics.json, metrics.csv and PNG figures (scores versus lead for the
headline variables, truth/forecast/error maps). Bad input (different grids, missing variables or
levels, init or valid times outside the truth, leads not in the forecast) is an EvaluationError
naming what does not match; the CLI prints it on one line and exits 2.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from ..data.times import describe_times
from . import metrics as M
from .metrics import LAT, LON, TIME, EvaluationError

LEAD, LEVEL = "prediction_timedelta", "level"
DIM_ALIASES = {"lat": LAT, "lon": LON, "init_time": TIME, "lead_time": LEAD}
SYSTEMS = ("model", "persistence", "climatology")
STATS = ("rmse", "bias", "acc")
FORMAT = "weathermixer.evaluate/1"
HOUR = pd.Timedelta(hours=1)


# opening and naming -----------------------------------------------------------------------------------
def open_dataset(path: str, what: str) -> xr.Dataset:
    """Open a zarr store (lazily, no dask) or a netCDF file; common dim aliases renamed (lat -> latitude)."""
    p = Path(path)
    if "://" not in str(path) and not p.exists():
        raise EvaluationError(f"{what} not found: {path}")
    try:
        if p.is_file():
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


def _slug(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key)


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
        raise EvaluationError(f"grids differ: forecast {len(flat)}x{len(flon)} (latitude x longitude), "
                              f"truth {len(tlat)}x{len(tlon)}; regrid one of them first")
    order = np.argsort(flat)[np.argsort(np.argsort(tlat))]  # forecast rows in the truth's order
    if not np.allclose(flat[order], tlat, atol=1e-6):
        raise EvaluationError(f"latitudes differ: forecast {flat.min():g} .. {flat.max():g}, truth "
                              f"{tlat.min():g} .. {tlat.max():g} (max difference "
                              f"{np.abs(flat[order] - tlat).max():g} deg)")
    if not np.allclose(flon, tlon, atol=1e-6):
        raise EvaluationError(f"longitudes differ: forecast {flon[0]:g} .. {flon[-1]:g}, truth {tlon[0]:g} .. "
                              f"{tlon[-1]:g} (max difference {np.abs(flon - tlon).max():g} deg)")
    return order, tlat, tlon


def _levels(fc: xr.Dataset, tr: xr.Dataset, var: str) -> list | None:
    f, t = fc[var], tr[var]
    want_f = {TIME, LEAD, LAT, LON} | ({LEVEL} if LEVEL in f.dims else set())
    extra = [d for d in f.dims if d not in want_f]
    if extra:
        raise EvaluationError(f"forecast variable '{var}' has unsupported dimension(s) {extra} (dims {f.dims}; "
                              f"expected time, {LEAD}, optional level, latitude, longitude)")
    missing = [d for d in (TIME, LEAD, LAT, LON) if d not in f.dims]
    if missing:
        raise EvaluationError(f"forecast variable '{var}' lacks dimension(s) {missing} (dims {f.dims})")
    want_t = {TIME, LAT, LON} | ({LEVEL} if LEVEL in f.dims else set())
    if set(t.dims) != want_t:
        raise EvaluationError(f"truth variable '{var}' has dims {t.dims}; the forecast's '{var}' needs "
                              f"{sorted(want_t)}")
    if LEVEL not in f.dims:
        return None
    flev, tlev = f[LEVEL].values.astype(np.float64), t[LEVEL].values.astype(np.float64)
    absent = [level_str(v) for v in flev if not np.isclose(tlev, v).any()]
    if absent:
        raise EvaluationError(f"'{var}': forecast level(s) {', '.join(absent)} not in the truth data (levels "
                              f"{', '.join(map(level_str, tlev))})")
    return f[LEVEL].values.tolist()


def plan_evaluation(fc: xr.Dataset, tr: xr.Dataset, variables: list[str] | None = None,
                    leads_hours: list[float] | None = None, init_start=None, init_end=None) -> Plan:
    """Validate forecast against truth and choose what to score; errors name what does not match."""
    for d in (TIME, LEAD, LAT, LON):
        _coord(fc, d, "forecast")
    for d in (TIME, LAT, LON):
        _coord(tr, d, "truth")
    lat_order, lat, lon = _match_grid(fc, tr)
    gridded = [str(v) for v in fc.data_vars if {TIME, LEAD}.issubset(fc[v].dims)]
    if variables:
        absent = [v for v in variables if v not in fc.data_vars]
        if absent:
            raise EvaluationError(f"variable(s) {absent} not in the forecast (it has {sorted(gridded)})")
        gridded = list(variables)
    if not gridded:
        raise EvaluationError(f"the forecast has no variable with dims ({TIME}, {LEAD}, ...); data variables: "
                              f"{sorted(map(str, fc.data_vars))}")
    absent = [v for v in gridded if v not in tr.data_vars]
    if absent:
        raise EvaluationError(f"variable(s) {absent} of the forecast missing from the truth data (it has "
                              f"{sorted(map(str, tr.data_vars))})")
    levels = {v: _levels(fc, tr, v) for v in gridded}
    keys = {}
    for v, levs in levels.items():
        for lev in levs or [None]:
            keys[key_of(v, lev)] = (v, lev)

    fc_inits = pd.DatetimeIndex(fc[TIME].values)
    lo = pd.Timestamp(init_start) if init_start else fc_inits.min()
    hi = pd.Timestamp(init_end) if init_end else fc_inits.max()
    init_index = np.flatnonzero((fc_inits >= lo) & (fc_inits <= hi))
    if not len(init_index):
        raise EvaluationError(f"no forecast init time in {lo} .. {hi} (the forecast has {describe_times(fc_inits)})")
    inits = fc_inits[init_index]
    truth_times = pd.DatetimeIndex(tr[TIME].values)
    outside = inits[truth_times.get_indexer(inits) < 0]
    if len(outside):
        raise EvaluationError(f"init time(s) not in the truth data ({truth_times[0]:%Y-%m-%dT%H:%M} .. "
                              f"{truth_times[-1]:%Y-%m-%dT%H:%M}, {len(truth_times)} times): {describe_times(outside)}")

    fc_leads = pd.TimedeltaIndex(fc[LEAD].values)
    have = [lead / HOUR for lead in fc_leads]
    if leads_hours:
        lead_index = []
        for h in leads_hours:
            hit = np.flatnonzero(np.isclose(have, h))
            if not len(hit):
                raise EvaluationError(f"lead {h:g} h not in the forecast (leads: {', '.join(map(lead_str, have))} h)")
            lead_index.append(int(hit[0]))
        lead_index = np.array(lead_index)
    else:
        lead_index = np.arange(len(fc_leads))
    leads = fc_leads[lead_index]
    for lead in leads:
        valid = inits + lead
        outside = valid[truth_times.get_indexer(valid) < 0]
        if len(outside):
            raise EvaluationError(f"lead {lead / HOUR:g} h: valid time(s) not in the truth data (which ends "
                                  f"{truth_times[-1]:%Y-%m-%dT%H:%M}): {describe_times(outside)}; use --leads or --init-end")
    return Plan(levels, keys, init_index, inits, lead_index, leads, lat_order, lat, lon)


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


def _truth_var(tr: xr.Dataset, var: str, levels: list | None) -> xr.DataArray:
    """The truth variable at the forecast's levels (matched to within rounding by _levels)."""
    return tr[var] if levels is None else tr[var].sel({LEVEL: levels}, method="nearest")


# scoring ----------------------------------------------------------------------------------------------
def _block_size(plan: Plan, max_bytes: int) -> int:
    n_levels = max(len(levs or [None]) for levs in plan.levels.values())
    per_init = n_levels * len(plan.leads) * plan.lat.size * plan.lon.size
    return max(1, int(max_bytes // (8 * 6 * per_init)))  # ~6 float64 arrays of one init's fields


def _score_variable(fc, tr, plan: Plan, var: str, clim: M.Climatology, rmse_form: str,
                    block: int) -> dict[str, dict]:
    """Per-init statistics of one variable for the model and both baselines, combined over inits."""
    levs = plan.levels[var]
    lev_dims = (LEVEL,) if levs is not None else ()
    f_all = fc[var].isel({LAT: plan.lat_order})
    t_all = _truth_var(tr, var, levs)
    truth_times = pd.DatetimeIndex(tr[TIME].values)
    dims = (TIME, LEAD) + lev_dims + (LAT, LON)
    per_time = {s: {"mse": [], "me": [], "acc": []} for s in SYSTEMS}
    for b0 in range(0, len(plan.inits), block):
        inits = plan.inits[b0:b0 + block]
        f = f_all.isel({TIME: plan.init_index[b0:b0 + block], LEAD: plan.lead_index}).load().transpose(*dims).values
        valid = np.add.outer(inits.values, plan.leads.values)  # (init, lead)
        need = pd.DatetimeIndex(np.unique(np.concatenate([inits.values, valid.ravel()])))
        rows = t_all.isel({TIME: truth_times.get_indexer(need)}).load().transpose(TIME, *lev_dims, LAT, LON).values
        at = need.get_indexer
        truth = rows[at(valid.ravel())].reshape(f.shape)
        persist = np.broadcast_to(rows[at(inits)][:, None], f.shape)
        cl = clim.at(valid.ravel()).transpose(TIME, *lev_dims, LAT, LON).values.reshape(f.shape)
        o, oa = (xr.DataArray(a, dims=dims) for a in (truth, truth - cl))
        for system, x in (("model", f), ("persistence", persist), ("climatology", cl)):
            x = xr.DataArray(x, dims=dims)
            per_time[system]["mse"].append(M.mse(x, o, plan.lat))
            per_time[system]["me"].append(M.mean_error(x, o, plan.lat))
            with np.errstate(invalid="ignore", divide="ignore"):
                per_time[system]["acc"].append(M.acc_per_time(x - cl, oa, plan.lat))
    out = {}
    for system, parts in per_time.items():
        mse_t, me_t, acc_t = (xr.concat(parts[k], TIME) for k in ("mse", "me", "acc"))
        out[system] = {"rmse": M.rmse_from_mse(mse_t, rmse_form), "bias": M.bias_from_mean_error(me_t),
                       "acc": M.acc_from_per_time(acc_t)}
    return out


def _number(x) -> float | None:
    x = float(x)
    return None if not math.isfinite(x) else x


def evaluate(fc: xr.Dataset, tr: xr.Dataset, plan: Plan, clim_start=None, clim_end=None, *,
             rmse_form: str = "wb2", window_days: int = 0, fallback: str = "nearest",
             max_block_bytes: int = 2 ** 28, progress: bool = False, log=None) -> dict:
    """Scores of the model and the baselines: the content of metrics.json (see write_report).
    The climatology period defaults to the truth times before the first init."""
    if rmse_form not in M.RMSE_FORMS:
        raise EvaluationError(f"RMSE form {rmse_form!r}: choose one of {sorted(M.RMSE_FORMS)}")
    truth_times = pd.DatetimeIndex(tr[TIME].values)
    default_period = clim_start is None and clim_end is None
    if default_period:
        before = truth_times[truth_times < plan.inits.min()]
        if not len(before):
            raise EvaluationError(f"no truth time before the first init {plan.inits.min()} for the climatology: "
                                  f"give the training years with --climatology-years START END")
        clim_start, clim_end = before[0], before[-1]
    clim_start = pd.Timestamp(clim_start) if clim_start is not None else truth_times[0]
    clim_end = pd.Timestamp(clim_end) if clim_end is not None else truth_times[-1]
    if clim_end < clim_start:
        raise EvaluationError(f"climatology period ends ({clim_end}) before it starts ({clim_start})")
    valid_all = pd.DatetimeIndex(np.unique(np.add.outer(plan.inits.values, plan.leads.values).ravel()))
    overlap = bool(clim_start <= valid_all.max() and clim_end >= plan.inits.min())
    if overlap and log:
        log(f"warning: the climatology period {clim_start} .. {clim_end} overlaps the evaluated times "
            f"{plan.inits.min()} .. {valid_all.max()}: it should be the training years only")
    block = _block_size(plan, max_block_bytes)

    from tqdm import tqdm

    scores: dict[str, dict] = {k: {lead_str(h): {} for h in plan.lead_hours} for k in plan.keys}
    filled, n_clim = [], 0  # the same for every variable: it depends on the time axis only
    for var in tqdm(plan.levels, desc="evaluate", unit="variable", disable=not progress, file=sys.stderr):
        levs = plan.levels[var]
        truth_var = _truth_var(tr, var, levs)
        clim = M.build_climatology(truth_var, clim_start, clim_end, window_days, for_times=valid_all,
                                   fallback=fallback)
        n_clim, filled = clim.n_times, clim.filled
        res = _score_variable(fc, tr, plan, var, clim, rmse_form, block)
        for j, lev in enumerate(levs or [None]):
            key = key_of(var, lev)
            for i, h in enumerate(plan.lead_hours):
                cell = scores[key][lead_str(h)]
                for system in SYSTEMS:
                    idx = {LEAD: i} | ({LEVEL: j} if lev is not None else {})
                    cell[system] = {s: _number(res[system][s].isel(idx)) for s in STATS}
    if filled and log:
        log(f"note: {len(filled)} (day of year, hour) climatology cell(s) had no training data and were taken "
            f"from the nearest day of year with data (listed in metrics.json)")
    spacing = lambda x: _number(np.mean(np.abs(np.diff(x)))) if x.size > 1 else None  # noqa: E731
    return {
        "format": FORMAT,
        "definitions": {
            "latitude_weights": "w = cos(lat) / mean(cos(lat)) over the grid's latitudes, applied once inside "
                                "the spatial mean",
            "mse_t": "mean over latitude and longitude of w (f - o)^2, per init time t",
            "rmse": M.RMSE_FORMS[rmse_form], "rmse_form": rmse_form,
            "bias": "mean over inits of the mean over latitude and longitude of w (f - o)",
            "acc": "mean over inits of sum w f'o' / sqrt(sum w f'^2 * sum w o'^2) with anomalies against the "
                   "climatology at the valid time (WeatherBench 2, uncentred)",
            "persistence": "forecast(init t, lead L) = truth(t)",
            "climatology": "forecast(init t, lead L) = climatology(day of year, hour of t + L); its ACC is "
                           "undefined (zero forecast anomaly) and reported as null",
            "reference": "docs/reference_scores.md",
        },
        "grid": {"shape": [int(plan.lat.size), int(plan.lon.size)],
                 "latitude": {"first": float(plan.lat[0]), "last": float(plan.lat[-1]),
                              "spacing_deg": spacing(plan.lat),
                              "includes_poles": bool(np.isclose(np.abs(plan.lat), 90).any())},
                 "longitude": {"first": float(plan.lon[0]), "last": float(plan.lon[-1]),
                               "spacing_deg": spacing(plan.lon)}},
        "init_times": [f"{t:%Y-%m-%dT%H:%M}" for t in plan.inits],
        "lead_hours": plan.lead_hours,
        "climatology": {"start": f"{clim_start:%Y-%m-%dT%H:%M}", "end": f"{clim_end:%Y-%m-%dT%H:%M}",
                        "years": sorted({int(t.year) for t in truth_times[(truth_times >= clim_start)
                                                                           & (truth_times <= clim_end)]}),
                        "n_times": n_clim, "window_days": int(window_days), "fallback": fallback,
                        "period": "default: truth times before the first init" if default_period else "given",
                        "overlaps_evaluation": overlap, "filled_cells": len(filled), "filled": filled},
        "fields": {k: {"variable": v, "level": None if lev is None else float(lev),
                       "units": str(tr[v].attrs.get("units", ""))} for k, (v, lev) in plan.keys.items()},
        "scores": scores,
    }


# report -----------------------------------------------------------------------------------------------
def write_csv(result: dict, path: Path) -> Path:
    """One row per (field, lead, system): variable, level, field, lead_hours, system, rmse, bias, acc."""
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["variable", "level", "field", "lead_hours", "system", *STATS])
        for key, by_lead in result["scores"].items():
            info = result["fields"][key]
            level = "" if info["level"] is None else level_str(info["level"])
            for lead, by_system in by_lead.items():
                for system, s in by_system.items():
                    w.writerow([info["variable"], level, key, lead, system,
                                *("" if s[k] is None else repr(s[k]) for k in STATS)])
    return path


def check_map_leads(plan: Plan, map_leads: list[float] | None) -> list[float]:
    """The lead hours of the map figures: the requested ones, all evaluated; default first and last."""
    have = plan.lead_hours
    if map_leads is None:
        return sorted({have[0], have[-1]})
    for h in map_leads:
        if not np.isclose(have, h).any():
            raise EvaluationError(f"map lead {h:g} h is not an evaluated lead ({', '.join(map(lead_str, have))} h)")
    return list(map_leads)


def write_plots(result: dict, fc: xr.Dataset, tr: xr.Dataset, plan: Plan, out: Path,
                map_leads: list[float] | None = None) -> list[Path]:
    """Scores versus lead per headline field; truth/forecast/error maps at `map_leads` for the first init."""
    from . import plots

    paths = []
    have = plan.lead_hours
    map_leads = check_map_leads(plan, map_leads)
    headline = result.get("headline") or resolve_headline(None, plan.keys)
    for label, key in headline.items():
        var, lev = plan.keys[key]
        units = result["fields"][key]["units"]
        name = key if label == key else f"{label} ({key})"
        grid = f"grid {plan.lat.size}x{plan.lon.size}"
        paths.append(plots.plot_scores_vs_lead(result["scores"][key], f"{name}, {grid}",
                                               out / f"scores_{_slug(label)}.png", units))
        for h in map_leads:
            i = int(np.flatnonzero(np.isclose(have, h))[0])
            init = plan.inits[0]
            sel = {} if lev is None else {LEVEL: lev}
            f = fc[var].isel({TIME: plan.init_index[0], LEAD: plan.lead_index[i], LAT: plan.lat_order}).sel(sel)
            o = _truth_var(tr, var, None if lev is None else [lev]).sel({TIME: init + plan.leads[i]})
            o = o if lev is None else o.isel({LEVEL: 0})
            paths.append(plots.plot_map_panels(
                o.transpose(LAT, LON).values, f.transpose(LAT, LON).values, plan.lat, plan.lon,
                f"{name}, init {init:%Y-%m-%dT%H:%M}, lead {h:g} h", out / f"map_{_slug(label)}_{lead_str(h)}h.png",
                units))
    return paths


def write_report(result: dict, out_dir, fc=None, tr=None, plan: Plan | None = None, plots: bool = True,
                 map_leads: list[float] | None = None) -> list[Path]:
    """metrics.json, metrics.csv and (with fc, tr and plan) the figures; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result, indent=1, allow_nan=False))
    paths = [out / "metrics.json", write_csv(result, out / "metrics.csv")]
    if plots and plan is not None:
        paths += write_plots(result, fc, tr, plan, out, map_leads)
    return paths


# CLI --------------------------------------------------------------------------------------------------
def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated numbers, e.g. 24,72,120") from None


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m weathermixer.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--forecast", required=True, help="forecast zarr store or netCDF file (WB2 forecast layout)")
    p.add_argument("--truth", required=True, help="truth zarr store or netCDF file (dims time, [level], lat, lon)")
    p.add_argument("--out", required=True, help="report directory")
    clim = p.add_mutually_exclusive_group()
    clim.add_argument("--climatology-years", nargs=2, type=int, metavar=("START", "END"),
                      help="training years for the climatology, inclusive (default: truth before the first init)")
    clim.add_argument("--clim-start", help="start date of the climatology period (with --clim-end)")
    p.add_argument("--clim-end", help="end date of the climatology period")
    p.add_argument("--clim-window-days", type=int, default=0, help="smooth the climatology over +-N days (0)")
    p.add_argument("--clim-fallback", choices=["nearest", "error"], default="nearest",
                   help="a (day of year, hour) without training data: nearest day with data, or an error")
    p.add_argument("--rmse-form", choices=sorted(M.RMSE_FORMS), default="wb2",
                   help="wb2: sqrt(mean_t MSE_t) (default); wb1: mean_t sqrt(MSE_t)")
    p.add_argument("--variables", type=_names, help="forecast variables to score, comma-separated (default all)")
    p.add_argument("--headline", help="fields for the figures: short names (z500,t850,t2m,u10), variable@level "
                                      "or variable names, comma-separated")
    p.add_argument("--leads", type=_floats, help="lead hours to score, comma-separated (default all)")
    p.add_argument("--init-start", help="first init time to score")
    p.add_argument("--init-end", help="last init time to score")
    p.add_argument("--map-leads", type=_floats, help="lead hours of the map figures (default first and last)")
    p.add_argument("--block-mb", type=float, default=256.0,
                   help="memory for one block of inits (forecast, truth, baselines; default 256 MB)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    try:
        if args.climatology_years and args.clim_end:
            raise EvaluationError("give --climatology-years START END or --clim-start/--clim-end, not both")
        if args.climatology_years:
            a, b = args.climatology_years
            if b < a:
                raise EvaluationError(f"--climatology-years {a} {b}: the end year is before the start year")
            clim_start, clim_end = pd.Timestamp(f"{a}-01-01"), pd.Timestamp(f"{b + 1}-01-01") - pd.Timedelta(1, "s")
        else:
            if bool(args.clim_start) != bool(args.clim_end):
                raise EvaluationError("give both --clim-start and --clim-end (or --climatology-years START END)")
            clim_start, clim_end = args.clim_start, args.clim_end
        fc = open_dataset(args.forecast, "forecast")
        tr = open_dataset(args.truth, "truth")
        plan = plan_evaluation(fc, tr, args.variables, args.leads, args.init_start, args.init_end)
        headline = resolve_headline(args.headline, plan.keys)
        if not args.no_plots:
            check_map_leads(plan, args.map_leads)  # before the work, not after it
        result = evaluate(fc, tr, plan, clim_start, clim_end, rmse_form=args.rmse_form,
                          window_days=args.clim_window_days, fallback=args.clim_fallback,
                          max_block_bytes=int(args.block_mb * 2 ** 20), progress=not args.quiet, log=log)
        result["headline"] = headline
        result["sources"] = {"forecast": str(args.forecast), "truth": str(args.truth)}
        paths = write_report(result, args.out, fc, tr, plan, plots=not args.no_plots, map_leads=args.map_leads)
    except EvaluationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {len(paths)} files to {args.out}: {len(plan.keys)} fields x {len(plan.leads)} leads x "
          f"{len(plan.inits)} inits (RMSE form {args.rmse_form})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
