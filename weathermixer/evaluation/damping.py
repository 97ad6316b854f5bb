"""Damping towards the baselines: per variable and lead, a blend of the forecast with the climatology and
the per-pixel linear regression, its weights chosen on validation forecasts.

    python -m weathermixer.evaluation.damping fit --forecast VAL.zarr --truth TRUTH --clim-start S --clim-end E \
        --out damping.json
    python -m weathermixer.evaluation.damping apply --forecast FC.zarr --truth TRUTH --damping damping.json \
        --out FC_DAMPED.zarr

A forecast's anomaly loses skill with the lead; beyond a few days the least-squares forecast shrinks it
towards the climatology, which a model trained on short rollouts does not do. With f the forecast, c the
climatology at the valid time and g the per-pixel linear regression (both weathermixer.evaluation's
baselines, fitted on the training period given: never on the scored years), the damped forecast is

    f' = g + a[v, l] (f - g) + b[v, l] (c - g)

one (a, b) per variable v and lead l. `fit` finds them by cos-latitude-weighted least squares of the truth
o - g on (f - g, c - g) over every init and grid point of the given store: run it on VALIDATION forecasts.
(a, b) = (1, 0) leaves the forecast unchanged, (0, 1) is the climatology, (0, 0) the regression. The
climatology is evaluate's (day of year x hour, smoothed over +-N days as evaluate's default) and the
regression evaluate's, so the blend and the scores refer to the same baselines.

`fit --field-linear` adds a third reference r, the field-wide linear forecast of `field_linear` (a ridge on
the anomalies of the whole field at t and t - dt, fitted on the same training period, its ridge chosen per
lead on the given store's inits): f' = g + a (f - g) + b (c - g) + d (r - g). The ridges are stored with the
weights, so `apply` refits the same r on the training period.

`fit --shrink 0,0.1,1,inf` (candidates) guards the weights against overfitting where the store holds few
independent cases (long leads: a year of autocorrelated inits): per lead, a ridge shrink x A_jj on each
weight (A_jj: its reference's weighted sum of squares) pulls the blend towards the regression g, inf being g
itself. Each lead's shrink is chosen by 2-fold cross-validation over the store's inits: the calendar months,
in time order, alternate between the folds (on a year, odd months against even ones); the weights fitted on
one fold are scored on the other and back, the lowest error wins, and the weights are then refitted on every
init with it. The field-wide ridges are chosen once on every init. The choice and each candidate's
cross-validated MSE over the regression's are written beside the weights (`shrink`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from jigsaw_ext.files import make_output_folders

from ..inference.store import partial_path, publish
from .metrics import EvaluationError

FORMAT = "weathermixer.damping/2"
LEAD = "prediction_timedelta"


class DampingError(ValueError):
    pass


def _lead_key(td) -> str:
    return f"{pd.Timedelta(td) / pd.Timedelta(hours=1):g}"


def _truth(fc, tr, var: str):
    if var not in tr:
        raise DampingError(f"truth has no variable {var!r} (forecast variable); truth has {sorted(tr.data_vars)}")
    o = tr[var]
    rest = [d for d in fc[var].dims if d not in ("time", LEAD)]
    missing = [d for d in rest if d not in o.dims]
    if missing:
        raise DampingError(f"truth variable {var!r} lacks the forecast's dimension(s) {missing}")
    return o.sel({d: fc[d].values for d in rest}).transpose("time", *rest), rest


def references(fc, tr, var: str, start: str, end: str, window_days: int | None):
    """(forecast, climatology, linear regression) of `var`, float64 arrays shaped like the forecast."""
    from . import metrics as M
    from .baselines import ClimatologyPeriod, fit_linear
    from .evaluate import climatology_window

    o, rest = _truth(fc, tr, var)
    f = fc[var].transpose("time", LEAD, *rest)
    inits, leads = pd.DatetimeIndex(fc["time"].values), pd.TimedeltaIndex(fc[LEAD].values)
    valid = pd.DatetimeIndex(np.add.outer(inits.values, leads.values).ravel())
    period = ClimatologyPeriod(pd.Timestamp(start), pd.Timestamp(end), False, False)
    if period.end >= inits.min():
        raise DampingError(
            f"the baselines' training period {start} .. {end} reaches the first init "
            f"{inits.min():%Y-%m-%d}: fit the baselines on earlier years"
        )
    window, _ = climatology_window(period, window_days)
    clim = M.build_climatology(o, period.start, period.end, window, for_times=valid)
    c = clim.at(valid).transpose("time", *rest).values.reshape(f.shape)
    dt = leads[0]
    lin = fit_linear(o, period, dt, leads)
    g = lin.forecast(o.sel(time=inits).values, o.sel(time=inits - dt).values, inits, f.shape)
    return f.values.astype(np.float64), c.astype(np.float64), np.asarray(g, np.float64), o, rest


def field_reference(fc, o, start: str, end: str, window_days: int | None, ridges: list[float] | None):
    """(the field-wide linear forecast shaped like the forecast, its ridge per lead): `ridges` given, or
    chosen per lead on the store's inits (cos-latitude weighted MSE)."""
    from . import field_linear as FL
    from . import metrics as M
    from .baselines import ClimatologyPeriod
    from .evaluate import climatology_window

    inits, leads = pd.DatetimeIndex(fc["time"].values), pd.TimedeltaIndex(fc[LEAD].values)
    window, _ = climatology_window(ClimatologyPeriod(pd.Timestamp(start), pd.Timestamp(end), False, False), window_days)
    clim = M.build_climatology(o, start, end, window)
    system = FL.fit_system(o, clim, start, end, leads[0], leads)
    if ridges is None:
        w = np.broadcast_to(
            M.latitude_weights(fc["latitude"].values).reshape([-1 if d == "latitude" else 1 for d in o.dims[1:]]),
            o.shape[1:],
        )
        ridges = FL.choose(system, o, clim, inits, w.ravel())
    r = FL.forecast(system, o, clim, inits, ridges)
    return r.reshape((len(inits), len(leads), *o.shape[1:])), ridges


def month_folds(inits) -> np.ndarray:
    """The fold (0 or 1) of every init: the calendar months present, in time order, alternate between the two
    (on a whole year: the odd months against the even ones)."""
    t = pd.DatetimeIndex(inits)
    _, rank = np.unique(np.asarray(t.year) * 12 + np.asarray(t.month), return_inverse=True)
    return rank % 2


def _sums(X: np.ndarray, y: np.ndarray, w: np.ndarray):
    """Weighted normal equations per lead (axis 1): A (lead, k, k), B (lead, k), y'Wy (lead,)."""
    axes = tuple(i for i in range(y.ndim) if i != 1)
    A = np.einsum("...p,...q->...pq", w[..., None] * X, X).sum(axes)
    B = np.einsum("...p,...->...p", w[..., None] * X, y).sum(axes)
    return A, B, (w * y * y).sum(axes)


def _solve(A: np.ndarray, B: np.ndarray, shrink: float) -> np.ndarray:
    """(lead, k) weights minimising |y - X ab|^2_W + shrink sum_j A_jj ab_j^2 per lead: a ridge relative to each
    reference's own weighted sum of squares, pulling the blend towards the regression g (weights 0);
    shrink inf is the regression itself."""
    if np.isinf(shrink):
        return np.zeros(B.shape)
    return np.stack(
        [np.linalg.lstsq(a + shrink * np.diag(np.diag(a)), b, rcond=None)[0] for a, b in zip(A, B, strict=True)]
    )


def choose_shrink(X: np.ndarray, y: np.ndarray, w: np.ndarray, folds: np.ndarray, candidates: list[float]):
    """(shrink per lead, cross-validated MSE of every candidate relative to the regression's (lead, cand)):
    the weights fitted on one fold of inits are scored on the other and back; the lowest error wins."""
    parts = [_sums(X[folds == k], y[folds == k], w) for k in (0, 1)]
    err = np.zeros((y.shape[1], len(candidates)))
    for j, lam in enumerate(candidates):
        for k in (0, 1):
            A, B, yy = parts[k]
            ab = _solve(parts[1 - k][0], parts[1 - k][1], lam)
            err[:, j] += yy - 2 * np.einsum("lp,lp->l", ab, B) + np.einsum("lp,lpq,lq->l", ab, A, ab)
    ratio = err / (parts[0][2] + parts[1][2])[:, None]
    return [candidates[j] for j in np.argmin(ratio, axis=1)], ratio


def _var_weights(fc, tr, var, start, end, window_days, field_linear, shrink):
    """[a, b(, d)] per lead of one variable, the field ridges and the shrink choice (or None)."""
    from . import metrics as M

    f, c, g, o, rest = references(fc, tr, var, start, end, window_days)
    refs, ridges = [f - g, c - g], None
    if field_linear:
        r, ridges = field_reference(fc, o, start, end, window_days, None)
        refs.append(r - g)
    valid = np.add.outer(fc["time"].values, fc[LEAD].values).ravel()
    y = o.sel(time=pd.DatetimeIndex(valid)).values.astype(np.float64).reshape(f.shape) - g
    w = M.latitude_weights(fc["latitude"].values).reshape([-1 if d == "latitude" else 1 for d in ["time", LEAD] + rest])
    X = np.stack(refs, -1)
    lams, cv = [0.0] * f.shape[1], None
    if shrink:
        folds = month_folds(fc["time"].values)
        if folds.min() == folds.max():
            raise DampingError("--shrink chooses by 2-fold cross-validation over calendar months: the store holds one")
        lams, cv = choose_shrink(X, y, w, folds, shrink)
    A, B, _ = _sums(X, y, w)
    ab = np.stack([_solve(A[i : i + 1], B[i : i + 1], lam)[0] for i, lam in enumerate(lams)])
    return ab, ridges, lams, cv


def fit(
    fc,
    tr,
    start: str,
    end: str,
    window_days: int | None = None,
    field_linear: bool = False,
    shrink: list[float] | None = None,
) -> dict:
    """The blend weights of every variable and lead of the forecast store `fc` against the truth `tr`
    (with the field-wide linear forecast as a third reference when `field_linear`). `shrink`: candidate
    relative ridges on the weights (towards the regression; inf: the regression alone), one chosen per lead
    by 2-fold cross-validation over alternate calendar months of the store's inits; None: least squares."""
    weights, field_ridges, chosen = {}, {}, {}
    for var in fc.data_vars:
        ab, ridges, lams, cv = _var_weights(fc, tr, var, start, end, window_days, field_linear, shrink)
        keys = [_lead_key(td) for td in fc[LEAD].values]
        if ridges is not None:
            field_ridges[var] = dict(zip(keys, ridges, strict=True))
        if cv is not None:
            chosen[var] = {
                k: {
                    "shrink": f"{lam:g}",
                    "cv_mse_over_regression": {f"{c:g}": float(e) for c, e in zip(shrink, row, strict=True)},
                }
                for k, lam, row in zip(keys, lams, cv, strict=True)
            }
        weights[var] = {k: [float(x) for x in row] for k, row in zip(keys, ab, strict=True)}
    return {
        "format": FORMAT,
        "blend": "g + a (f - g) + b (c - g) [+ d (r - g)]: [a, b(, d)] per lead (hours)",
        "baselines": {"start": str(start), "end": str(end), "clim_window_days": window_days},
        **({"field_linear_ridge": field_ridges} if field_linear else {}),
        **({"shrink": chosen} if shrink else {}),
        "fitted_on": {
            "init_first": str(pd.Timestamp(fc["time"].values[0])),
            "init_last": str(pd.Timestamp(fc["time"].values[-1])),
            "inits": int(fc.sizes["time"]),
        },
        "weights": weights,
    }


def apply(fc, tr, damping: dict):
    """The blend g + a (f - g) + b (c - g) for every variable and lead of `fc` (a copy)."""
    if damping.get("format") != FORMAT:
        raise DampingError(f"damping file format {damping.get('format')!r}: expected {FORMAT!r}")
    base = damping["baselines"]
    out = fc.copy()
    for var in fc.data_vars:
        if var not in damping["weights"]:
            raise DampingError(f"damping file has no weights for variable {var!r}: it has {sorted(damping['weights'])}")
        table = damping["weights"][var]
        missing = [_lead_key(td) for td in fc[LEAD].values if _lead_key(td) not in table]
        if missing:
            raise DampingError(f"damping file has no weights for {var!r} at lead(s) {', '.join(missing)} h")
        f, c, g, o, rest = references(fc, tr, var, base["start"], base["end"], base["clim_window_days"])
        refs = [f - g, c - g]
        if "field_linear_ridge" in damping:
            ridges = [damping["field_linear_ridge"][var][_lead_key(td)] for td in fc[LEAD].values]
            refs.append(field_reference(fc, o, base["start"], base["end"], base["clim_window_days"], ridges)[0] - g)
        ab = np.array([table[_lead_key(td)] for td in fc[LEAD].values])
        if ab.shape[1] != len(refs):
            raise DampingError(f"damping file holds {ab.shape[1]} weights per lead for {var!r}: expected {len(refs)}")
        shape = [1, -1] + [1] * len(rest)
        damped = (g + sum(ab[:, k].reshape(shape) * x for k, x in enumerate(refs))).astype(np.float32)
        out[var] = (("time", LEAD, *rest), damped, dict(fc[var].attrs))
    out.attrs = {
        **fc.attrs,
        "damping": json.dumps(damping["weights"]),
        "created_by": "python -m weathermixer.evaluation.damping apply",
    }
    for v in out.variables.values():
        v.encoding = {}
    return out


def _shrink_list(text: str) -> list[float]:
    try:
        out = [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated numbers (inf allowed)") from None
    if not out or any(x < 0 or np.isnan(x) for x in out):
        raise argparse.ArgumentTypeError(f"{text!r}: the ridges must be >= 0")
    return out


def main(argv=None) -> int:
    from .plan import open_dataset

    p = argparse.ArgumentParser(
        prog="python -m weathermixer.evaluation.damping",
        allow_abbrev=False,
        description="blend forecasts with the climatology and the linear regression "
        "(weights fitted on validation forecasts)",
    )

    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fit", help="fit the factors on a (validation) forecast store", allow_abbrev=False)
    a = sub.add_parser("apply", help="write the damped forecast", allow_abbrev=False)
    for s in (f, a):
        s.add_argument("--forecast", required=True)
        s.add_argument("--truth", required=True)
        s.add_argument("--out", required=True)
    f.add_argument("--clim-start", required=True, help="first time of the climatology's training period")
    f.add_argument("--clim-end", required=True, help="last time of the climatology's training period")
    f.add_argument("--clim-window-days", type=int, help="smoothing (default: evaluate's)")
    f.add_argument(
        "--field-linear",
        action="store_true",
        help="add the field-wide linear forecast (ridge on the whole field's anomalies) as a third reference",
    )
    f.add_argument(
        "--shrink",
        type=_shrink_list,
        help="comma-separated relative ridges on the blend weights (towards the regression; inf: the regression "
        "alone), one chosen per lead by 2-fold cross-validation over alternate months of the inits",
    )
    a.add_argument("--damping", required=True, help="the file `fit` wrote")
    args = p.parse_args(argv)
    make_output_folders(p, {"--out": args.out})
    try:
        fc, tr = open_dataset(args.forecast, "forecast"), open_dataset(args.truth, "truth")
        if args.cmd == "fit":
            res = fit(fc, tr, args.clim_start, args.clim_end, args.clim_window_days, args.field_linear, args.shrink)
            tmp = Path(args.out + ".partial")
            tmp.write_text(json.dumps(res, indent=1))
            tmp.replace(args.out)
            shrunk = "".join(
                f"; {v} shrink by lead: " + " ".join(f"{k} h {x['shrink']}" for k, x in t.items())
                for v, t in res.get("shrink", {}).items()
            )
            print(
                f"wrote {args.out}: [a, b(, d)] by lead: "
                + "; ".join(
                    f"{v}: " + " ".join(f"{k} h " + " ".join(f"{y:.2f}" for y in x) for k, x in t.items())
                    for v, t in res["weights"].items()
                )
                + shrunk
            )
        else:
            damped = apply(fc, tr, json.loads(Path(args.damping).read_text()))
            partial = partial_path(args.out)
            damped.to_zarr(partial, mode="w", consolidated=False)
            publish(partial, Path(args.out))
            print(f"wrote {args.out}: {args.forecast} damped with {args.damping}")
    except (DampingError, EvaluationError, KeyError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
