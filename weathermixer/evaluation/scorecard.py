"""python -m weathermixer.scorecard REPORT_DIR/metrics.json [--strict]

Prints our z500 and t850 RMSE at 3 and 5 days (model, persistence, climatology from
weathermixer.evaluate) next to the WeatherBench 5.625 deg reference table of
docs/reference_scores.md in the source repository, when the evaluation grid is that table's 32 x 64.
It says clearly when the set does not match the reference set (another grid, other years, missing
fields or leads): on another grid the reference rows are left out, since scores depend on the
evaluation resolution.
Exit status: 0 printed; 1 with --strict when the set does not match; 2 unreadable metrics file.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import pandas as pd

# WeatherBench (Rasp et al. 2020) table as given in docs/reference_scores.md in the source repository:
# latitude-weighted RMSE against ERA5 on the 5.625 deg (32 x 64) grid over the test years 2017-2018, in
# the WeatherBench 1 form mean_t sqrt(MSE_t). Keys: (field, lead hours); the climatologies are the same
# at every lead.
REFERENCE_SOURCE = "docs/reference_scores.md, WeatherBench 5.625 deg table (Rasp et al. 2020)"
REFERENCE_GRID = (32, 64)
REFERENCE_YEARS = (2017, 2018)
REFERENCE_RMSE_FORM = "wb1"
REFERENCE_LATITUDE_EDGE = 87.1875  # the WeatherBench 5.625 deg grid's outermost latitudes (no poles)
COLUMNS = (("z500", 72), ("z500", 120), ("t850", 72), ("t850", 120))
FIELDS = {"z500": ("geopotential@500", "m2/s2", 0), "t850": ("temperature@850", "K", 2)}  # key, units, decimals
UNIT_SPELLINGS = {"z500": {"m2/s2", "m**2 s**-2", "m2 s-2", "m^2/s^2", "m^2 s^-2"}, "t850": {"K", "kelvin"}}


def _both(z3, z5, t3, t5) -> dict:
    return dict(zip(COLUMNS, (z3, z5, t3, t5), strict=True))


REFERENCE = {
    "operational IFS (about 10 km)": _both(154, 334, 1.36, 2.03),
    "best deep-learning entry (ResNet, Rasp & Thuerey 2020)": _both(268, 499, 1.65, 2.41),
    "IFS T63": _both(268, 463, 1.85, 2.52),
    "IFS T42": _both(489, 743, 3.09, 3.83),
    "weekly climatology": _both(816, 816, 3.50, 3.50),
    "persistence": _both(936, 1033, 4.23, 4.56),
    "climatology": _both(1075, 1075, 5.51, 5.51),
}
OURS = ("model", "persistence", "climatology")


class ScorecardError(ValueError):
    """The metrics file cannot be read as a weathermixer.evaluate report."""


def load_metrics(path) -> dict:
    try:
        m = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ScorecardError(f"{path}: not found (write it with python -m weathermixer.evaluate)") from None
    except (OSError, json.JSONDecodeError) as err:
        raise ScorecardError(f"{path}: not a JSON metrics file ({err})") from None
    missing = [k for k in ("grid", "scores", "init_times", "definitions") if k not in m]
    if missing:
        raise ScorecardError(f"{path}: missing {missing}; not a weathermixer.evaluate metrics.json")
    return m


def field_key(metrics: dict, short: str) -> str:
    """The scored field standing for z500 / t850: the report's headline mapping, else the ERA5 name."""
    return metrics.get("headline", {}).get(short, FIELDS[short][0])


def our_score(metrics: dict, short: str, lead: int, system: str) -> float | None:
    by_lead = metrics["scores"].get(field_key(metrics, short), {})
    hit = [h for h in by_lead if math.isclose(float(h), lead)]
    return by_lead[hit[0]].get(system, {}).get("rmse") if hit else None


def comparability(metrics: dict) -> tuple[list[str], list[str]]:
    """(mismatches, notes): why the set differs from the reference set, and caveats that remain."""
    bad, notes = [], []
    shape = tuple(metrics["grid"]["shape"])
    if shape != REFERENCE_GRID:
        bad.append(
            f"grid {shape[0]}x{shape[1]} is not the reference 32x64 (5.625 deg); scores depend on the "
            f"evaluation resolution"
        )
    inits = pd.DatetimeIndex(metrics["init_times"])
    a, b = REFERENCE_YEARS
    years = sorted(set(inits.year))
    outside = [y for y in years if not a <= y <= b]
    if outside:
        bad.append(
            f"init times {inits.min():%Y-%m-%d} .. {inits.max():%Y-%m-%d} (years "
            f"{', '.join(map(str, years))}) are not the reference test years {a}-{b}"
        )
    elif inits.min() > pd.Timestamp(f"{a}-01-07") or inits.max() < pd.Timestamp(f"{b}-12-24"):
        notes.append(
            f"init times cover {inits.min():%Y-%m-%d} .. {inits.max():%Y-%m-%d} ({len(inits)}), not the "
            f"whole test years {a}-{b}: the seasonal sampling differs"
        )
    for short, (_, units, _) in FIELDS.items():
        key = field_key(metrics, short)
        if key not in metrics["scores"]:
            bad.append(f"{short} ({key}) was not evaluated")
            continue
        for lead in (72, 120):
            if not any(math.isclose(float(h), lead) for h in metrics["scores"][key]):
                bad.append(f"{short}: lead {lead} h was not evaluated")
        have = metrics.get("fields", {}).get(key, {}).get("units", "")
        if have and have not in UNIT_SPELLINGS[short]:
            notes.append(f"{short} is in units '{have}'; the reference is in {units}")
    form = metrics["definitions"].get("rmse_form", "?")
    if form != REFERENCE_RMSE_FORM:
        notes.append(
            f"our RMSE is the {form} form ({metrics['definitions'].get('rmse', '')}); the reference "
            f"numbers are mean_t sqrt(MSE_t) (WeatherBench 1), slightly lower for the same errors: "
            f"evaluate with --rmse-form wb1 for an exact match of definitions"
        )
    lat = metrics["grid"].get("latitude", {})
    if shape == REFERENCE_GRID and lat and not math.isclose(abs(lat.get("first", 0)), REFERENCE_LATITUDE_EDGE):
        notes.append(
            f"latitudes run {lat.get('first'):g} .. {lat.get('last'):g}; the WeatherBench grid runs "
            f"+-{REFERENCE_LATITUDE_EDGE} (no poles)"
        )
    clim = metrics.get("climatology", {})
    if clim.get("overlaps_evaluation"):
        notes.append(
            f"our climatology ({clim.get('start')} .. {clim.get('end')}) overlaps the evaluated "
            f"times: it should come from the training years only"
        )
    return bad, notes


def _fmt(x, decimals: int) -> str:
    return "n/a" if x is None else f"{x:.{decimals}f}"


def scorecard_text(metrics: dict) -> str:
    bad, notes = comparability(metrics)
    shape = tuple(metrics["grid"]["shape"])
    inits = pd.DatetimeIndex(metrics["init_times"])
    header = [f"{s} {lead // 24}d" for s, lead in COLUMNS]
    width = max(len(n) for n in REFERENCE) + 2
    rows = [
        f"{'':<{width}}" + "".join(f"{h:>10}" for h in header),
        f"{'(RMSE, lower is better)':<{width}}" + "".join(f"{FIELDS[s][1]:>10}" for s, _ in COLUMNS),
    ]
    for system in OURS:
        vals = [_fmt(our_score(metrics, s, lead, system), FIELDS[s][2]) for s, lead in COLUMNS]
        rows.append(f"{'ours: ' + system:<{width}}" + "".join(f"{v:>10}" for v in vals))
    if shape == REFERENCE_GRID:
        rows.append("-" * (width + 10 * len(COLUMNS)))
        for name, ref in REFERENCE.items():
            rows.append(f"{name:<{width}}" + "".join(f"{_fmt(ref[c], FIELDS[c[0]][2]):>10}" for c in COLUMNS))
    if bad:
        verdict = ["DOES NOT MATCH the reference set; our numbers are not comparable with it:"]
        verdict += [f"- {b}" for b in bad]
    else:
        truth = metrics.get("sources", {}).get("truth", "?")
        verdict = [
            "MATCHES the reference set in grid (32x64), test years and fields (z500, t850 at 3 and 5 days); "
            f"the reference verifies against ERA5, ours against {truth}"
        ]
    form = metrics["definitions"].get("rmse_form", "?")
    lines = [
        f"Scorecard: {REFERENCE_SOURCE}",
        f"our set: grid {shape[0]}x{shape[1]}, {len(inits)} inits "
        f"{inits.min():%Y-%m-%d} .. {inits.max():%Y-%m-%d}, RMSE form {form}",
        *verdict,
        "",
        *rows,
    ]
    if shape != REFERENCE_GRID:
        lines.append("(reference rows left out: they are for the 32x64 grid)")
    if notes:
        lines += ["", "notes:"] + [f"- {n}" for n in notes]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        allow_abbrev=False,
        prog="python -m weathermixer.scorecard",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("metrics", help="REPORT_DIR/metrics.json written by python -m weathermixer.evaluate")
    p.add_argument("--strict", action="store_true", help="exit 1 when the set does not match the reference set")
    args = p.parse_args(argv)
    try:
        metrics = load_metrics(args.metrics)
        print(scorecard_text(metrics))
        bad, _ = comparability(metrics)
    except ScorecardError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (KeyError, TypeError, ValueError) as err:  # a malformed entry inside the report
        print(f"error: {args.metrics}: malformed metrics file ({type(err).__name__}: {err})", file=sys.stderr)
        return 2
    return 1 if args.strict and bad else 0


if __name__ == "__main__":
    sys.exit(main())
