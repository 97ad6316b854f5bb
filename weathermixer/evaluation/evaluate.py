"""python -m weathermixer.evaluate --forecast FC.zarr --truth DATA --out REPORT_DIR [options]

Scores a gridded forecast (WeatherBench 2 forecast layout: dims time = init, prediction_timedelta,
optional level, latitude, longitude; variables named as in the truth) against a gridded truth data
set (zarr store or netCDF file; dims time, optional level, latitude, longitude), together with two
baselines on the same inits, leads and grid:

    persistence   forecast(t, L) = truth(t)
    climatology   forecast(t, L) = clim(day of year and hour of t + L)

Latitude-weighted RMSE, bias and ACC for every variable, level and lead (definitions in
weathermixer.evaluation.metrics and docs/reference_scores.md in the source repository). The
climatology comes from the training period only (--climatology-years or --clim-start/--clim-end;
default: the truth times before the first init). Writes REPORT_DIR/metrics.json, metrics.csv and
PNG figures (scores versus lead for the headline variables, truth/forecast/error maps). Bad input
(different grids, missing variables or levels, init or valid times outside the truth, leads not in
the forecast) is an EvaluationError naming what does not match; the CLI prints it on one line and
exits 2.
"""

# This module: the CLI and the scoring loop (evaluate). What is evaluated is chosen in .plan, the
# baselines are in .baselines, metrics.json and the figures are written by .report (the docstring
# above is the CLI's --help text).
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import numpy as np
import pandas as pd
import xarray as xr

from jigsaw_ext.files import make_output_folders

from ..latitudes import DEFAULT_WEIGHTING, WEIGHTINGS
from . import metrics as M
from .baselines import (
    ClimatologyPeriod,
    LinearBaseline,
    climatology_forecast,
    climatology_period,
    fit_linear,
    persistence_forecast,
    region_rows,
    variable_climatology,
)
from .metrics import LAT, LON, TIME, EvaluationError
from .plan import (
    LEAD,
    LEVEL,
    Plan,
    check_map_leads,
    key_of,
    lead_str,
    open_dataset,
    plan_evaluation,
    resolve_headline,
    truth_var,
)
from .report import STATS, json_number, metrics_result, skill_table, write_report

SHORT_RECORD_YEARS, SHORT_RECORD_WINDOW = 10, 15


# scoring ----------------------------------------------------------------------------------------------
def _block_size(plan: Plan, max_bytes: int) -> int:
    n_levels = max(len(levs or [None]) for levs in plan.levels.values())
    per_init = n_levels * len(plan.leads) * plan.lat.size * plan.lon.size
    return max(1, int(max_bytes // (8 * 6 * per_init)))  # ~6 float64 arrays of one init's fields


@dataclass(frozen=True)
class Options:
    """How the scores are computed (besides what is scored: the Plan)."""

    rmse_form: str = "wb2"
    weighting: str = DEFAULT_WEIGHTING  # latitude weights: area (WeatherBench 2) | cos
    linear: bool = True  # the per-pixel linear regression baseline
    block: int = 1


def _accumulate(acc: dict, x, o, oa, cl, plan: Plan, dims, opt: Options, regions: dict) -> None:
    """Per-init MSE, mean error and ACC of one system on one block of inits (and MSE per region)."""
    x = xr.DataArray(x, dims=dims)
    acc["mse"].append(M.mse(x, o, plan.lat, opt.weighting))
    acc["me"].append(M.mean_error(x, o, plan.lat, opt.weighting))
    with np.errstate(invalid="ignore", divide="ignore"):
        acc["acc"].append(M.acc_per_time(x - cl, oa, plan.lat, opt.weighting))
    for name, rows in regions.items():
        if name != "global":
            acc.setdefault(name, []).append(
                M.mse(x.isel({LAT: rows}), o.isel({LAT: rows}), plan.lat[rows], opt.weighting)
            )


def _score_variable(
    fc, tr, plan: Plan, var: str, clim: M.Climatology, linear: LinearBaseline | None, opt: Options
) -> dict[str, dict]:
    """Per-init statistics of one variable for the model and the baselines, combined over inits."""
    levs = plan.levels[var]
    lev_dims = (LEVEL,) if levs is not None else ()
    f_all = fc[var].isel({LAT: plan.lat_order})
    t_all = truth_var(tr, var, levs)
    truth_times = pd.DatetimeIndex(tr[TIME].values)
    dims = (TIME, LEAD) + lev_dims + (LAT, LON)
    regions = region_rows(plan.lat)
    per_time: dict[str, dict] = {}
    for b0 in range(0, len(plan.inits), opt.block):
        inits = plan.inits[b0 : b0 + opt.block]
        f = (
            f_all.isel({TIME: plan.init_index[b0 : b0 + opt.block], LEAD: plan.lead_index})
            .load()
            .transpose(*dims)
            .values
        )
        valid = np.add.outer(inits.values, plan.leads.values)  # (init, lead)
        need = pd.DatetimeIndex(np.unique(np.concatenate([inits.values, valid.ravel()])))
        if linear is not None:
            need = need.union(inits - linear.dt)
        rows = (
            t_all.isel({TIME: _truth_positions(truth_times, need)}).load().transpose(TIME, *lev_dims, LAT, LON).values
        )
        at = need.get_indexer
        truth = rows[at(valid.ravel())].reshape(f.shape)
        cl = climatology_forecast(clim, valid, lev_dims, f.shape)
        systems = {"model": f, "persistence": persistence_forecast(rows[at(inits)], f.shape), "climatology": cl}
        if linear is not None:
            systems["linear"] = linear.forecast(rows[at(inits)], rows[at(inits - linear.dt)], inits, f.shape)
        o, oa = (xr.DataArray(a, dims=dims) for a in (truth, truth - cl))
        for system, x in systems.items():
            _accumulate(
                per_time.setdefault(system, {"mse": [], "me": [], "acc": []}), x, o, oa, cl, plan, dims, opt, regions
            )
    out = {}
    for system, parts in per_time.items():
        mse_t, me_t, acc_t = (xr.concat(parts[k], TIME) for k in ("mse", "me", "acc"))
        out[system] = {
            "rmse": M.rmse_from_mse(mse_t, opt.rmse_form),
            "bias": M.bias_from_mean_error(me_t),
            "acc": M.acc_from_per_time(acc_t),
            "regions": {
                name: M.rmse_from_mse(xr.concat(parts[name], TIME), opt.rmse_form)
                for name in regions
                if name != "global"
            },
        }
    return out


def _truth_positions(truth_times: pd.DatetimeIndex, need: pd.DatetimeIndex) -> np.ndarray:
    pos = truth_times.get_indexer(need)
    if (pos < 0).any():  # the plan checked inits and valid times: this is an init's t - dt
        missing = need[pos < 0]
        raise EvaluationError(
            f"linear baseline: the truth has no state at {missing[0]:%Y-%m-%dT%H:%M} (an init "
            f"time minus the model step; {len(missing)} time(s)); score later inits or pass "
            f"--no-linear-baseline"
        )
    return pos


def _store_scores(scores: dict, region_scores: dict, res: dict[str, dict], plan: Plan, var: str) -> None:
    """Write one variable's scores (`res` of _score_variable) into the field -> lead -> system cells,
    and the regional RMSE into region -> field -> lead -> system."""
    levs = plan.levels[var]
    for j, lev in enumerate(levs or [None]):
        key = key_of(var, lev)
        for i, h in enumerate(plan.lead_hours):
            cell = scores[key][lead_str(h)]
            idx = {LEAD: i} | ({LEVEL: j} if lev is not None else {})
            for system, r in res.items():
                cell[system] = {s: json_number(r[s].isel(idx)) for s in STATS}
                for region, rmse in r["regions"].items():
                    region_scores.setdefault(region, {}).setdefault(key, {}).setdefault(lead_str(h), {})[system] = (
                        json_number(rmse.isel(idx))
                    )


def _score_all(
    fc, tr, plan: Plan, period: ClimatologyPeriod, window_days: int, fallback: str, opt: Options, progress: bool
) -> tuple[dict, dict, M.Climatology | None, dict]:
    """The scores of every field (metrics.json's "scores" and "regions"), the last variable's
    climatology and what the linear baseline was fitted on."""
    from ..progress import progress as progress_display

    scores: dict[str, dict] = {k: {lead_str(h): {} for h in plan.lead_hours} for k in plan.keys}
    regions: dict[str, dict] = {}
    clim, linear_info = None, {}  # n_times and filled cells are the same for every variable
    dt = model_step(fc)
    bar = progress_display(len(plan.levels), "evaluate", "variable", enabled=progress)
    for var in plan.levels:
        clim = variable_climatology(tr, plan, var, period, window_days, fallback)
        linear = None
        if opt.linear:
            try:
                linear = fit_linear(truth_var(tr, var, plan.levels[var]), period, dt, plan.leads)
            except EvaluationError as err:  # too short a training period: scored without it, said so
                linear_info = {"skipped": str(err)}
            else:
                linear_info = {
                    "dt_hours": dt / pd.Timedelta(hours=1),
                    "features": linear.features,
                    "fitted_on": f"{period.start:%Y-%m-%dT%H:%M} .. {period.end:%Y-%m-%dT%H:%M}",
                    "samples_per_lead": dict(zip(map(lead_str, plan.lead_hours), linear.samples, strict=True)),
                }
        _store_scores(scores, regions, _score_variable(fc, tr, plan, var, clim, linear, opt), plan, var)
        bar.update(1)
    bar.close()
    return scores, regions, clim, linear_info


def model_step(fc) -> pd.Timedelta:
    """The forecast's step: its smallest positive lead."""
    leads = pd.TimedeltaIndex(fc[LEAD].values)
    positive = leads[leads > pd.Timedelta(0)]
    if not len(positive):
        raise EvaluationError("the forecast has no positive lead (prediction_timedelta)")
    return positive.min()


def climatology_window(period: ClimatologyPeriod, window_days: int | None) -> tuple[int, str]:
    """(+- days, why): given, or automatic: SHORT_RECORD_WINDOW days with fewer than SHORT_RECORD_YEARS
    training years (one value per day-of-year x hour cell is noise), else none."""
    years = (period.end - period.start) / pd.Timedelta(days=365.25)
    if window_days is not None:
        return window_days, "given"
    if years < SHORT_RECORD_YEARS:
        return SHORT_RECORD_WINDOW, (
            f"automatic: {years:.2g} training year(s) < {SHORT_RECORD_YEARS}, so each day-of-year "
            f"x hour cell is smoothed over +-{SHORT_RECORD_WINDOW} days"
        )
    return 0, f"automatic: {years:.3g} training years >= {SHORT_RECORD_YEARS}, no smoothing"


def evaluate(
    fc: xr.Dataset,
    tr: xr.Dataset,
    plan: Plan,
    clim_start=None,
    clim_end=None,
    *,
    rmse_form: str = "wb2",
    window_days: int | None = None,
    fallback: str = "nearest",
    max_block_bytes: int = 2**28,
    progress: bool = False,
    log=None,
    weighting: str = DEFAULT_WEIGHTING,
    linear: bool = True,
) -> dict:
    """Scores of the model and the baselines: the content of metrics.json (see write_report).
    The climatology period (also the linear baseline's training period) defaults to the truth times
    before the first init; window_days None = automatic (climatology_window)."""
    if rmse_form not in M.RMSE_FORMS:
        raise EvaluationError(f"RMSE form {rmse_form!r}: choose one of {sorted(M.RMSE_FORMS)}")
    if weighting not in WEIGHTINGS:
        raise EvaluationError(f"latitude weights {weighting!r}: choose one of {sorted(WEIGHTINGS)}")
    period = climatology_period(pd.DatetimeIndex(tr[TIME].values), plan, clim_start, clim_end)
    if period.overlaps_evaluation and log:
        log(
            f"warning: the climatology period {period.start} .. {period.end} overlaps the evaluated times "
            f"{plan.inits.min()} .. {plan.valid_times.max()}: it should be the training years only"
        )
    window_days, why = climatology_window(period, window_days)
    if log:
        log(f"climatology: day of year x hour, +-{window_days} days ({why})")
    opt = Options(rmse_form, weighting, linear, _block_size(plan, max_block_bytes))
    scores, regions, clim, linear_info = _score_all(fc, tr, plan, period, window_days, fallback, opt, progress)
    if clim is not None and clim.filled and log:
        log(
            f"note: {len(clim.filled)} (day of year, hour) climatology cell(s) had no training data and were "
            f"taken from the nearest day of year with data (listed in metrics.json)"
        )
    if "skipped" in linear_info and log:
        log(f"warning: no linear baseline: {linear_info['skipped']}")
    result = metrics_result(plan, tr, scores, period, clim, rmse_form, window_days, fallback)
    result["climatology"]["window_choice"] = why
    result["definitions"]["latitude_weights"] = WEIGHTINGS[weighting] + ", applied once inside the spatial mean"
    result["definitions"]["latitude_weighting"] = weighting
    result["linear_baseline"] = linear_info if linear else {"skipped": "--no-linear-baseline"}
    result["regions"] = regions
    return result


# CLI --------------------------------------------------------------------------------------------------
def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated numbers, e.g. 24,72,120") from None


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        allow_abbrev=False,
        prog="python -m weathermixer.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--forecast", required=True, help="forecast zarr store or netCDF file (WB2 forecast layout)")
    p.add_argument("--truth", required=True, help="truth zarr store or netCDF file (dims time, [level], lat, lon)")
    p.add_argument("--out", required=True, help="report directory")
    clim = p.add_mutually_exclusive_group()
    clim.add_argument(
        "--climatology-years",
        nargs=2,
        type=int,
        metavar=("START", "END"),
        help="training years for the climatology, inclusive (default: truth before the first init)",
    )
    clim.add_argument("--clim-start", help="start date of the climatology period (with --clim-end)")
    p.add_argument("--clim-end", help="end date of the climatology period")
    p.add_argument(
        "--clim-window-days",
        type=int,
        default=None,
        help=f"smooth the climatology over +-N days (default: {SHORT_RECORD_WINDOW} with fewer than "
        f"{SHORT_RECORD_YEARS} training years, else 0; the report says which)",
    )
    p.add_argument(
        "--lat-weights",
        choices=sorted(WEIGHTINGS),
        default=DEFAULT_WEIGHTING,
        help="area: WeatherBench 2 cell-area weights, non-zero on pole rows (default); cos: cos(lat), "
        "zero on pole rows (metrics.json names the weights under definitions.latitude_weights)",
    )
    p.add_argument(
        "--no-linear-baseline",
        action="store_true",
        help="skip the per-pixel linear regression baseline (fitted on the climatology period)",
    )
    p.add_argument(
        "--clim-fallback",
        choices=["nearest", "error"],
        default="nearest",
        help="a (day of year, hour) without training data: nearest day with data, or an error",
    )
    p.add_argument(
        "--rmse-form",
        choices=sorted(M.RMSE_FORMS),
        default="wb2",
        help="wb2: sqrt(mean_t MSE_t) (default); wb1: mean_t sqrt(MSE_t)",
    )
    p.add_argument("--variables", type=_names, help="forecast variables to score, comma-separated (default all)")
    p.add_argument(
        "--headline",
        help="fields for the figures: short names (z500,t850,t2m,u10), variable@level "
        "or variable names, comma-separated",
    )
    p.add_argument("--leads", type=_floats, help="lead hours to score, comma-separated (default all)")
    p.add_argument("--init-start", help="first init time to score")
    p.add_argument("--init-end", help="last init time to score")
    p.add_argument("--map-leads", type=_floats, help="lead hours of the map figures (default first and last)")
    p.add_argument(
        "--block-mb",
        type=float,
        default=256.0,
        help="memory for one block of inits (forecast, truth, baselines; default 256 MB)",
    )
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    make_output_folders(ap, {"--out": args.out})
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
        result = evaluate(
            fc,
            tr,
            plan,
            clim_start,
            clim_end,
            rmse_form=args.rmse_form,
            window_days=args.clim_window_days,
            fallback=args.clim_fallback,
            max_block_bytes=int(args.block_mb * 2**20),
            progress=not args.quiet,
            log=log,
            weighting=args.lat_weights,
            linear=not args.no_linear_baseline,
        )
        result["headline"] = headline
        result["sources"] = {"forecast": str(args.forecast), "truth": str(args.truth)}
        paths = write_report(result, args.out, fc, tr, plan, plots=not args.no_plots, map_leads=args.map_leads)
    except EvaluationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(skill_table(result))
    print(
        f"wrote {len(paths)} files to {args.out}: {len(plan.keys)} fields x {len(plan.leads)} leads x "
        f"{len(plan.inits)} inits (RMSE form {args.rmse_form})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
