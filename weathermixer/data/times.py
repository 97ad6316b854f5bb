"""Time stamps in messages: the first few of a list, then how many in all."""

from __future__ import annotations

import pandas as pd


def describe_times(times, first: int = 3) -> str:
    times = list(times)
    more = f" ... ({len(times)} in all)" if len(times) > first else ""
    return ", ".join(f"{pd.Timestamp(t):%Y-%m-%dT%H:%M}" for t in times[:first]) + more
