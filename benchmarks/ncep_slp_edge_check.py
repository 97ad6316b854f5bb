"""How much of the NCEP sea-level pressure forecast error enters across the domain's edges, on 2008:

    python benchmarks/ncep_slp_edge_check.py [--out benchmarks/results_ncep_slp_edges.json]
        [--plot docs/skill/ncep_slp_error_by_longitude.png] [--smoke]

The domain (30-70 N, 70 W-10 E) is open: weather enters from the west. A field-wide linear forecast (ridge on
the anomalies of the whole field at t and t - 1 day, fitted on 2001-2007, as `weathermixer.evaluation.
field_linear`) is given, on top of what the domain held at the init, the true anomalies of a strip of K
columns along one edge on every day from t + 1 day to the valid day: information no forecast made at t has.
The same is done with the eastern edge (where weather leaves), the northern and the southern edge as
controls. Every variant is scored on the same interior (the K columns or rows along every edge left out),
latitude-weighted RMSE in Pa at 1, 2, 3 and 5 days, the ridge per variant and lead chosen on 2008 (a
diagnostic: nothing here is a forecast or a choice of the recipe). The ratio of the in-domain forecast's
error to the anomaly's spread per longitude is the error's profile across the domain; --plot draws it.

The test years are not read. Data: NCEP/NCAR Reanalysis 1, NOAA PSL (see docs/skill/ATTRIBUTION.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

TRUTH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real" / "ncep_slp_natl_daily_2001_2010.zarr"
TRAIN = ("2001-01-01", "2007-12-31")
VAL = ("2008-01-01", "2008-12-31")
CLIM_WINDOW_DAYS = 15
LEADS = (1, 2, 3, 5)
RIDGES = (1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0)
EDGES = ("west", "east", "north", "south")


def anomalies(path: Path, clim_end: str) -> tuple[pd.DatetimeIndex, np.ndarray, np.ndarray, np.ndarray]:
    """(days, anomalies (day, lat, lon) against the smoothed day-of-year climatology of the training years,
    latitudes, longitudes), through 2008 only."""
    from weathermixer.evaluation import metrics as M

    slp = xr.open_zarr(path)["slp"].sel(time=slice(TRAIN[0], VAL[1])).sortby(["latitude", "longitude"]).load()
    clim = M.build_climatology(slp, TRAIN[0], clim_end, CLIM_WINDOW_DAYS)
    days = pd.DatetimeIndex(slp.time.values)
    a = slp.values.astype(np.float64) - clim.at(days).transpose("time", ...).values
    return days, a, slp.latitude.values, slp.longitude.values


def strip(a: np.ndarray, edge: str, k: int) -> np.ndarray:
    """(day, k x the edge's length): the K columns (west, east) or rows (south, north) along one edge of a
    field whose latitudes ascend and longitudes run west to east."""
    part = {"west": a[:, :, :k], "east": a[:, :, -k:], "south": a[:, :k], "north": a[:, -k:]}[edge]
    return part.reshape(len(a), -1)


def design(a: np.ndarray, pos: np.ndarray, lead: int, edge: str | None, k: int) -> np.ndarray:
    """Features of the inits at positions `pos`: the field at t and t - 1, and with `edge` its strip at
    t + 1 .. t + lead (the oracle)."""
    flat = a.reshape(len(a), -1)
    cols = [flat[pos], flat[pos - 1]]
    if edge is not None:
        cols += [strip(a[pos + s], edge, k) for s in range(1, lead + 1)]
    return np.concatenate(cols, axis=1)


def ridge_scores(X, Y, Xv, Yv, w, ridges=RIDGES) -> tuple[float, float, np.ndarray]:
    """(best weighted MSE on the validation rows, its relative ridge, its validation error per pixel)."""
    from weathermixer.evaluation.field_linear import FieldSystem

    evals, evecs = np.linalg.eigh(X.T @ X)  # the relative ridge of field_linear, on these features
    system = FieldSystem(np.clip(evals, 0, None)[None], evecs[None], (X.T @ Y)[None], None, None, [len(X)])
    best = (np.inf, 0.0, None)
    for r in ridges:
        err = Xv @ system.coef(0, r) - Yv
        mse = float((err**2 * w).sum(axis=1).mean())
        if mse < best[0]:
            best = (mse, r, err)
    return best


def interior_mask(nlat: int, nlon: int, k: int) -> np.ndarray:
    m = np.zeros((nlat, nlon), bool)
    m[k : nlat - k, k : nlon - k] = True
    return m


def run(k: int, leads=LEADS, clim_end: str = TRAIN[1], stride: int = 1) -> dict:
    days, a, lat, lon = anomalies(TRUTH, clim_end)
    from weathermixer.evaluation import metrics as M

    nlat, nlon = a.shape[1:]
    latw = np.broadcast_to(M.latitude_weights(lat)[:, None], (nlat, nlon))
    inside = interior_mask(nlat, nlon, k)
    w_all = (latw / latw.sum()).ravel()  # weights summing to 1: (err**2 * w).sum(axis=1) is the weighted MSE
    w_in = (np.where(inside, latw, 0) / latw[inside].sum()).ravel()
    rows: dict = {"k": k, "leads_days": list(leads), "scores": {}, "ridges": {}, "scored_on": "interior"}
    for lead in leads:
        pos_all = np.arange(1, len(days) - lead)
        t = days[pos_all]
        train = pos_all[(t >= TRAIN[0]) & (days[pos_all + lead] <= pd.Timestamp(TRAIN[1]))][::stride]
        val = pos_all[(t >= VAL[0]) & (t <= pd.Timestamp(VAL[1]))]
        rows.setdefault("inits_2008", []).append(int(len(val)))
        Y, Yv = a[train + lead].reshape(len(train), -1), a[val + lead].reshape(len(val), -1)
        for edge in (None, *EDGES):
            name = "in_domain" if edge is None else f"{edge}_oracle"
            X, Xv = design(a, train, lead, edge, k), design(a, val, lead, edge, k)
            mse, r, err = ridge_scores(X, Y, Xv, Yv, w_in)
            rows["scores"].setdefault(name, []).append(round(float(np.sqrt(mse)), 1))
            rows["ridges"].setdefault(name, []).append(r)
            if edge is None:  # the whole domain too (an oracle's strip at the valid day is one of its inputs)
                domain = np.sqrt((err**2 * w_all).sum(axis=1).mean())
                rows["scores"].setdefault("in_domain_whole_domain", []).append(round(float(domain), 1))
                spread = np.sqrt((Yv**2).mean(axis=0)).reshape(nlat, nlon)
                ratio = np.sqrt((err**2).mean(axis=0)).reshape(nlat, nlon) / spread
                col = (ratio * latw).sum(axis=0) / latw.sum(axis=0)
                rows.setdefault("error_over_spread_by_longitude", {})[f"{lead}d"] = [round(float(c), 3) for c in col]
        clim = np.sqrt((Yv**2 * w_in).sum(axis=1).mean())
        rows["scores"].setdefault("climatology", []).append(round(float(clim), 1))
    rows["longitude"] = [float(x) for x in lon]
    return rows


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    for lead, col in res["error_over_spread_by_longitude"].items():
        ax.plot(res["longitude"], col, marker="o", ms=3, label=f"{lead}")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("longitude (deg E)")
    ax.set_ylabel("RMSE / anomaly spread")
    ax.set_title("Field-wide linear forecast of SLP on 2008: error across the domain", fontsize=10)
    ax.legend(title="lead", fontsize=8)
    fig.text(0.01, 0.01, "NCEP/NCAR Reanalysis 1, NOAA PSL", fontsize=6, color="grey")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--k", type=int, default=2, help="columns or rows in each edge strip (default 2: 5 degrees)")
    p.add_argument("--out", help="write the JSON here as well as to stdout")
    p.add_argument("--plot", help="PNG of the in-domain forecast's error over the anomaly spread per longitude")
    p.add_argument("--smoke", action="store_true", help="leads 1 and 2, every 8th training day (seconds)")
    args = p.parse_args(argv)
    if not TRUTH.exists():
        print(f"ncep_slp_edge_check: {TRUTH} not found (../shared beside the repository)", file=sys.stderr)
        return 2
    res = run(args.k, leads=(1, 2) if args.smoke else LEADS, stride=8 if args.smoke else 1)
    res["command"] = "python benchmarks/ncep_slp_edge_check.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.plot:
        plot(res, args.plot)
    from jigsaw_ext.files import emit_json

    return emit_json(res, args.out)


if __name__ == "__main__":
    sys.exit(main())
