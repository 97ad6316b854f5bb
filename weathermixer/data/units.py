"""Units of the ERA5 / WeatherBench 2 variables the project knows, spelt as ERA5's files spell them: for
data sets (the synthetic one) and forecasts whose variables carry no `units` attribute of their own."""

from __future__ import annotations

KNOWN_UNITS = {
    "2m_temperature": "K",
    "10m_u_component_of_wind": "m s**-1",
    "10m_v_component_of_wind": "m s**-1",
    "10m_wind_speed": "m s**-1",
    "mean_sea_level_pressure": "Pa",
    "surface_pressure": "Pa",
    "total_column_water_vapour": "kg m**-2",
    "total_precipitation_6hr": "m",
    "sea_surface_temperature": "K",
    "toa_incident_solar_radiation": "J m**-2",
    "geopotential": "m**2 s**-2",
    "temperature": "K",
    "specific_humidity": "kg kg**-1",
    "u_component_of_wind": "m s**-1",
    "v_component_of_wind": "m s**-1",
    "wind_speed": "m s**-1",
    "vertical_velocity": "Pa s**-1",
    "geopotential_at_surface": "m**2 s**-2",
    "land_sea_mask": "1",
}


def with_units(name: str, attrs: dict) -> dict:
    """`attrs` with a `units` entry: its own where it has one, else the known units of `name` (none for
    a variable this table does not know)."""
    if attrs.get("units") or name not in KNOWN_UNITS:
        return dict(attrs)
    return {**attrs, "units": KNOWN_UNITS[name]}
