"""What a training run reports: one row per logged step or validation, written to metrics.csv
(human-readable) and handed to DeepSpeed's monitor (its tensorboard / csv_monitor / wandb sections
of the job file), a loss-curve plot, the progress display, and the device-side loss watch.

metrics.csv has one row per logged step (kind=train) or validation (kind=val); columns are the
union of the keys seen, in first-seen order. On resume the rows after the resumed step are dropped,
so a run that crashed after its last checkpoint does not leave duplicated steps behind. The monitor
receives the same rows as scalars named "<kind>/<key>" (train/loss, val/rmse_z500@6h, ...) against
the number of training samples seen, the axis of DeepSpeed's own Train/Samples/* events.

metrics.csv is never cut short: a row is appended with one write and an fsync, and if that fails
(a full disk) the file is truncated back to its previous complete rows; a rewrite (new columns, a
resume) goes to a temporary file renamed over it. A failed write is reported once; the rows stay in
memory and the whole file is rewritten at the next row the disk takes. (Appending costs ~1 ms with
the fsync; rewriting a 10,000-row file ~200 ms, which is why rows are appended.)
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist


class RunLog:
    def __init__(self, out_dir: str | Path, csv_on: bool = True, monitor=None, resume_step: int = 0, warn=None):
        """monitor: anything with write_events([(name, value, step), ...]), e.g. engine.monitor.
        warn: where a failed metrics.csv write is reported (default: stderr)."""
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.dir / "metrics.csv" if csv_on else None
        self.warn = warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr, flush=True))
        self.behind = False  # rows in memory that metrics.csv lacks (a write failed)
        self.rows: list[dict] = []
        if self.csv_path and self.csv_path.exists() and resume_step > 0:
            with open(self.csv_path, newline="", encoding="utf-8") as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        self._write_csv(rewrite=True)
        self.monitor = monitor if getattr(monitor, "enabled", True) else None

    def _columns(self) -> list[str]:
        cols: list[str] = []
        for r in self.rows:
            cols += [k for k in r if k not in cols]
        return cols

    def _write_all(self) -> None:
        """The whole file through a temporary file renamed over it (the old file stays on failure)."""
        tmp = self.csv_path.with_suffix(".csv.tmp")
        try:
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                w = csv.DictWriter(f, fieldnames=self._columns() or ["step", "kind"])
                w.writeheader()
                w.writerows(self.rows)
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(self.csv_path)
        finally:
            tmp.unlink(missing_ok=True)

    def _append(self, row: dict) -> None:
        """One row, appended and fsynced; on failure the file is cut back to its previous rows."""
        buf = io.StringIO()
        csv.DictWriter(buf, fieldnames=self._columns()).writerow(row)
        data = memoryview(buf.getvalue().encode("utf-8"))
        with open(self.csv_path, "ab", buffering=0) as f:
            size = f.seek(0, os.SEEK_END)
            try:
                while data:
                    data = data[f.write(data) :]
                os.fsync(f.fileno())
            except OSError:
                f.truncate(size)
                raise

    def _write_csv(self, rewrite: bool) -> None:
        if not self.csv_path:
            return
        try:
            if rewrite or self.behind:
                self._write_all()
            else:
                self._append(self.rows[-1])
        except OSError as err:
            if not self.behind:
                self.warn(
                    f"{self.csv_path}: writing the row of step {self.rows[-1]['step'] if self.rows else '-'} "
                    f"failed ({err.strerror or err}); the file keeps its previous complete rows, the new "
                    f"ones are kept in memory and written when the disk takes them"
                )
            self.behind = True
            return
        if self.behind:
            self.warn(f"{self.csv_path}: written again, {len(self.rows)} rows")
        self.behind = False

    def log(self, step: int, kind: str, values: dict, samples: int | None = None) -> None:
        """One row. The monitor's x axis is `samples` (training samples seen, DeepSpeed's own axis
        for its Train/Samples/* events; wandb needs one monotonic axis), else the step."""
        row = {"step": step, "kind": kind, **values}
        new_cols = any(k not in (self.rows[0] if self.rows else {}) for k in row)
        self.rows.append(row)
        self._write_csv(rewrite=new_cols or len(self.rows) == 1)
        if self.monitor:
            x = step if samples is None else samples
            self.monitor.write_events(
                [
                    (f"{kind}/{k}", float(v), x)
                    for k, v in values.items()
                    if isinstance(v, (int, float)) and math.isfinite(v)
                ]
            )

    def close(self) -> None:
        for name in ("tb_monitor", "wandb_monitor"):  # DeepSpeed's MonitorMaster members
            sub = getattr(self.monitor, name, None)
            if name == "tb_monitor" and getattr(sub, "summary_writer", None) is not None:
                sub.summary_writer.flush()

    def plot(self, path: str | Path | None = None) -> Path | None:
        """Training loss (log scale) with the validation loss, if any, against the step."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        train = [(int(r["step"]), float(r["loss"])) for r in self.rows if r["kind"] == "train" and r.get("loss")]
        val = [(int(r["step"]), float(r["val_loss"])) for r in self.rows if r["kind"] == "val" and r.get("val_loss")]
        if not train:
            return None
        path = Path(path or self.dir / "loss.png")
        fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
        ax.plot(*zip(*train, strict=True), label="train loss (mean over logged steps)")
        if val:
            ax.plot(*zip(*val, strict=True), "o-", label="validation loss")
        ax.set_yscale("log")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("latitude-weighted MSE (normalised units)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return path


class Progress:
    """A tqdm bar on a terminal; in a batch-job log file (not a terminal) no carriage-return
    redraws, only the plain periodic lines that write() is given."""

    def __init__(self, total: int, initial: int, enabled: bool, log=print, stream=None):
        from tqdm import tqdm

        stream = stream or sys.stdout
        self.log = log
        self.bar = tqdm(
            total=total,
            initial=initial,
            desc="train",
            dynamic_ncols=True,
            mininterval=1.0,
            file=stream,
            disable=not (enabled and stream.isatty()),
        )
        self.enabled = enabled

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def set_postfix(self, **kw) -> None:
        self.bar.set_postfix(refresh=False, **kw)

    def write(self, line: str) -> None:
        if not self.enabled:
            return
        if self.bar.disable:
            self.log(line)
        else:
            self.bar.write(line)

    def close(self) -> None:
        self.bar.close()


class LossWatch:
    """The training loss without a host round trip per micro step: each micro step's loss is added
    on the device and the first non-finite step is recorded on the device; collect() (a collective)
    returns the global loss of every step since the last call and which ranks went non-finite, in
    one all-reduce."""

    def __init__(self, device, rank: int, world: int, scale: float):
        self.device, self.rank, self.world, self.scale = device, rank, world, scale
        self.first_bad = torch.zeros((), dtype=torch.float64, device=device)
        self.steps: list[int] = []
        self.sums: list[torch.Tensor] = []

    def add(self, step: int, loss: torch.Tensor) -> None:
        loss = loss.detach().double()
        if not self.steps or self.steps[-1] != step:
            self.steps.append(step)
            self.sums.append(torch.zeros((), dtype=torch.float64, device=self.device))
        self.sums[-1] += loss * self.scale
        bad = ~torch.isfinite(loss) & (self.first_bad == 0)
        self.first_bad = torch.where(bad, torch.full_like(self.first_bad, step), self.first_bad)

    def collect(self) -> tuple[list[int], list[float], dict[int, int]]:
        n = len(self.sums)
        buf = torch.zeros(n + self.world, dtype=torch.float64, device=self.device)
        if n:
            buf[:n] = torch.stack(self.sums)
        buf[n + self.rank] = self.first_bad
        dist.all_reduce(buf)
        values = buf.tolist()
        bad = {r: int(s) for r, s in enumerate(values[n:]) if s > 0}
        steps = self.steps
        self.steps, self.sums = [], []
        return steps, values[:n], bad


def write_memory_json(log_dir, device: torch.device, peaks: list) -> None:
    """<log.dir>/memory.json: the peak memory of every rank at the end of a run."""
    from jigsaw_ext.files import atomic_write_text

    atomic_write_text(
        Path(log_dir, "memory.json"),
        json.dumps(
            {
                "device": str(device),
                "peak_bytes_per_rank": peaks,
                "measure": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "max RSS",
            },
            indent=1,
        ),
    )
