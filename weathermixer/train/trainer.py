"""The training job: WeatherMixer on a DP x DOMAIN x TP mesh through a DeepSpeed engine.

    job, ds = load_train_job("deepspeed_configs/quickstart_cpu.json")
    ds = check_job(job, ds, world=4, cuda=False)       # no process group needed: fails early
    result = Trainer(job, ds).run()                     # collective: every rank of the world

Loss = latitude-weighted MSE with per-channel weights, averaged over the k leads of a rollout
(k drawn from 1..K per step from (seed, step): the same on every rank without communication).
Each rank computes its share on its block; the model group's shares add up to the replica's loss
and DeepSpeed averages over dp, so the loss and every gradient equal the single-process ones.
"""

from __future__ import annotations

import datetime
import functools
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from jigsaw_ext.accumulate import accumulation
from jigsaw_ext.layers import clear_gathered_weights
from jigsaw_ext.mlp import resolved_strategies

from ..config import TIME_FEATURES, ConfigError
from ..config.train import TrainJobConfig
from ..data.device import device_batches
from .checkpointing import CheckpointError, CheckpointManager, checkpoint_root, sampler_for
from .engine import (
    apply_tf32,
    chip_peak_tflops,
    lr_lambda,
    param_groups,
    register_list_parameters,
    release_free_memory,
    setup_host,
)
from .from_consolidated import load_consolidated
from .job import prepare_data, zero_stage
from .loss import channel_loss_weights, headline_channels, lead_weights, row_weights, weighted_loss_term
from .reporting import Result, TrainingFailed, TrainReport
from .run_record import job_info, rng_state, set_rng_state
from .speed import compile_blocks, kernels_line, step_context
from .validation import Validator


# ------------------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, job: TrainJobConfig, ds: dict, log=print):
        self.job, self.ds, self.log = job, ds, log

    # setup ----------------------------------------------------------------------------------------
    def _setup(self):
        self._setup_engine()
        self._setup_data()
        self.validator = self._make_validator()

    def _setup_engine(self):
        """Process group (unless one exists), mesh, model, DeepSpeed engine, checkpoint manager."""
        import deepspeed
        import deepspeed.ops

        from jigsaw_ext.mesh import init_mesh

        from ..model.mixer import WeatherMixer
        from .runfolder import open_run_folder

        job, tc = self.job, self.job.train
        cuda = torch.cuda.is_available()
        bound = setup_host(cuda, tc.bind_cores)  # before any thread of ours starts
        deepspeed.ops.__compatible_ops__ = {"deepspeed_shm_comm": False}  # skip a ~45 s CPU op build
        if not dist.is_initialized():
            deepspeed.init_distributed(
                dist_backend="nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=tc.dist_timeout_s)
            )
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        self.tf32 = apply_tf32(tc.tf32, cuda)  # fp32 GEMMs in TF32 (and the peak MFU is read against)
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        # before the mesh, the model, DeepSpeed and the data: the folders are writable, no other run
        # uses them (RUN.lock), and every rank knows its peers (to name the one that dies first)
        self.run_folder = open_run_folder(job, self.device, self.log)
        self.mesh = mesh = init_mesh(job.mesh)

        # the mixing MLPs choose how they meet their data for this micro-batch (mesh.strategy "auto")
        self.model = WeatherMixer(
            job.model, mesh, device=self.device, micro_batch=int(self.ds.get("train_micro_batch_size_per_gpu") or 1)
        )
        compiled = compile_blocks(self.model, tc.compile_backend) if tc.compile_blocks else 0
        if self.rank == 0:
            self.log(
                f"layer strategies on {mesh.config}: "
                + ", ".join(f"{k} {v}" for k, v in resolved_strategies(self.model).items())
                + (f"; each local rank bound to {len(bound)} core(s) (train.bind_cores)" if bound else "")
            )
            self.log(kernels_line(self.ds, compiled, tc.compile_backend))
        if job.checkpoint.init_from:
            from jigsaw_ext.checkpoint import CheckpointFormatError, load_into_model

            err = None
            try:
                load_into_model(self.model, job.checkpoint.init_from)
            except (CheckpointFormatError, ValueError) as e:
                err = e
            self._agree(err, f"loading weights from checkpoint.init_from={job.checkpoint.init_from}")
            if self.rank == 0:
                self.log(f"weights from {job.checkpoint.init_from} (fine-tuning: fresh optimizer and schedule)")
        if zero_stage(self.ds) == 3:
            register_list_parameters(self.model)
        groups = param_groups(self.model, tc.param_groups, tc.lr)
        names = {id(p): n for n, p in self.model.named_parameters()}
        self.group_names = [[names[id(p)] for p in g["params"]] for g in groups]
        if (self.ds.get("wandb") or {}).get("enabled"):  # its offline run files go with the run's outputs
            os.environ.setdefault("WANDB_DIR", str(Path(job.log.dir).resolve()))
            Path(os.environ["WANDB_DIR"]).mkdir(parents=True, exist_ok=True)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.model,
            model_parameters=groups,
            config=self.ds,
            mpu=mesh.mpu(),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tc)),
        )
        CheckpointManager.install_safe_loading(self.engine)  # DeepSpeed's files: weights_only + allowlist
        e = self.engine
        dp = mesh.sizes["dp"]
        self.micro, self.gas = e.train_micro_batch_size_per_gpu(), e.gradient_accumulation_steps()
        if e.dp_world_size != dp or e.train_batch_size() != self.micro * self.gas * dp:
            raise RuntimeError(
                f"DeepSpeed computed dp={e.dp_world_size}, train_batch_size={e.train_batch_size()} "
                f"but the mesh has dp={dp} (micro={self.micro}, accumulation={self.gas})"
            )
        self.dtype = torch.bfloat16 if e.bfloat16_enabled() else torch.float16 if e.fp16_enabled() else torch.float32
        self.ckpt = CheckpointManager(checkpoint_root(job), job.checkpoint.keep_last)
        self.flops_per_sample = {}

    def _setup_data(self):
        from ..data import Normalizer, ShardedSampleLoader

        job, tc, cfg, mesh = self.job, self.job.train, self.job.model, self.mesh
        # rank 0 may write the synthetic store; a failure there must stop every rank
        err = None
        try:
            self.data_cfg = prepare_data(job, self.rank, self.log)
            if (self.data_cfg.leads or 0) < job.rollout:
                self.data_cfg = self.data_cfg.model_copy(update={"leads": job.rollout})
        except (ConfigError, ValueError, OSError) as e:
            err = e
        self._agree(err, "preparing the data")
        try:
            self.train_data = ShardedSampleLoader(self.data_cfg, cfg, mesh, "train", batch=self.micro, seed=tc.seed)
            stats = None
            if self.data_cfg.stats and not self.data_cfg.fake:
                stats = Normalizer.load(self.data_cfg.stats).stats
            self.stats = stats
            weights = channel_loss_weights(cfg.channels, job.loss, stats)
        except (ValueError, OSError) as e:
            err = e
        self._agree(err, "opening the data")

        chans = self.train_data.chans
        self.w_lat, self.w_loss_lat = row_weights(
            self.train_data.lat.copy(), self.train_data.rows, self.job.loss.latitude_weights, self.device
        )
        self.w_chan = weights[chans].to(self.device)
        self.chans = chans
        names = cfg.channels.names
        self.headline = headline_channels(names, job.validation.variables)
        if stats:
            self.std = torch.tensor([stats["channels"][n]["std"] for n in names], dtype=torch.float64)
            self.std[self.std < 1e-12] = 1.0
            self.units = "physical units"
        else:
            self.std, self.units = torch.ones(len(names), dtype=torch.float64), "data units (no stats)"

    def load_consolidated(self, path) -> dict:
        """A layout-free checkpoint as the start of this run, on this mesh (see from_consolidated)."""
        return load_consolidated(path, self.engine, self.model, self.mesh, self.job, self.group_names, micro=self.micro)

    def _make_validator(self) -> Validator:
        return Validator(
            job=self.job,
            mesh=self.mesh,
            data_cfg=self.data_cfg,
            engine=self.engine,
            forecast=self.forecast,
            to_device=self.to_device,
            dtype=self.dtype,
            device=self.device,
            chans=self.chans,
            w_lat=self.w_lat,
            w_chan=self.w_chan,
            std=self.std,
            headline=self.headline,
            defaults_dir=self.ckpt.root,
            rank=self.rank,
            log=self.log,
        )

    def _agree(self, err: BaseException | None, what: str) -> None:
        """Collective: if any rank failed, every rank raises (no rank is left waiting)."""
        from jigsaw_ext.mesh import failed_ranks

        bad = failed_ranks(err, device=self.device)
        if err is not None:
            raise ConfigError(f"{what}: {err}") if isinstance(err, (ConfigError, ValueError)) else err
        if bad:
            raise TrainingFailed(f"rank {min(bad)} failed while {what} (its message is above)")

    def _job_info(self) -> dict:
        return job_info(
            self.job,
            self.ds,
            self.world,
            self.dtype,
            self.model,
            self.group_names,
            getattr(self, "stats", None),
            getattr(self, "data_cfg", None),
        )

    # helpers -------------------------------------------------------------------------------------
    def to_device(self, t, dtype=None):
        """On the device first (from data.pin_memory's pinned memory: an asynchronous copy), then cast."""
        if t is None:
            return None
        return t.to(self.device, non_blocking=True).to(dtype or t.dtype)

    def rollout_length(self, step: int) -> int:
        K = self.job.rollout_cap(step)  # the curriculum stage's K (train.curriculum), else the rollout
        if not self.job.train.random_rollout or K == 1:
            return K
        return int(np.random.default_rng([self.job.train.seed, 7919, step]).integers(1, K + 1))

    @property
    def time_static(self) -> bool:
        """Time features among this rank's static inputs: in an autoregressive rollout they follow each
        lead's valid time."""
        return any(n in TIME_FEATURES for n in self.train_data.static_names)

    def forecast(self, fields, static, k: int, times=None) -> list[torch.Tensor]:
        """k leads through the engine's forward (ZeRO-3 micro-step counting and prefetch, timers,
        profilers and autocast all hang off it): latent rollout or autoregressive in data space.
        Autoregressive with time features among the static inputs and the samples' start `times`
        given: one engine forward per step, the hour of day / day of year following each input's
        valid time as in the forecast (weathermixer.inference.rollout), not frozen at the start time."""
        ar = self.job.train.rollout_mode == "autoregressive"
        ckpt = self.job.train.checkpoint_rollout and torch.is_grad_enabled()
        if not (ar and k > 1 and static is not None and times is not None and self.time_static):
            return self.engine(fields, static, steps=k, every_lead=True, autoregressive=ar, checkpoint=ckpt)
        import pandas as pd

        from ..data.loader import static_at
        from ..model.mixer import next_window

        dt, x, leads = pd.Timedelta(hours=self.data_cfg.dt_hours), fields, []
        for j in range(k):
            s = static if j == 0 else static_at(static, self.train_data, [t + j * dt for t in times])
            leads.append(self.engine(x, s, steps=1, every_lead=True, checkpoint=ckpt)[0])
            x = next_window(x, leads[-1]) if self.job.model.history else leads[-1]
        return leads

    def micro_step_loss(self, sample, k: int) -> torch.Tensor:
        """This rank's share of the replica's loss on one micro batch, a weighted mean over the k leads
        (train.lead_weights, equal by default)."""
        f, s = self.to_device(sample.fields, self.dtype), self.to_device(sample.static, self.dtype)
        preds = self.forecast(f, s, k, getattr(sample, "times", None))
        count = self.micro * self.job.model.channels.n_fields * math.prod(self.job.model.grid)
        return sum(
            w * weighted_loss_term(p.float(), self.to_device(y), self.w_loss_lat, self.w_chan, count)
            for w, p, y in zip(lead_weights(self.job.train.lead_weights, k), preds, sample.targets[:k], strict=True)
        )

    def _flops(self, k: int) -> int:
        """Training FLOPs of one sample with k leads (forward + backward = 3 x forward matmuls)."""
        if k not in self.flops_per_sample:
            from ..model.mixer import flops_per_sample

            cfg = self.job.model
            fwd = (
                flops_per_sample(cfg, steps=k, all_leads=True)
                if self.job.train.rollout_mode == "latent"
                else k * flops_per_sample(cfg, steps=1)
            )
            self.flops_per_sample[k] = 3 * fwd
        return self.flops_per_sample[k]

    def _peak_tflops(self) -> float | None:
        if self.job.log.peak_tflops:
            return self.job.log.peak_tflops
        if self.device.type != "cuda":
            return None
        return chip_peak_tflops(torch.cuda.get_device_name(self.device), self.dtype, self.tf32)

    # the loop ------------------------------------------------------------------------------------
    def run(self) -> Result:
        """Set up, resume, then per step: train (forward/backward/step per micro batch), report
        (every log.every steps), validate and checkpoint when due; finish with the final report."""
        self._setup()
        result = Result(start_step=self._resume())
        self._open_outputs(result.start_step)
        end = (
            min(self.job.train.steps, result.start_step + self.job.train.stop_after)
            if self.job.train.stop_after
            else self.job.train.steps
        )
        self.engine.train()
        self.batches = device_batches(self.train_data, self.device, self.data_cfg.device_prefetch)
        try:
            for step in range(result.start_step + 1, end + 1):
                with step_context(self.job, step, result.start_step + 1, self.device, self.rank, self.log):
                    self._train_step(step)
                if step % self.job.log.every == 0 or step == end:
                    self.report.log_step(step, result)
                self._validate_and_save(step, end, result)
        except TrainingFailed as e:
            if self.rank == 0:
                self.log(f"train.py: {e}", file=sys.stderr)
            result.exit_code = 1
            self.run_folder.release()
            return result
        finally:
            self.report.close()
            self.train_data.stop()
        result = self._finish(end, result)
        self.run_folder.release()  # RUN.lock (rank 0): the outputs are complete
        return result

    # phases of the loop, in the order they run ------------------------------------------------------
    def _resume(self) -> int:
        """Load the checkpoint checkpoint.resume names (a layout-free tag, or a consolidated one converted
        from the DeepSpeed 0.19 per-rank format) on this run's mesh; returns the step it was written at
        (0: fresh start)."""
        job, rank = self.job, self.rank
        self.best = math.inf
        err, where = None, None
        try:
            where = self.ckpt.resolve(job.checkpoint.resume)
        except CheckpointError as e:
            err = e
        self._agree(err, "finding the checkpoint to resume from")
        if not where:
            return 0
        if where[1] is None:  # a consolidated (layout-free) checkpoint: any mesh, any ZeRO stage
            try:
                self.ckpt.verify(where[0])  # collective: every file against index.json's checksums
                got = self.load_consolidated(where[0])
            except (CheckpointError, ValueError) as e:
                err = e
            self._agree(err, f"loading consolidated checkpoint {where[0]}")
            self.best = got["best"]
            self.train_data.load_state_dict({"sampler": got["sampler"], "split": "train"})
            if rank == 0:
                self.log(f"starting from consolidated checkpoint {where[0]} (step {got['step']}) on mesh {job.mesh}")
            return got["step"]
        root, tag = where  # a layout-free tag: any mesh, ZeRO stage and dp
        info = self._job_info()
        expect = {"mesh": info["mesh"], "model": info["model"], "param_groups": self.group_names}
        try:
            client, mine, saved = self.ckpt.load(self.engine, root, tag, expect)
            sampler = sampler_for(mine["loader"], self.micro, self.mesh.sizes["dp"], root / tag)
        except CheckpointError as e:
            err = e
        self._agree(err, f"loading checkpoint {root / tag}")
        self.best = float(client.get("best", math.inf))
        self.train_data.load_state_dict({"sampler": sampler, "split": "train"})
        if mine["rng"] is not None:  # RNG states are per rank: restored on the mesh that wrote them
            set_rng_state(mine["rng"])
        if rank == 0:
            m = saved.get("mesh") or {}
            self.log(
                f"resuming from {root / tag} (step {client['step']}) on mesh {job.mesh} "
                f"ZeRO-{zero_stage(self.ds)}; written on {m.get('dp')}x{m.get('domain')}x{m.get('tp')} "
                f"ZeRO-{saved.get('zero_stage')}"
            )
        return int(client["step"])

    def _open_outputs(self, step0: int) -> None:
        """The start line, then the run's report (metrics.csv, DeepSpeed's monitors, the progress display)."""
        from ..model.mixer import num_parameters

        job, tc, mesh = self.job, self.job.train, self.mesh
        dp, micro, gas = mesh.sizes["dp"], self.micro, self.gas
        self.global_batch = micro * gas * dp
        if self.rank == 0:
            self.log(
                f"mesh {job.mesh} on {self.world} process(es); model {num_parameters(job.model):,} parameters "
                f"(this rank {self.model.local_num_parameters():,}); global batch {self.global_batch} "
                f"(micro {micro} x accumulation {gas} x dp {dp}); ZeRO-{zero_stage(self.ds)}; "
                f"{str(self.dtype).replace('torch.', '')}; steps {step0 + 1}..{tc.steps}; rollout k in "
                f"1..{job.rollout} ({tc.rollout_mode}); lr {tc.lr:g}; output {job.log.dir}"
            )
        self.report = TrainReport(
            job,
            self.engine,
            self.device,
            self.rank,
            self.world,
            step0,
            self.global_batch,
            loss_scale=1.0 / (dp * gas),
            peak=self._peak_tflops(),
            latest=functools.partial(self.ckpt.describe, "latest"),
            log=self.log,
        )

    def _train_step(self, step: int) -> None:
        """One optimizer step: `gas` micro batches through engine forward/backward/step. The loss
        stays on the device (no host round trip per micro step); LossWatch checks it at reports.
        mesh.reduce_gradients_once: the forwards of all but the last defer their model-axis gradient
        reductions to the last (jigsaw_ext.accumulate; accumulators emptied on leaving, even on error)."""
        k = self.rollout_length(step)
        with accumulation(self.model, self.gas, self.mesh.reduce_gradients_once, self.engine) as defer:
            for i in range(self.gas):
                with defer(i):
                    loss = self.micro_step_loss(next(self.batches), k)
                self.report.add_loss(step, loss)
                self.engine.backward(loss)
                self.engine.step()
        clear_gathered_weights(self.model)  # mesh.keep_gathered_weights: the next step gathers the new blocks
        self.report.step_done(self._flops(k))

    def _validate_and_save(self, step: int, end: int, result: Result) -> None:
        """Validation when due, then a checkpoint when due (latest/best pointers). A state with a
        non-finite loss is never validated or saved. Not counted as training time."""
        job = self.job
        last = step == job.train.steps
        validate = self.validator.should_validate(step)
        ck = job.checkpoint
        save = (ck.every and step % ck.every == 0) or (last and ck.at_end) or (step == end and not last)
        if not (validate or save):
            return
        with self.report.not_training():
            self.report.check_finite(result)
            pointers = []
            if validate:
                result.val = v = self._validate_and_log(step)
                if v["val_loss"] < self.best:
                    self.best = v["val_loss"]
                    if ck.best:
                        pointers.append("best")
            if save:
                pointers.append("latest")
            if pointers:
                if "latest" not in pointers and self.ckpt.pointer("latest") is None:
                    pointers.append("latest")
                self._save(step, self.best, pointers)
            release_free_memory()

    def _validate_and_log(self, step: int) -> dict:
        t0 = time.perf_counter()
        v = self.validator.validate()
        v["reencode"] = self.validator.choose_reencode_every(step)  # the forecast's default, beside the checkpoints
        self.report.log_validation(step, v, time.perf_counter() - t0, self.units)
        return v

    def _finish(self, end: int, result: Result) -> Result:
        """Stopped early (stop_after): say how to continue. Else the final validation line, the loss
        plot and memory.json (peak per rank)."""
        if end < self.job.train.steps:
            self.report.stopped_early(end)
            return result
        if not result.val:  # resumed at the last step already: nothing to train, report the model
            result.val = self.validator.validate()
        if not self.report.final(result.val):
            result.exit_code = 1
        return result

    def _save(self, step: int, best: float, pointers: list[str]) -> None:
        t0 = time.perf_counter()
        client = {"step": step, "best": best}
        mine = {"loader": self.batches.state_dict(), "rng": rng_state(), "step": step}
        try:  # collective; a failed write (a full disk) is agreed on by every rank
            path = self.ckpt.save(self.engine, step, client, mine, self._job_info(), pointers=pointers)
        except CheckpointError as err:  # the previous checkpoint is kept: stop, saying so
            raise TrainingFailed(str(err)) from None
        if self.rank == 0:
            self.report.write(f"checkpoint {path} ({', '.join(pointers)}) in {time.perf_counter() - t0:.1f} s")
