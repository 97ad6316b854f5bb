"""What a training run tells while it runs, built with what it needs:

    report = TrainReport(job, engine, device, rank, world, step0, global_batch, loss_scale, peak, latest)
    report.add_loss(step, loss)     # every micro step; the loss stays on the device
    report.step_done(flops)         # every optimizer step: the throughput window and the progress display
    report.log_step(step, result)   # collective, every log.every steps: loss, lr, throughput, memory, MFU
    report.final(v)                 # collective: the final line, the loss plot, memory.json

Losses are checked for finiteness at every report and before every validation and checkpoint
(`check_finite`); a non-finite one stops the run with TrainingFailed naming its step and rank(s).
Time spent validating and checkpointing is kept out of the throughput (`not_training`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .engine import current_memory_bytes, peak_memory_bytes
from .runlog import LossWatch, Progress, RunLog, write_memory_json


class TrainingFailed(RuntimeError):
    pass


@dataclass
class Result:
    losses: dict[int, float] = field(default_factory=dict)  # step -> global training loss
    val: dict = field(default_factory=dict)  # last validation
    start_step: int = 0
    exit_code: int = 0


class TrainReport:
    """`loss_scale` turns a rank's micro-batch losses into its share of the global loss (1 / (dp x
    accumulation)); `peak` is the chip's peak TFLOP/s per rank (None: no MFU column); `latest()` names
    the last good checkpoint (for the message of a non-finite loss)."""

    def __init__(
        self,
        job,
        engine,
        device: torch.device,
        rank: int,
        world: int,
        step0: int,
        global_batch: int,
        loss_scale: float,
        peak: float | None,
        latest: Callable[[], str],
        log=print,
    ):
        self.job, self.engine, self.device, self.rank, self.world, self.log = job, engine, device, rank, world, log
        self.global_batch, self.peak, self.latest = global_batch, peak, latest
        self.runlog = RunLog(job.log.dir, job.log.csv, monitor=engine.monitor, resume_step=step0) if rank == 0 else None
        self.progress = Progress(job.train.steps, step0, enabled=rank == 0, log=log)
        self.watch = LossWatch(device, rank, world, scale=loss_scale)  # the replicas' mean of micro-batch losses
        self.window = {"flops": 0, "samples": 0, "t": time.perf_counter()}

    def add_loss(self, step: int, loss: torch.Tensor) -> None:
        self.watch.add(step, loss)

    def step_done(self, flops_per_sample: int) -> None:
        self.window["flops"] += flops_per_sample * self.global_batch
        self.window["samples"] += self.global_batch
        self.progress.update(1)

    @contextmanager
    def not_training(self):
        """Time spent inside (validation, checkpoints) is not counted as training time."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.window["t"] += time.perf_counter() - t0

    def write(self, line: str) -> None:
        self.progress.write(line)

    def close(self) -> None:
        self.progress.close()

    def check_finite(self, result: Result) -> list[float]:
        """Collective: the global losses of the steps since the last check (into result.losses);
        raises TrainingFailed naming the first non-finite step and its rank(s)."""
        steps, losses, bad = self.watch.collect()
        if bad:
            first = min(bad.values())
            raise TrainingFailed(
                f"non-finite loss at step {first} on rank(s) {sorted(r for r, s in bad.items() if s == first)} "
                f"(found at step {max(steps)}; checked every log.every={self.job.log.every} steps and before "
                f"every validation and checkpoint); last good checkpoint: {self.latest()} (lower "
                f"weathermixer.train.lr, set gradient_clipping, or check the data)"
            )
        result.losses.update(zip(steps, losses, strict=True))
        return losses

    def log_step(self, step: int, result: Result) -> None:
        """Collective: a log row (loss, lr, throughput, peak memory, grad norm, MFU) every log.every steps."""
        losses = self.check_finite(result)
        w, world = self.window, self.world
        elapsed = time.perf_counter() - w["t"]
        mem = torch.zeros(2, world, dtype=torch.float64, device=self.device)  # peak, now
        mem[0, self.rank], mem[1, self.rank] = peak_memory_bytes(self.device), current_memory_bytes(self.device)
        dist.all_reduce(mem)
        peak, now = mem[0] / 2**30, mem[1] / 2**30
        rate, tflops = w["samples"] / elapsed, w["flops"] / elapsed / world / 1e12
        row = {
            "loss": sum(losses) / len(losses),
            "lr": self.engine.get_lr()[0],
            "samples_per_s": rate,
            "tflops_per_rank": tflops,
            "peak_mem_gb_max": peak.max().item(),
            "peak_mem_gb_min": peak.min().item(),
            "mem_gb_max": now.max().item(),
            "mem_gb_min": now.min().item(),
        }
        gn = self.engine.get_global_grad_norm()
        if gn is not None:
            row["grad_norm"] = float(gn)
        if self.peak:
            row["mfu"] = tflops / self.peak
        if self.rank == 0:
            self.runlog.log(step, "train", row, samples=self.engine.global_samples)
            self.progress.set_postfix(loss=f"{row['loss']:.4f}", samples_s=f"{rate:.1f}", tflops_rank=f"{tflops:.3g}")
            self.progress.write(
                f"step {step}/{self.job.train.steps} loss {row['loss']:.4f} lr {row['lr']:.2e} "
                f"samples/s {rate:.1f} TFLOP/s/rank {tflops:.3g} peak mem "
                f"{row['peak_mem_gb_max']:.2f} GB" + (f" MFU {row['mfu']:.1%}" if self.peak else "")
            )
        self.window = {"flops": 0, "samples": 0, "t": time.perf_counter()}

    def log_validation(self, step: int, v: dict, seconds: float, units: str) -> None:
        if self.rank != 0:
            return
        self.runlog.log(
            step,
            "val",
            {"val_loss": v["val_loss"], **{f"rmse_{key}": m for key, (m, _) in v["headline"].items()}},
            samples=self.engine.global_samples,
        )
        self.progress.write(
            f"validation at step {step} ({v['samples']} samples, {seconds:.1f} s): "
            f"loss {v['val_loss']:.4f}; RMSE in {units} (persistence): "
            + ", ".join(f"{key} {m:.4g} ({p:.4g})" for key, (m, p) in v["headline"].items())
        )

    def stopped_early(self, end: int) -> None:
        """train.stop_after ended the run before train.steps: say how to continue."""
        job = self.job
        if self.rank == 0:
            self.log(
                f"stopping after step {end} of {job.train.steps} (train.stop_after={job.train.stop_after}); "
                f"rerun the same command to continue from {self.latest()}"
            )
            self.runlog.close()

    def final(self, v: dict) -> bool:
        """Collective: the final validation line, the loss plot and memory.json (peak per rank).
        Returns whether the final RMSE is finite."""
        mem = torch.zeros(self.world, dtype=torch.float64, device=self.device)
        mem[self.rank] = peak_memory_bytes(self.device)
        dist.all_reduce(mem)
        if self.rank == 0:
            self.log(
                f"final: model_rmse={v['rmse_norm_lead1']:.4f} persistence_rmse={v['persistence_norm_lead1']:.4f} "
                f"ratio={v['rmse_norm_lead1'] / v['persistence_norm_lead1']:.3f}"
            )
            self.runlog.close()
            if self.job.log.plot and (png := self.runlog.plot()):
                self.log(f"loss curve: {png}")
            write_memory_json(self.job.log.dir, self.device, mem.tolist())
        return math.isfinite(v["rmse_norm_lead1"])
