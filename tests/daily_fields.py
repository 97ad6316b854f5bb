"""Synthetic daily sea-level-pressure fields for the regional skill tests: a given anomaly on 3 latitude
rows (40-45 N) from 2001-01-01, plus 101000 Pa and an annual cycle of 500 Pa."""

from __future__ import annotations

import numpy as np
import pandas as pd


def daily_pressure(anomaly: np.ndarray, longitudes):
    """(time, 3, len(longitudes)) anomaly -> the field as a DataArray (time, latitude, longitude)."""
    import xarray as xr

    days = anomaly.shape[0]
    season = 500 * np.cos(2 * np.pi * np.arange(days) / 365.25)[:, None, None]
    return xr.DataArray(
        101000 + anomaly + season,
        dims=("time", "latitude", "longitude"),
        coords={
            "time": pd.date_range("2001-01-01", periods=days, freq="D"),
            "latitude": [40.0, 42.5, 45.0],
            "longitude": list(longitudes),
        },
    )
