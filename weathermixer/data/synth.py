"""A synthetic ERA5-like store in the WeatherBench 2 layout (dims time, level, latitude, longitude).

Dynamics come from weathermixer.data.synthetic.SyntheticWeather (advected smooth latent fields, diurnal
cycle, orography; a trained model beats persistence); each channel is then given a physical offset
and scale (temperature ~ 220-290 K, geopotential ~ 5.5e4 m^2/s^2 at 500 hPa, ...) so that
normalisation matters. Latitude is written ascending (-90 .. 90, as WB2's regridded stores) by
default; the reader returns rows north to south either way. Meant for small grids (the generator
keeps O(64 x channels x grid) floats for its own standardisation).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import xarray as xr

from ..config import ChannelsConfig, ModelConfig
from .synthetic import SyntheticWeather
from .units import with_units

SURFACE = {  # name -> (offset, scale)
    "2m_temperature": (288.0, 12.0),
    "10m_u_component_of_wind": (2.0, 5.0),
    "10m_v_component_of_wind": (0.0, 4.0),
    "mean_sea_level_pressure": (101325.0, 1200.0),
    "surface_pressure": (98000.0, 2000.0),
    "total_column_water_vapour": (25.0, 12.0),
}
DEFAULT_SURFACE = list(SURFACE)[:4]
DEFAULT_ATMOSPHERIC = ["geopotential", "temperature", "specific_humidity", "u_component_of_wind", "v_component_of_wind"]
G = 9.80665


def _height(p_hpa: float) -> float:
    """Standard-atmosphere height (m) of a pressure level."""
    return 44330.8 * (1.0 - (p_hpa / 1013.25) ** 0.190263)


def physical_scale(var: str, level: int | None) -> tuple[float, float]:
    """(offset, scale) turning a standardised synthetic channel into physical-ish units."""
    if level is None:
        return SURFACE.get(var, (0.0, 1.0))
    h = _height(level)
    return {
        "geopotential": (G * h, 0.05 * G * h + 100.0),
        "temperature": (max(288.15 - 0.0065 * h, 216.65), 8.0),
        "specific_humidity": (0.012 * (level / 1000.0) ** 3, 0.004 * (level / 1000.0) ** 3),
        "u_component_of_wind": (5.0 + 15.0 * (1.0 - level / 1000.0), 10.0),
        "v_component_of_wind": (0.0, 8.0),
        "vertical_velocity": (0.0, 0.2),
    }.get(var, (0.0, 1.0))


def _unit_range(a: np.ndarray) -> np.ndarray:
    """a scaled to [0, 1] (min-max)."""
    return (a - a.min()) / max(a.max() - a.min(), 1e-12)


def _encoding(ds: xr.Dataset, first: pd.Timestamp, level_chunk: int, lat_chunk: int) -> dict:
    """The store's chunks (time=1, level=level_chunk, latitude=lat_chunk, the rest whole) and time units;
    sets each variable's units attribute."""
    enc = {}
    for v in ds.data_vars:
        ds[v].attrs = with_units(v, ds[v].attrs)
        sizes = {"time": 1, "level": level_chunk, "latitude": lat_chunk}
        enc[v] = {"chunks": tuple(sizes.get(d, ds.sizes[d]) for d in ds[v].dims)}
    enc["time"] = {"units": f"hours since {first:%Y-%m-%d %H:%M:%S}", "dtype": "int64"}
    return enc


def write_synthetic(
    out: str,
    grid=(32, 64),
    start="2020-01-01",
    end="2020-03-01",
    step_hours: float = 6.0,
    variables: list[str] | None = None,
    levels: list[int] | None = None,
    lat_order: str = "ascending",
    seed: int = 0,
    noise: float = 0.05,
    level_chunk: int = 1,
    lat_chunk: int | None = None,
    time_block: int = 64,
) -> xr.Dataset:
    """Write the store; returns it opened lazily. Chunks: time=1, level=level_chunk, latitude=lat_chunk
    (default all), longitude=all. Static: land_sea_mask (0/1), geopotential_at_surface (m^2/s^2)."""
    variables = list(variables) if variables else DEFAULT_SURFACE + DEFAULT_ATMOSPHERIC
    levels = [int(x) for x in (levels or [500, 850])]
    surface = [v for v in variables if v in SURFACE]
    atmos = [v for v in variables if v not in SURFACE]
    times = pd.date_range(pd.Timestamp(start), pd.Timestamp(end), freq=pd.Timedelta(hours=step_hours))
    if len(times) < 2:
        raise ValueError(f"--start {start} .. --end {end} with step {step_hours:g} h gives {len(times)} time(s)")
    H, W = grid
    cfg = ModelConfig(
        grid=(H, W),
        patch=(1, 1),
        channels=ChannelsConfig(
            surface=surface, atmospheric=atmos, levels=levels if atmos else [], static=["land_sea_mask", "orography"]
        ),
    )
    sw = SyntheticWeather(cfg, seed=seed, noise=noise, step_hours=step_hours)
    scale = [physical_scale(v, None) for v in surface] + [physical_scale(v, lev) for v in atmos for lev in levels]
    off = np.array([s[0] for s in scale], dtype=np.float64)[:, None, None]
    mul = np.array([s[1] for s in scale], dtype=np.float64)[:, None, None]
    flip = lat_order == "ascending"
    lat = sw.lat.numpy().astype(np.float64)
    lat = lat[::-1] if flip else lat
    rows = (lambda a: a[..., ::-1, :]) if flip else (lambda a: a)
    st = sw.static(1)[0].numpy()  # standardised lsm, orography: min-max back to [0, 1] (exact: affine)
    coords = {"time": times[:0], "latitude": lat, "longitude": sw.lon.numpy().astype(np.float64)}
    if atmos:
        coords["level"] = np.array(levels, dtype=np.int64)
    lat_chunk = lat_chunk or H
    for b0 in range(0, len(times), time_block):
        tb = np.arange(b0, min(b0 + time_block, len(times)))
        x = sw.state(tb.tolist()).numpy().astype(np.float64) * mul[None] + off[None]  # (T, C, H, W)
        x = rows(x).astype(np.float32)
        data = {}
        for i, v in enumerate(surface):
            data[v] = (("time", "latitude", "longitude"), x[:, i])
        for j, v in enumerate(atmos):
            a = len(surface) + j * len(levels)
            data[v] = (("time", "level", "latitude", "longitude"), x[:, a : a + len(levels)])
        ds = xr.Dataset(data, coords=dict(coords, time=times[tb]))
        if b0 == 0:
            ds["land_sea_mask"] = (("latitude", "longitude"), rows(_unit_range(st[0])).astype(np.float32))
            ds["geopotential_at_surface"] = (
                ("latitude", "longitude"),
                rows(_unit_range(st[1]) * G * 3000.0).astype(np.float32),
            )
            ds.to_zarr(out, mode="w", consolidated=False, encoding=_encoding(ds, times[0], level_chunk, lat_chunk))
        else:
            ds.to_zarr(out, append_dim="time", consolidated=False)
    return xr.open_zarr(out, chunks=None, consolidated=False)
