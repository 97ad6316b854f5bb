"""The report of an evaluation: the content of metrics.json (format weathermixer.evaluate/1: the
definitions, grid, inits, leads, climatology period and the scores per field, lead and system),
and writing it as REPORT_DIR/metrics.json, metrics.csv and the PNG figures (drawn by
weathermixer.evaluation.plots). The scores are defined in weathermixer.evaluation.metrics and
compared with published ones in docs/reference_scores.md in the source repository.
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from ..latitudes import DEFAULT_WEIGHTING, WEIGHTINGS
from . import metrics as M
from .baselines import ClimatologyPeriod
from .metrics import LAT, LON, TIME
from .plan import LEAD, LEVEL, Plan, check_map_leads, lead_str, level_str, resolve_headline, truth_var

SYSTEMS = ("model", "persistence", "climatology", "linear")
STATS = ("rmse", "bias", "acc")
FORMAT = "weathermixer.evaluate/1"


def json_number(x) -> float | None:
    """A float for metrics.json: None where it is NaN or infinite (JSON has no such numbers)."""
    x = float(x)
    return None if not math.isfinite(x) else x


# metrics.json -----------------------------------------------------------------------------------------
def definitions(rmse_form: str) -> dict:
    """What each score means, in words, as written into metrics.json."""
    return {
        "latitude_weights": WEIGHTINGS[DEFAULT_WEIGHTING] + ", applied once inside the spatial mean",
        "latitude_weighting": DEFAULT_WEIGHTING,
        "mse_t": "mean over latitude and longitude of w (f - o)^2, per init time t",
        "rmse": M.RMSE_FORMS[rmse_form],
        "rmse_form": rmse_form,
        "bias": "mean over inits of the mean over latitude and longitude of w (f - o)",
        "acc": "mean over inits of sum w f'o' / sqrt(sum w f'^2 * sum w o'^2) with anomalies against the "
        "climatology at the valid time (WeatherBench 2, uncentred)",
        "persistence": "forecast(init t, lead L) = truth(t)",
        "climatology": "forecast(init t, lead L) = climatology(day of year, hour of t + L); its ACC is "
        "undefined (zero forecast anomaly) and reported as null",
        "linear": "forecast(init t, lead L) = per-pixel least squares on x(t), x(t - dt), sin/cos hour of day "
        "(and day of year with >= 1 training year) of t and 1, one fit per lead, on the climatology "
        "period only (dt = the forecast's step; see linear_baseline)",
        "regions": "RMSE over latitude rows of each region the grid covers (global, tropics |lat| <= 20, "
        "extratropics |lat| >= 20, northern / southern hemisphere), weights renormalised in the region",
        "reference": "docs/reference_scores.md",
    }


def grid_info(plan: Plan) -> dict:
    """Shape, first and last coordinates and spacing of the evaluation grid."""
    spacing = lambda x: json_number(np.mean(np.abs(np.diff(x)))) if x.size > 1 else None  # noqa: E731
    return {
        "shape": [int(plan.lat.size), int(plan.lon.size)],
        "latitude": {
            "first": float(plan.lat[0]),
            "last": float(plan.lat[-1]),
            "spacing_deg": spacing(plan.lat),
            "includes_poles": bool(np.isclose(np.abs(plan.lat), 90).any()),
        },
        "longitude": {"first": float(plan.lon[0]), "last": float(plan.lon[-1]), "spacing_deg": spacing(plan.lon)},
    }


def climatology_info(
    period: ClimatologyPeriod,
    truth_times: pd.DatetimeIndex,
    clim: M.Climatology | None,
    window_days: int,
    fallback: str,
) -> dict:
    """The climatology's period, its years, how it was built and which cells were filled."""
    start, end = period.start, period.end
    n_times, filled = (clim.n_times, clim.filled) if clim is not None else (0, [])
    return {
        "start": f"{start:%Y-%m-%dT%H:%M}",
        "end": f"{end:%Y-%m-%dT%H:%M}",
        "years": sorted({int(t.year) for t in truth_times[(truth_times >= start) & (truth_times <= end)]}),
        "n_times": n_times,
        "window_days": int(window_days),
        "fallback": fallback,
        "period": "default: truth times before the first init" if period.default else "given",
        "overlaps_evaluation": period.overlaps_evaluation,
        "filled_cells": len(filled),
        "filled": filled,
    }


def metrics_result(
    plan: Plan,
    tr: xr.Dataset,
    scores: dict,
    period: ClimatologyPeriod,
    clim: M.Climatology | None,
    rmse_form: str,
    window_days: int,
    fallback: str,
) -> dict:
    """The content of metrics.json; `clim` is any variable's climatology (n_times and filled depend on
    the time axis only), None if no variable was scored."""
    truth_times = pd.DatetimeIndex(tr[TIME].values)
    return {
        "format": FORMAT,
        "definitions": definitions(rmse_form),
        "grid": grid_info(plan),
        "init_times": [f"{t:%Y-%m-%dT%H:%M}" for t in plan.inits],
        "lead_hours": plan.lead_hours,
        "climatology": climatology_info(period, truth_times, clim, window_days, fallback),
        "fields": {
            k: {"variable": v, "level": None if lev is None else float(lev), "units": str(tr[v].attrs.get("units", ""))}
            for k, (v, lev) in plan.keys.items()
        },
        "scores": scores,
    }


# files ------------------------------------------------------------------------------------------------
def _slug(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key)


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
                    w.writerow(
                        [
                            info["variable"],
                            level,
                            key,
                            lead,
                            system,
                            *("" if s[k] is None else repr(s[k]) for k in STATS),
                        ]
                    )
    return path


def write_plots(
    result: dict, fc: xr.Dataset, tr: xr.Dataset, plan: Plan, out: Path, map_leads: list[float] | None = None
) -> list[Path]:
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
        paths.append(
            plots.plot_scores_vs_lead(
                result["scores"][key], f"{name}, {grid}", out / f"scores_{_slug(label)}.png", units
            )
        )
        for h in map_leads:
            i = int(np.flatnonzero(np.isclose(have, h))[0])
            init = plan.inits[0]
            sel = {} if lev is None else {LEVEL: lev}
            f = fc[var].isel({TIME: plan.init_index[0], LEAD: plan.lead_index[i], LAT: plan.lat_order}).sel(sel)
            o = truth_var(tr, var, None if lev is None else [lev]).sel({TIME: init + plan.leads[i]})
            o = o if lev is None else o.isel({LEVEL: 0})
            paths.append(
                plots.plot_map_panels(
                    o.transpose(LAT, LON).values,
                    f.transpose(LAT, LON).values,
                    plan.lat,
                    plan.lon,
                    f"{name}, init {init:%Y-%m-%dT%H:%M}, lead {h:g} h",
                    out / f"map_{_slug(label)}_{lead_str(h)}h.png",
                    units,
                )
            )
    return paths


def skill_table(result: dict) -> str:
    """Plain-text RMSE table per headline field (all fields without headline): the model beside each
    baseline at every lead, and whether it beats all of them; the climatology's smoothing."""
    clim = result["climatology"]
    lines = [
        f"climatology: {clim['start']} .. {clim['end']}, +-{clim['window_days']} days "
        f"({clim.get('window_choice', 'given')})"
    ]
    if "skipped" in result.get("linear_baseline", {}):
        lines.append(f"linear baseline: skipped ({result['linear_baseline']['skipped']})")
    keys = list((result.get("headline") or {}).values()) or list(result["scores"])
    for key in keys:
        by_lead = result["scores"][key]
        systems = [s for s in SYSTEMS if any(s in cell for cell in by_lead.values())]
        units = result["fields"][key]["units"]
        lines.append(f"{key} RMSE{f' ({units})' if units else ''} ({result['definitions']['rmse_form']}):")
        lines.append("  lead_h " + " ".join(f"{s:>12}" for s in systems) + "  model beats all")
        for lead in sorted(by_lead, key=float):
            r = {s: by_lead[lead].get(s, {}).get("rmse") for s in systems}
            rest = [v for s, v in r.items() if s != "model" and v is not None]
            beats = "-" if r.get("model") is None or not rest else ("yes" if r["model"] < min(rest) else "no")
            lines.append(
                f"  {lead:>6} "
                + " ".join(f"{'-' if v is None else format(v, '.4g'):>12}" for v in r.values())
                + f"  {beats}"
            )
    return "\n".join(lines)


def write_report(
    result: dict,
    out_dir,
    fc=None,
    tr=None,
    plan: Plan | None = None,
    plots: bool = True,
    map_leads: list[float] | None = None,
) -> list[Path]:
    """metrics.json, metrics.csv and (with fc, tr and plan) the figures; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result, indent=1, allow_nan=False))
    (out / "summary.txt").write_text(skill_table(result) + "\n")
    paths = [out / "metrics.json", write_csv(result, out / "metrics.csv"), out / "summary.txt"]
    if plots and plan is not None:
        paths += write_plots(result, fc, tr, plan, out, map_leads)
    return paths
