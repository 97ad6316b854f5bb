"""The two reference forecasts every model is scored beside, on the same inits, leads and grid:

    persistence   forecast(t, L) = truth(t)
    climatology   forecast(t, L) = clim(day of year and hour of t + L)

and the climatology's period: the training years only (given, or by default the truth times before
the first init), with a flag when it overlaps the evaluated times. The climatology itself is built
by weathermixer.evaluation.metrics.build_climatology.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import xarray as xr

from . import metrics as M
from .metrics import LAT, LON, TIME, EvaluationError
from .plan import Plan, truth_var


@dataclass(frozen=True)
class ClimatologyPeriod:
    """The training period the climatology is built from."""

    start: pd.Timestamp
    end: pd.Timestamp
    default: bool  # True: not given, the truth times before the first init
    overlaps_evaluation: bool  # it reaches into the evaluated inits or valid times


def climatology_period(truth_times: pd.DatetimeIndex, plan: Plan, start=None, end=None) -> ClimatologyPeriod:
    """[start, end]; both None: the truth times before the first init; one None: the truth's first or last time."""
    default = start is None and end is None
    if default:
        before = truth_times[truth_times < plan.inits.min()]
        if not len(before):
            raise EvaluationError(f"no truth time before the first init {plan.inits.min()} for the climatology: "
                                  f"give the training years with --climatology-years START END")
        start, end = before[0], before[-1]
    start = pd.Timestamp(start) if start is not None else truth_times[0]
    end = pd.Timestamp(end) if end is not None else truth_times[-1]
    if end < start:
        raise EvaluationError(f"climatology period ends ({end}) before it starts ({start})")
    overlap = bool(start <= plan.valid_times.max() and end >= plan.inits.min())
    return ClimatologyPeriod(start, end, default, overlap)


def variable_climatology(tr: xr.Dataset, plan: Plan, var: str, period: ClimatologyPeriod, window_days: int,
                         fallback: str) -> M.Climatology:
    """The climatology of one variable at the plan's levels, for the plan's valid times only."""
    clim_truth = truth_var(tr, var, plan.levels[var])
    return M.build_climatology(clim_truth, period.start, period.end, window_days, for_times=plan.valid_times,
                               fallback=fallback)


def persistence_forecast(truth_at_inits: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """truth(t) at every lead: (init, ...) -> `shape` = (init, lead, ...), a read-only view."""
    return np.broadcast_to(truth_at_inits[:, None], shape)


def climatology_forecast(clim: M.Climatology, valid: np.ndarray, lev_dims: tuple[str, ...],
                         shape: tuple[int, ...]) -> np.ndarray:
    """clim at the valid times `valid` (init, lead) -> `shape` = (init, lead, [level], latitude, longitude)."""
    return clim.at(valid.ravel()).transpose(TIME, *lev_dims, LAT, LON).values.reshape(shape)
