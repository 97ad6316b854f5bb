"""The one typed configuration schema. Defaults live here; every key is validated on load and an
error names the key and what is allowed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from jigsaw_ext.mesh import MeshConfig

# static input names the data pipeline computes and the model reads (one copy for both packages)
COMPUTED_STATIC = (
    "cos_latitude",
    "sin_latitude",
    "cos_longitude",
    "sin_longitude",
    "sin_hour_of_day",
    "cos_hour_of_day",
    "sin_day_of_year",
    "cos_day_of_year",
)
TIME_FEATURES = COMPUTED_STATIC[4:]
# Per-pixel mean daily cycle of a predicted channel over the statistics' period (`weathermixer.data
# stats` fits x = mean + cos1 cos(w h) + sin1 sin(w h) + cos2 cos(2 w h) + sin2 sin(2 w h) per pixel,
# h = UTC hour, w = 2 pi / 24 h): static input daily_cycle_<term>_<channel>, e.g.
# daily_cycle_mean_2m_temperature, normalised by the channel's mean and std (terms other than mean by
# the std only). Computed from the stats file, not read from the data set.
DAILY_CYCLE_TERMS = ("mean", "cos1", "sin1", "cos2", "sin2")
DAILY_CYCLE_PREFIX = "daily_cycle_"


class ConfigError(ValueError):
    pass


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ChannelsConfig(_Strict):
    """Model channels: surface variables + atmospheric variables x pressure levels (predicted),
    plus static fields (inputs only)."""

    surface: list[str] = Field(
        default_factory=lambda: [
            "2m_temperature",
            "10m_u_component_of_wind",
            "10m_v_component_of_wind",
            "mean_sea_level_pressure",
        ]
    )
    atmospheric: list[str] = Field(default_factory=lambda: ["geopotential", "temperature"])
    levels: list[int] = Field(default_factory=lambda: [500, 850])
    static: list[str] = Field(default_factory=lambda: ["land_sea_mask", "orography"])

    @property
    def names(self) -> list[str]:
        return list(self.surface) + [f"{v}_{lev}" for v in self.atmospheric for lev in self.levels]

    @property
    def n_fields(self) -> int:
        return len(self.surface) + len(self.atmospheric) * len(self.levels)

    @property
    def n_static(self) -> int:
        return len(self.static)

    @model_validator(mode="after")
    def _check(self):
        if self.n_fields == 0:
            raise ValueError("no predicted channels: set channels.surface and/or channels.atmospheric")
        if self.atmospheric and not self.levels:
            raise ValueError("channels.atmospheric is set but channels.levels is empty")
        return self


class ModelConfig(_Strict):
    grid: tuple[int, int] = Field((32, 64), description="(latitude rows, longitude columns)")
    channels: ChannelsConfig = Field(default_factory=ChannelsConfig)
    patch: tuple[int, int] = Field((1, 8), description="(rows, columns); (1, p) = the paper's longitude strips")
    pad_to_patch: bool = Field(False, description="zero-pad the grid to a multiple of the patch (cropped on output)")
    hidden: int = Field(64, ge=1, description="token embedding size D")
    token_fraction: float = Field(0.5, gt=0, description="token-mixing hidden size / number of tokens")
    channel_fraction: float = Field(1.0, gt=0, description="channel-mixing hidden size / D")
    hidden_multiple: int = Field(
        1,
        ge=1,
        description="round the token- and channel-mixing hidden sizes up to "
        "a multiple of this (128: every shard a multiple of 8 on "
        "up to 16 ranks; bf16 GEMMs with a dimension that is not "
        "run at about a third of the speed on H100/H200)",
    )
    blocks: int = Field(2, ge=1, description="mixer blocks N_b")
    rollout: int = Field(1, ge=1, description="latent rollout steps k: the block stack is applied k times")
    history: int = Field(
        0,
        ge=0,
        description="previous states t-dt .. t-history*dt embedded beside the state "
        "at t (the loader serves them: data.history follows it)",
    )
    head: Literal["tendency", "blend"] = "tendency"
    pixel_skip: int = Field(
        0,
        ge=0,
        description="leads 1..pixel_skip get a per-pixel linear skip head (the state "
        "the tendency is added to: a learned per-grid-point linear "
        "function of x(t), the history states, the static time "
        "features and 1; weathermixer.model.skip); 0 = off. A latent "
        "rollout past it must re-encode",
    )
    pixel_skip_inputs: Literal["all", "states", "anchor", "changes"] = Field(
        "all",
        description="the skip head's features: the input states, the static time features and 1 (all); the "
        "input states only (states); or anchor: x(t - dt), x(t), the state one day before the "
        "valid time, the channel's per-pixel daily-cycle climatology at the valid hour "
        "(daily_cycle_* static inputs), the static time features and 1 (persistence, the "
        "daily-cycle climatology, same-hour-yesterday and the regression baseline are special "
        "cases; needs model.pixel_skip_day; the yesterday state only when model.history >= "
        "pixel_skip_day - 1); or changes: the anchor without the level, y = x(t) + w . (x(t - dt) "
        "- x(t), yesterday - x(t), clim(t + l dt) - clim(t), time features), no constant: a "
        "uniform shift of the inputs shifts the forecast by the same (persistence, yesterday "
        "and the daily-cycle change are special cases; nothing reverts to the training level)",
    )
    pixel_skip_day: int = Field(
        0,
        ge=0,
        description="model steps in one day (24 / data.dt_hours) for "
        "pixel_skip_inputs anchor/changes: the yesterday state's lag "
        "(read when model.history >= pixel_skip_day - 1; then pixel_skip "
        "<= pixel_skip_day) and the valid-hour phase of lead l "
        "(2 pi l / pixel_skip_day past the start hour)",
    )
    pixel_skip_scale: float = Field(
        1.0,
        gt=0,
        description="the skip coefficients are this times their stored "
        "parameter (their per-step change is scale x lr; 1 "
        "chosen on the UK validation days over 10 and 0.1)",
    )
    pixel_skip_init: str | None = Field(
        None,
        description="initial skip coefficients: an .npz written by `python -m "
        "weathermixer.model.skip_fit` (the per-pixel least-squares "
        "fit on the training split); None: zero (the plain "
        "tendency head)",
    )
    pixel_skip_zero_start: bool = Field(
        False,
        description="with pixel_skip_init: the network's output layer (the "
        "decoder) starts at zero, so the model starts as the "
        "fitted head and the network learns a residual from 0",
    )
    seed: int = 0

    @model_validator(mode="after")
    def _check(self):
        (h, w), (ph, pw) = self.grid, self.patch
        if min(h, w) < 1 or min(ph, pw) < 1:
            raise ValueError(f"model.grid {self.grid} and model.patch {self.patch} must be positive")
        if ph > h or pw > w:
            raise ValueError(f"model.patch {self.patch} is larger than model.grid {self.grid}")
        if self.pixel_skip_zero_start and not (self.pixel_skip and self.pixel_skip_init and self.head == "tendency"):
            raise ValueError(
                "model.pixel_skip_zero_start starts the model as its fitted skip head: it needs "
                "model.pixel_skip > 0, model.pixel_skip_init and model.head='tendency'"
            )
        if self.pixel_skip and self.pixel_skip_inputs in ("anchor", "changes"):
            day, what = self.pixel_skip_day, f"model.pixel_skip_inputs={self.pixel_skip_inputs}"
            if day < 1:
                raise ValueError(f"{what} needs model.pixel_skip_day (model steps in a day: 24 / data.dt_hours)")
            if self.history < 1:
                raise ValueError(f"{what} reads x(t - dt): it needs model.history >= 1")
            if self.history >= day - 1 and self.pixel_skip > day:
                raise ValueError(
                    f"{what} with model.history >= pixel_skip_day - 1 reads the state one day before "
                    f"each valid time among the inputs: it needs model.pixel_skip <= "
                    f"model.pixel_skip_day = {day} (got {self.pixel_skip})"
                )
            if not {"sin_hour_of_day", "cos_hour_of_day"} <= set(self.channels.static):
                raise ValueError(
                    f"{what} evaluates the daily-cycle climatology at the valid hour from the start "
                    f"hour: add sin_hour_of_day and cos_hour_of_day to model.channels.static"
                )
        if not self.pad_to_patch and (h % ph or w % pw):
            raise ValueError(
                f"model.patch {self.patch} does not tile model.grid {self.grid} "
                f"({h} % {ph} = {h % ph}, {w} % {pw} = {w % pw}): choose a patch whose sides divide "
                f"the grid, or set model.pad_to_patch=true to zero-pad (the padding is cropped on output)"
            )
        return self


class JobConfig(_Strict):
    """The project section of a job's JSON file (the DeepSpeed settings sit beside it)."""

    mesh: MeshConfig = Field(default_factory=MeshConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)


def _describe(err: ValidationError, cls: type[BaseModel], source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            parent = cls
            for p in e["loc"][:-1]:
                field = parent.model_fields.get(str(p))
                ann = field.annotation if field else None
                parent = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
                if parent is None:
                    break
            allowed = sorted(parent.model_fields) if parent else []
            msg = f"unknown key; allowed keys here: {', '.join(allowed)}"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def parse(cls: type[BaseModel], data: dict, source: str = "config"):
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_describe(err, cls, source)) from None


def parse_value(text: str) -> Any:
    """A --set value: JSON where it parses (numbers, booleans, lists, objects), else the text itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # a bare string, e.g. a path


def apply_setting(root: dict, dotted: str, value: Any, where: str) -> None:
    """root[a][b][c] = value for dotted = "a.b.c" (missing objects are created)."""
    keys = dotted.split(".")
    node = root
    for i, key in enumerate(keys[:-1]):
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{where}: {'.'.join(keys[: i + 1])} is not an object; cannot set {dotted}")
    node[keys[-1]] = value


def job_file_presets() -> dict[str, Path]:
    """Preset name -> job file shipped with the package (`deepspeed_configs/*.json` of the repository,
    installed as the package data `weathermixer/job_files/*.json`; in a checkout or an editable install
    `weathermixer/job_files` is a symlink to `../deepspeed_configs`, so there is one copy of each file)."""
    from importlib.resources import files

    folder = files("weathermixer").joinpath("job_files")
    if not folder.is_dir():
        return {}
    return {
        e.name[: -len(".json")]: Path(str(e))  # a file-system install: str() is the file's path
        for e in sorted(folder.iterdir(), key=lambda e: e.name)
        if e.name.endswith(".json")
    }


def resolve_job_file(path: str | Path) -> Path:
    """A job file path as given, or, for a bare name (no '/', no '.json') that is not an existing
    file, the packaged job file of that name: `--deepspeed_config quickstart_cpu` works from any folder."""
    text = str(path)
    if Path(text).exists() or "/" in text or "\\" in text or text.endswith(".json"):
        return Path(path)
    presets = job_file_presets()
    if text not in presets:
        raise ConfigError(
            f"{text!r} is neither a file nor a packaged job file; presets: "
            f"{', '.join(presets) or '(none installed)'} (or give a path to a .json file)"
        )
    return presets[text]


def read_job_file(path: str | Path) -> dict:
    """The JSON object of a job file (a path, or a preset name: see resolve_job_file), with errors
    that name the file."""
    path = resolve_job_file(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level")
    return data


def load_job(path: str | Path) -> JobConfig:
    """Read the project section ("weathermixer") of a JSON job file."""
    section = read_job_file(path).get("weathermixer", {})
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: 'weathermixer' must be an object")
    # the mesh and model sections only: a training job file's other sections are the trainer's
    return parse(JobConfig, {k: v for k, v in section.items() if k in ("mesh", "model")}, str(path))
