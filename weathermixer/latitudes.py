"""Latitude weights of a grid's rows, shared by the training loss, validation and evaluate: WeatherBench
2's cell areas (the default, non-zero on pole rows) or cos(latitude) (WeatherBench 1's, zero on pole rows),
both normalised to mean 1."""

from __future__ import annotations

import numpy as np

DEFAULT_WEIGHTING = "area"
WEIGHTINGS = {
    "cos": "w = cos(lat) / mean(cos(lat)) over the grid's latitudes",
    "area": "w = cell area / mean cell area, cell bounds halfway between latitudes and half a spacing "
    "beyond the outer ones, clipped to +-90 (WeatherBench 2's get_lat_weights on a global grid)",
}


def latitude_weights(lat, weighting: str = DEFAULT_WEIGHTING) -> np.ndarray:
    """weighting="area": each row's cell area (sin of the upper minus sin of the lower cell bound) over
    the given latitudes (degrees), mean 1, non-zero on pole rows; "cos": cos(lat) / mean(cos(lat)), zero
    at the poles."""
    lat = np.asarray(lat, dtype=np.float64)
    if lat.ndim != 1 or lat.size == 0:
        raise ValueError(f"latitudes must be a non-empty 1-D array, got shape {lat.shape}")
    if np.any(~np.isfinite(lat)) or np.any(np.abs(lat) > 90.0):
        raise ValueError(f"latitudes must be finite degrees in [-90, 90], got {lat.min():g} .. {lat.max():g}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"latitude weighting {weighting!r}: choose one of {sorted(WEIGHTINGS)}")
    if weighting == "area":
        return cell_area_weights(lat)
    w = np.cos(np.deg2rad(lat))
    w[np.isclose(np.abs(lat), 90.0, rtol=0.0, atol=1e-9)] = 0.0  # cos(90 deg) is 6e-17 in floating point
    if w.sum() == 0.0:
        raise ValueError("all latitudes are poles: cos-latitude weights are all zero")
    return w / w.mean()


def cell_area_weights(lat: np.ndarray) -> np.ndarray:
    """Area of each latitude row's cell on the sphere, normalised to mean 1 (any latitude order)."""
    order = np.argsort(lat)
    x = lat[order]
    if x.size == 1:
        return np.ones(1)
    mid = (x[:-1] + x[1:]) / 2
    bounds = np.clip(np.concatenate([[x[0] - (x[1] - x[0]) / 2], mid, [x[-1] + (x[-1] - x[-2]) / 2]]), -90, 90)
    area = np.diff(np.sin(np.deg2rad(bounds)))
    w = np.empty_like(area)
    w[order] = area
    return w / w.mean()
