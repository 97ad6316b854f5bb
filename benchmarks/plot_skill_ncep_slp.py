"""RMSE by lead of the NCEP daily sea-level pressure recipe against the baselines (docs/skill.md).

    python benchmarks/plot_skill_ncep_slp.py --val VAL_OUT --test TEST_OUT --out docs/skill/ncep_slp_rmse_by_lead.png

VAL_OUT / TEST_OUT: the OUT folders of `bash benchmarks/skill_ncep_slp.sh OUT [--validation]` (their
report/ and report_raw/ metrics.csv). Data: NCEP/NCAR Reanalysis 1, NOAA PSL (see docs/skill/ATTRIBUTION.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

STYLE = {
    "model": ("model (blend)", "C3", "-"),
    "raw": ("model before the blend", "C3", ":"),
    "persistence": ("persistence", "C0", "--"),
    "climatology": ("climatology", "C2", "--"),
    "linear": ("per-pixel regression", "C1", "--"),
}


def _curves(out: Path) -> dict[str, pd.Series]:
    m = pd.read_csv(out / "report" / "metrics.csv")
    curves = {
        s: pd.Series(g.set_index("lead_hours").rmse.values, index=g.lead_hours.values / 24)
        for s, g in m.groupby("system")
    }
    raw = out / "report_raw" / "metrics.csv"
    if raw.exists():
        r = pd.read_csv(raw)
        r = r[r.system == "model"]
        curves["raw"] = pd.Series(r.rmse.values, index=r.lead_hours.values / 24)
    return curves


def main(argv=None) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = argparse.ArgumentParser(allow_abbrev=False)
    p.add_argument("--val", type=Path, required=True)
    p.add_argument("--test", type=Path)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    panels = [("validation 2008", args.val)] + ([("test 2009-2010", args.test)] if args.test else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), sharey=True, squeeze=False)
    for ax, (title, out) in zip(axes[0], panels, strict=True):
        for name, series in _curves(out).items():
            label, color, ls = STYLE[name]
            ax.plot(series.index, series.values, ls, color=color, marker="o", ms=3, label=label)
        ax.set_title(f"NCEP/NCAR R1 sea-level pressure, {title}", fontsize=9)
        ax.set_xlabel("lead (days)")
        ax.set_xticks([1, 2, 3, 5, 10])
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("lat-weighted RMSE (Pa)")
    axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.text(0.01, 0.01, "NCEP/NCAR Reanalysis data provided by NOAA PSL, Boulder, Colorado, USA", fontsize=6)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=90)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
