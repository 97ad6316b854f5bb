"""Report figures, one function per figure, drawn headless on matplotlib's Agg canvas (no pyplot,
no display, no global backend switch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

SYSTEM_STYLE = {
    "model": {"color": "C0", "marker": "o", "label": "model"},
    "persistence": {"color": "C1", "marker": "s", "linestyle": "--", "label": "persistence"},
    "climatology": {"color": "C2", "linestyle": ":", "label": "climatology"},
    "linear": {"color": "C3", "marker": "^", "linestyle": "-.", "label": "linear regression"},
}


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height))  # fixed margins: a layout engine triples the drawing time
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path) -> Path:
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path


def plot_scores_vs_lead(scores_by_lead: dict, title: str, path, units: str = "") -> Path:
    """RMSE and ACC versus lead time for the model and the baselines.

    scores_by_lead: one field of metrics.json's scores, lead hours (text) -> system -> {rmse, bias, acc};
    a null (undefined) value leaves a gap, so the climatology has no ACC curve."""
    leads = sorted(scores_by_lead, key=float)
    hours = np.array([float(h) for h in leads])
    fig = _figure(10, 4)
    ax_rmse, ax_acc = fig.subplots(1, 2)
    systems = [s for s in SYSTEM_STYLE if any(s in scores_by_lead[h] for h in leads)]
    for system in systems:
        for ax, stat in ((ax_rmse, "rmse"), (ax_acc, "acc")):
            y = np.array(
                [
                    np.nan if scores_by_lead[h].get(system, {}).get(stat) is None else scores_by_lead[h][system][stat]
                    for h in leads
                ],
                dtype=float,
            )
            if np.isfinite(y).any():
                ax.plot(hours, y, **SYSTEM_STYLE[system])
    ax_rmse.set_ylabel(f"RMSE ({units})" if units else "RMSE")
    ax_acc.set_ylabel("ACC")
    for ax in (ax_rmse, ax_acc):
        ax.set_xlabel("lead time (h)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.13, top=0.87, wspace=0.25)
    return _save(fig, path)


def plot_map_panels(truth: np.ndarray, forecast: np.ndarray, lat, lon, title: str, path, units: str = "") -> Path:
    """Three maps of one field: truth, forecast (same colour scale) and forecast - truth (diverging,
    symmetric about 0). Arrays are (latitude, longitude) in the order of `lat` (either direction)."""
    lat, lon = np.asarray(lat, dtype=float), np.asarray(lon, dtype=float)
    north_first = np.argsort(-lat)
    truth, forecast = np.asarray(truth)[north_first], np.asarray(forecast)[north_first]
    dlon = float(np.mean(np.abs(np.diff(lon)))) if lon.size > 1 else 1.0
    dlat = float(np.mean(np.abs(np.diff(lat)))) if lat.size > 1 else 1.0
    extent = (
        lon.min() - dlon / 2,
        lon.max() + dlon / 2,
        max(lat.min() - dlat / 2, -90.0),
        min(lat.max() + dlat / 2, 90.0),
    )
    lo = float(np.nanmin([truth.min(), forecast.min()]))
    hi = float(np.nanmax([truth.max(), forecast.max()]))
    error = forecast - truth
    span = float(np.nanmax(np.abs(error))) or 1.0
    fig = _figure(15, 3.8)
    for ax, data, name, kw in zip(
        fig.subplots(1, 3),
        (truth, forecast, error),
        ("truth", "forecast", "error"),
        ({"vmin": lo, "vmax": hi, "cmap": "viridis"},) * 2 + ({"vmin": -span, "vmax": span, "cmap": "RdBu_r"},),
        strict=True,
    ):
        im = ax.imshow(data, extent=extent, origin="upper", aspect="auto", interpolation="nearest", **kw)
        ax.set_title(name)
        ax.set_xlabel("longitude")
        ax.set_ylabel("latitude")
        fig.colorbar(im, ax=ax, label=units)
    fig.suptitle(title)
    fig.subplots_adjust(left=0.05, right=0.97, bottom=0.14, top=0.85, wspace=0.3)
    return _save(fig, path)
