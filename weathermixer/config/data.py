"""The data section of a job: where the gridded data set lives, how its names map to the model's
channels, which times form train/val/test, and how samples are built.

    "data": {"source": "gridded", "path": "era5.zarr",
             "variables": {"2m_temperature": "t2m"}, "dims": {"latitude": "lat"},
             "splits": {"train": ["2020-01-01", "2020-02-15"], "val": ["2020-02-16", "2020-03-01"]},
             "dt_hours": 6, "stats": "stats.json"}

Model channel names (`model.channels`) are the keys of `variables`; a channel or static field that is
not listed is looked up under its own name. Static channels named in COMPUTED_STATIC are computed,
not read (cos/sin of latitude and longitude, sin/cos of the hour of day and the day of the year), and so
are daily_cycle_<term>_<channel> (a predicted channel's per-pixel mean daily cycle, from the stats file).
"""

from __future__ import annotations

from typing import Literal

import pandas as pd
from pydantic import Field, field_validator, model_validator

from . import COMPUTED_STATIC, DAILY_CYCLE_PREFIX, DAILY_CYCLE_TERMS, JobConfig, _Strict


def daily_cycle_static(name: str) -> tuple[str, str] | None:
    """(term, channel) of a daily_cycle_<term>_<channel> static name, else None."""
    if not name.startswith(DAILY_CYCLE_PREFIX):
        return None
    term, sep, channel = name[len(DAILY_CYCLE_PREFIX) :].partition("_")
    return (term, channel) if sep and term in DAILY_CYCLE_TERMS and channel else None


def is_computed_static(name: str) -> bool:
    """A static channel the loader computes (coordinates, time features, daily cycle) instead of reading."""
    return name in COMPUTED_STATIC or daily_cycle_static(name) is not None


WB2_ALIASES = {"orography": "geopotential_at_surface"}


class DimsConfig(_Strict):
    """Names of the data set's dimensions (and of their coordinate variables)."""

    time: str = "time"
    level: str = "level"
    latitude: str = "latitude"
    longitude: str = "longitude"


class DataConfig(_Strict):
    source: Literal["gridded"] = "gridded"
    path: str = Field(
        "",
        description="local path or fsspec URL (gs://, s3:// need gcsfs/s3fs) of a zarr store, or a netCDF file (*.nc)",
    )
    format: Literal["auto", "zarr", "netcdf", "grib"] = Field(
        "auto",
        description="auto: netcdf if path ends in .nc, grib if .grib/.grb/.grib2 (needs the [grib] extra: "
        "cfgrib, eccodes), else zarr",
    )
    time_units: str | None = Field(
        None,
        description="units of an integer time coordinate, e.g. 'hours since 1940-01-01' (CF form); null "
        "= the coordinate's or the data set's 'units'/'time_units' attribute",
    )
    variables: dict[str, str] = Field(
        default_factory=dict,
        description="model channel/static name (without level) -> the data set's variable name; "
        "unlisted names map to themselves, except orography -> geopotential_at_surface (WB2)",
    )
    levels: dict[int, float] = Field(
        default_factory=dict,
        description="model level -> value of the data set's level coordinate (default: the same number)",
    )
    dims: DimsConfig = Field(default_factory=DimsConfig)
    splits: dict[Literal["train", "val", "test"], tuple[str, str]] = Field(
        default_factory=dict,
        description="split -> [first, last] start time of a sample (inclusive, "
        "anything pandas.Timestamp parses); a missing split = all times",
    )
    dt_hours: float = Field(6.0, gt=0, description="model time step; a multiple of the data's step")
    step_hours: float | None = Field(
        None, gt=0, description="expected step of the data's time axis (null = read from the data)"
    )
    leads: int | None = Field(None, ge=1, description="targets t+dt .. t+leads*dt (null = model.rollout)")
    history: int = Field(0, ge=0, description="extra input steps t-dt .. t-history*dt")
    stats: str | None = Field(
        None, description="stats.json of `python -m weathermixer.data stats`; null = raw values (no normalisation)"
    )
    nonfinite: Literal["error", "zero"] = Field(
        "error",
        description="NaN/inf in a sample: error naming variable/time/location, or set to 0 "
        "after normalisation (the mean)",
    )
    nonfinite_every: int = Field(
        1000,
        ge=1,
        description="with nonfinite='zero': samples between warnings that sum up the values set to "
        "0 (each channel's first occurrence is warned at once)",
    )
    prefetch: int = Field(2, ge=0, description="batches loaded ahead in a background thread (0 = inline)")
    pin_memory: bool | None = Field(
        None,
        description="copy each batch into page-locked host memory as it is loaded (in the prefetch "
        "thread), so its copy to the GPU runs asynchronously at full bandwidth instead of "
        "synchronously from pageable memory; null = on when CUDA is available; true needs CUDA",
    )
    device_prefetch: bool | None = Field(
        None,
        description="copy each training batch to the GPU one step ahead on a side CUDA stream, so the copy "
        "overlaps the step before it (weathermixer.data.device); null = on when training on "
        "a GPU; true needs CUDA",
    )
    fake: bool = Field(False, description="no I/O: the same random tensors every step (loader benchmarks)")

    @field_validator("splits")
    @classmethod
    def _dates(cls, v):
        for name, (a, b) in v.items():
            try:
                ta, tb = pd.Timestamp(a), pd.Timestamp(b)
            except ValueError as err:
                raise ValueError(f"data.splits.{name}: cannot parse date: {err}") from None
            if tb < ta:
                raise ValueError(f"data.splits.{name}: end {b} is before start {a}")
        return v

    @model_validator(mode="after")
    def _check(self):
        if not self.fake and not self.path:
            raise ValueError("data.path is empty: set the data set's path/URL, or data.fake=true")
        if self.step_hours is not None and not _is_multiple(self.dt_hours, self.step_hours):
            raise ValueError(
                f"data.dt_hours={self.dt_hours:g} is not a multiple of data.step_hours={self.step_hours:g}"
            )
        return self

    def variable(self, name: str) -> str:
        return self.variables.get(name, WB2_ALIASES.get(name, name))

    def level(self, level: int) -> float:
        return self.levels.get(level, level)

    def resolved_format(self) -> str:
        if self.format != "auto":
            return self.format
        path = self.path.rstrip("/").lower()
        if path.endswith((".grib", ".grb", ".grib2", ".grb2")):
            return "grib"
        return "netcdf" if path.endswith((".nc", ".nc4", ".netcdf")) else "zarr"


def _is_multiple(a: float, b: float) -> bool:
    r = a / b
    return abs(r - round(r)) < 1e-6 and round(r) >= 1


class DataJobConfig(JobConfig):
    """mesh + model + data: what the data CLI reads from a job file's "weathermixer" section."""

    data: DataConfig


def load_data_job(path, settings: list[str] | None = None, data_path: str | None = None) -> DataJobConfig:
    """The mesh, model and data sections of a JSON job file (other sections, e.g. train, ignored), with
    settings ["KEY=VALUE", ...] (JSON values, as train.py's --set) and then data_path (data.path) applied."""
    from . import ConfigError, apply_setting, parse, parse_value, read_job_file

    section = read_job_file(path).get("weathermixer", {})
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: 'weathermixer' must be an object")
    for item in settings or []:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. data.path=era5.zarr or model.history=1")
        apply_setting(section, key, parse_value(text), "--set")
    if data_path:
        apply_setting(section, "data.path", data_path, "--data")
    if "data" not in section:
        raise ConfigError(f"{path}: weathermixer.data is missing (the data set's path, mapping, splits)")
    keep = {k: v for k, v in section.items() if k in ("mesh", "model", "data")}
    return parse(DataJobConfig, keep, str(path))
