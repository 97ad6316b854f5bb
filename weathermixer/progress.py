"""Progress of a long command (forecast, evaluate): tqdm's bar on a terminal; in a log file or a pipe
(not a terminal) a plain line per tenth of the work instead of carriage-return redraws."""

from __future__ import annotations

import sys
import time


class PlainProgress:
    """`desc: done/total unit(s) (elapsed s)` on its own line at each tenth of `total` and at the end."""

    def __init__(self, total: int, desc: str, unit: str, stream):
        self.total, self.desc, self.unit, self.stream = max(int(total), 0), desc, unit, stream
        self.done, self.next_line, self.t0 = 0, 0, time.perf_counter()
        self._advance()

    def _advance(self) -> None:
        while self.next_line <= self.done and self.next_line < self.total:
            self.next_line += max(1, -(-self.total // 10))

    def update(self, n: int = 1) -> None:
        self.done = min(self.total, self.done + n)
        if self.done >= self.next_line or self.done == self.total:
            self.stream.write(
                f"{self.desc}: {self.done}/{self.total} {self.unit}(s) ({time.perf_counter() - self.t0:.0f} s)\n"
            )
            self.stream.flush()
            self._advance()
            if self.done == self.total:
                self.next_line = self.total + 1  # the last line once

    def close(self) -> None:
        pass


def progress(total: int, desc: str, unit: str, enabled: bool = True, stream=None):
    """An object with update(n) and close(): tqdm on a terminal, PlainProgress otherwise; nothing
    shown when not `enabled`."""
    from tqdm import tqdm

    stream = stream or sys.stderr
    if enabled and not stream.isatty():
        return PlainProgress(total, desc, unit, stream)
    return tqdm(
        total=total, desc=desc, unit=unit, disable=not enabled, file=stream, dynamic_ncols=True, mininterval=1.0
    )
