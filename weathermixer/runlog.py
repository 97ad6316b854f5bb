"""Metrics of a training run (rank 0): CSV, TensorBoard and a loss-curve plot.

metrics.csv has one row per logged step (kind=train) or validation (kind=val); columns are the
union of the keys seen, in first-seen order. On resume the rows after the resumed step are dropped,
so a run that crashed after its last checkpoint does not leave duplicated steps behind.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path


class RunLog:
    def __init__(self, out_dir: str | Path, csv_on: bool = True, tensorboard: bool = True, resume_step: int = 0):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.dir / "metrics.csv" if csv_on else None
        self.rows: list[dict] = []
        if self.csv_path and self.csv_path.exists() and resume_step > 0:
            with open(self.csv_path, newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        self._write_all()
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)

    def _columns(self) -> list[str]:
        cols: list[str] = []
        for r in self.rows:
            cols += [k for k in r if k not in cols]
        return cols

    def _write_all(self) -> None:
        if not self.csv_path:
            return
        tmp = self.csv_path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self._columns() or ["step", "kind"])
            w.writeheader()
            w.writerows(self.rows)
        tmp.replace(self.csv_path)

    def log(self, step: int, kind: str, values: dict) -> None:
        row = {"step": step, "kind": kind, **values}
        new_cols = any(k not in (self.rows[0] if self.rows else {}) for k in row)
        self.rows.append(row)
        if self.csv_path:
            if new_cols or len(self.rows) == 1:
                self._write_all()
            else:
                with open(self.csv_path, "a", newline="") as f:
                    csv.DictWriter(f, fieldnames=self._columns()).writerow(row)
        if self.tb:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb:
            self.tb.close()

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
        ax.plot(*zip(*train), label="train loss (mean over logged steps)")
        if val:
            ax.plot(*zip(*val), "o-", label="validation loss")
        ax.set_yscale("log")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("latitude-weighted MSE (normalised units)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return path
