"""RMSE per latitude row of a forecast against the truth: are the pole rows trained like the others?

    python benchmarks/bench_pole_rows.py --forecast fc.zarr --truth runs/synthetic/era5like_32x64_seed0_20200101.zarr \
        [--variable 2m_temperature] [--lead-hours 6] [--out rows.json]

Per row: sqrt(mean over init times and longitudes of (f - o)^2), in the variable's units. Prints the
pole rows (|lat| = 90), the mean over mid-latitude rows (30 <= |lat| <= 60) and the ratio of the worse
pole row to it. The forecast is one written by `python -m weathermixer.forecast` (WeatherBench 2 layout).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from jigsaw_ext.files import make_output_folders  # noqa: E402


def row_rmse(fc: xr.Dataset, truth: xr.Dataset, variable: str, lead_hours: float) -> tuple[np.ndarray, np.ndarray]:
    """(latitudes ascending, RMSE per row) of `variable` at one lead."""
    lead = pd.Timedelta(hours=lead_hours)
    f = fc[variable].sel(prediction_timedelta=lead).sortby("latitude").load()
    valid = pd.DatetimeIndex(f.time.values) + lead
    o = truth[variable].sel(time=valid).sortby("latitude").load()
    err = f.values.astype(np.float64) - o.values.astype(np.float64)
    return f.latitude.values, np.sqrt((err**2).mean(axis=(0, 2)))


def summary(lat: np.ndarray, rmse: np.ndarray) -> dict:
    poles = np.isclose(np.abs(lat), 90.0)
    mid = (np.abs(lat) >= 30.0) & (np.abs(lat) <= 60.0)
    out = {
        "rows": {f"{a:g}": float(r) for a, r in zip(lat, rmse, strict=True)},
        "mid_latitude_mean": float(rmse[mid].mean()),
        "pole_rows": {f"{a:g}": float(r) for a, r in zip(lat[poles], rmse[poles], strict=True)},
    }
    out["worst_pole_over_mid_latitude"] = float(rmse[poles].max() / rmse[mid].mean()) if poles.any() else None
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--forecast", required=True)
    ap.add_argument("--truth", required=True)
    ap.add_argument("--variable", default="2m_temperature")
    ap.add_argument("--lead-hours", type=float, default=6.0)
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args(argv)
    make_output_folders(ap, {"--out": args.out})
    fc = xr.open_zarr(args.forecast, chunks=None, consolidated=False)
    truth = xr.open_zarr(args.truth, chunks=None, consolidated=False)
    res = summary(*row_rmse(fc, truth, args.variable, args.lead_hours))
    res.update(variable=args.variable, lead_hours=args.lead_hours)
    print(
        f"{args.variable} at {args.lead_hours:g} h, RMSE per row: pole rows "
        + ", ".join(f"{k}: {v:.3g}" for k, v in res["pole_rows"].items())
        + f"; mid-latitude rows (30..60 deg) mean {res['mid_latitude_mean']:.3g}; worst pole / mid-latitude "
        + (f"{res['worst_pole_over_mid_latitude']:.2f}" if res["worst_pole_over_mid_latitude"] else "n/a")
    )
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
