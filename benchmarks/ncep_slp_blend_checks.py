"""Checks behind the NCEP recipe's validation table (docs/skill.md), on the 2008 forecasts of a validation run:

    python benchmarks/ncep_slp_blend_checks.py OUT [--cross-validate [--shrink LIST]]

OUT: the folder of `bash benchmarks/skill_ncep_slp.sh OUT --validation` (its seed*/forecast_val.zarr).
Prints latitude-weighted RMSE (Pa, WeatherBench 2 form) at 1, 2, 3, 5 and 10 days of
- the mean of k seeds before the blend, averaged over every subset of k of the run's seeds;
- the field-wide linear forecast alone, its ridge per lead chosen on these inits;
- with --cross-validate, the blend of the seed mean fitted on the odd months and scored on the even ones and
  back, with the baselines only and with the field-wide forecast (an out-of-sample check inside 2008), and with
  --shrink the field-wide blend whose weights are shrunk towards the per-pixel regression, the shrink per lead
  chosen by the inner 2-fold cross-validation of `damping fit --shrink` inside the fitting months (nested).
Baselines fitted on 2001-2007. Data: NCEP/NCAR Reanalysis 1, NOAA PSL (see docs/skill/ATTRIBUTION.md).
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

TRUTH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real" / "ncep_slp_natl_daily_2001_2010.zarr"
START, END = "2001-01-01", "2007-12-31"
LEADS = [0, 1, 2, 4, 9]  # 1, 2, 3, 5, 10 days


def _truth_at(fc: xr.Dataset, truth: xr.DataArray) -> np.ndarray:
    valid = np.add.outer(fc.time.values, fc.prediction_timedelta.values)
    return truth.sel(time=pd.DatetimeIndex(valid.ravel())).values.reshape(fc["slp"].shape)


def _rmse(x: np.ndarray, o: np.ndarray, lat: np.ndarray) -> np.ndarray:
    """(lead,) sqrt of the mean over inits of the latitude-weighted MSE."""
    from weathermixer.evaluation import metrics as M

    w = M.latitude_weights(lat)[:, None]
    w = w / w.mean()
    return np.sqrt((w * (x - o) ** 2).mean(axis=(0, 2, 3)))


def _row(name: str, v: np.ndarray) -> None:
    print(f"{name:<66}" + " ".join(f"{x:6.0f}" for x in v[LEADS]))


def seed_subsets(members: list[xr.Dataset], o: np.ndarray) -> None:
    F = np.stack([m["slp"].values for m in members])
    lat = members[0].latitude.values
    for k in range(1, len(F) + 1):
        scores = [_rmse(F[list(c)].mean(0), o, lat) for c in itertools.combinations(range(len(F)), k)]
        _row(f"mean of {k} seed(s), before the blend", np.mean(scores, axis=0))


def field_alone(fc: xr.Dataset, tr: xr.Dataset, o: np.ndarray) -> None:
    from weathermixer.evaluation.damping import field_reference, references

    truth = references(fc, tr, "slp", START, END, None)[3]
    r, ridges = field_reference(fc, truth, START, END, None, None)
    _row("field-wide linear forecast alone", _rmse(r, o, fc.latitude.values))
    print(f"  its ridges by lead: {ridges}")


def cross_validate(fc: xr.Dataset, tr: xr.Dataset, o: np.ndarray, shrink: list[float] | None) -> None:
    from weathermixer.evaluation.damping import apply, fit

    odd = (pd.DatetimeIndex(fc.time.values).month % 2).values == 1
    variants = [(False, None, "baselines only"), (True, None, "field-wide forecast")]
    if shrink:
        variants.append((True, shrink, "field-wide forecast, shrunk"))
    for field, lams, name in variants:
        blend = np.empty_like(o)
        for part in (odd, ~odd):
            res = fit(fc.isel(time=np.flatnonzero(~part)), tr, START, END, field_linear=field, shrink=lams)
            blend[part] = apply(fc.isel(time=np.flatnonzero(part)), tr, res)["slp"].values
            if lams:
                chosen = [res["shrink"]["slp"][k]["shrink"] for k in res["shrink"]["slp"]]
                print(f"  shrink by lead, fitted on the {'even' if part[0] else 'odd'} months: {' '.join(chosen)}")
        _row(f"seed mean + blend with the {name}, 2-fold by month", _rmse(blend, o, fc.latitude.values))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("out", type=Path, help="a validation run's OUT folder")
    p.add_argument("--cross-validate", action="store_true", help="also the 2-fold check of the blends")
    p.add_argument(
        "--shrink",
        type=lambda x: [float(v) for v in x.split(",")],
        help="with --cross-validate: also the blend shrunk towards the regression, these candidate ridges",
    )
    p.add_argument("--truth", type=Path, default=TRUTH)
    args = p.parse_args(argv)
    paths = sorted(args.out.glob("seed*/forecast_val.zarr"))
    if not paths:
        p.error(f"{args.out} holds no seed*/forecast_val.zarr: run the script with --validation first")
    members = [xr.open_zarr(x, consolidated=False).load() for x in paths]
    tr = xr.open_zarr(args.truth)
    o = _truth_at(members[0], tr["slp"].load())
    print(f"{'lead (days)':<66}" + " ".join(f"{d:>6}" for d in (1, 2, 3, 5, 10)))
    seed_subsets(members, o)
    field_alone(members[0], tr, o)
    if args.cross_validate:
        mean = members[0].copy(data={"slp": np.mean([m["slp"].values for m in members], axis=0)})
        cross_validate(mean, tr, o, args.shrink)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
