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
import fnmatch
import json
import math
import os
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .checkpointing import CheckpointError, CheckpointManager, rng_state, set_rng_state
from ..config import ConfigError
from .runlog import LossWatch, Progress, RunLog
from .loss import channel_loss_weights, headline_channels, latitude_weights, per_channel_sse, weighted_loss_term
from .config import TrainJobConfig

# dense peak TFLOP/s per GPU for MFU (bf16/fp16 tensor cores; fp32 runs report no MFU unless
# log.peak_tflops is set)
PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "V100": 125.0}


# ------------------------------------------------------------------------------------------------
# checks that need no process group
def resolve_batch(ds: dict, dp: int) -> tuple[int, int]:
    """(micro batch per model replica, gradient accumulation steps) from DeepSpeed's three batch
    keys, with the same rule DeepSpeed applies (train_batch = micro * accumulation * dp)."""
    tb = ds.get("train_batch_size")
    micro = ds.get("train_micro_batch_size_per_gpu")
    gas = ds.get("gradient_accumulation_steps")
    for key, v in (("train_batch_size", tb), ("train_micro_batch_size_per_gpu", micro),
                   ("gradient_accumulation_steps", gas)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ConfigError(f"{key}: must be a positive integer, got {v!r}")
    if micro is None and tb is None:
        raise ConfigError("set train_micro_batch_size_per_gpu (samples per model replica per micro step) "
                          "or train_batch_size in the DeepSpeed config")
    if micro is None:
        gas = gas or 1
        micro, rem = divmod(tb, gas * dp)
        if rem or micro == 0:
            raise ConfigError(f"train_batch_size={tb} is not a positive multiple of gradient_accumulation_steps={gas} "
                              f"x dp={dp}")
    gas = gas or (tb // (micro * dp) if tb is not None else 1)
    if tb is not None and tb != micro * gas * dp:
        raise ConfigError(
            f"train_batch_size={tb} != train_micro_batch_size_per_gpu={micro} x gradient_accumulation_steps={gas} "
            f"x dp={dp} (mesh.dp; one micro batch per model replica, shared by its domain x tp ranks): "
            f"remove train_batch_size or make it {micro * gas * dp}")
    return micro, gas


def zero_stage(ds: dict) -> int:
    return int((ds.get("zero_optimization") or {}).get("stage", 0))


def check_job(job: TrainJobConfig, ds: dict, world: int, cuda: bool) -> dict:
    """Validate the job against the launch and return the DeepSpeed config to hand to initialize()."""
    from jigsaw_ext.mesh import Mesh, validate_world
    from ..model.geometry import Geometry

    try:
        validate_world(job.mesh, world)
        Geometry(job.model, Mesh.virtual(job.mesh))
        channel_loss_weights(job.model.channels, job.loss.model_copy(update={"tendency": False}))
        headline_channels(job.model.channels.names, job.validation.variables)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if job.train.rollout_mode == "autoregressive" and job.model.rollout != 1:
        raise ConfigError(f"train.rollout_mode=autoregressive feeds each decoded lead back in; set model.rollout=1 "
                          f"(it is {job.model.rollout})")
    data = job.data
    if data.source == "gridded" and not data.fake and "://" not in data.path and not Path(data.path).exists():
        raise ConfigError(f"data.path: {data.path} does not exist")
    if data.source == "gridded" and data.stats and not data.fake and not Path(data.stats).exists():
        raise ConfigError(f"data.stats: {data.stats} does not exist (python -m weathermixer.data stats ...)")
    dp = job.mesh.dp
    micro, gas = resolve_batch(ds, dp)
    opt = dict(ds.get("optimizer") or {"type": "AdamW"})
    if opt.get("type", "").lower() not in ("adamw", "adam"):
        raise ConfigError(f"optimizer.type: {opt.get('type')!r} not supported; allowed: AdamW, Adam")
    if "scheduler" in ds:
        raise ConfigError("scheduler: remove it; the schedule is weathermixer.train.warmup/min_lr_ratio (linear "
                          "warm-up + cosine decay)")
    params = dict(opt.get("params") or {})
    if "lr" in params:
        raise ConfigError("optimizer.params.lr: set weathermixer.train.lr instead (one source for the "
                          "learning rate and its schedule)")
    params["lr"] = job.train.lr
    if not cuda:
        params.setdefault("torch_adam", True)  # else DeepSpeed JIT-compiles fused Adam (~90 s on CPU)
    opt["params"] = params
    out = dict(ds, optimizer=opt, train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=gas,
               train_batch_size=micro * gas * dp)
    out.setdefault("steps_per_print", 10 ** 9)
    out.update(monitor_sections(job, out))
    zero = zero_stage(out)
    if zero not in (0, 1, 2, 3):
        raise ConfigError(f"zero_optimization.stage: {zero}; allowed: 0, 1, 2, 3")
    fp16 = (out.get("fp16") or {}).get("enabled", False)
    bf16 = (out.get("bf16") or {}).get("enabled", False)
    if fp16 and bf16:
        raise ConfigError("fp16.enabled and bf16.enabled are both true: choose one")
    if fp16 and not cuda:
        raise ConfigError("fp16.enabled: fp16 needs a GPU (DeepSpeed refuses it on CPU); use bf16 on CPU")
    zo = out.get("zero_optimization") or {}
    if zero == 3:
        if job.mesh.replicate_weights_over:
            raise ConfigError("zero_optimization.stage=3 with mesh.replicate_weights_over: ZeRO-3 partitions "
                              "the parameters over dp, replicated weights would be gathered twice; use stage "
                              "1/2 or an empty replicate_weights_over")
        for key in ("offload_param", "offload_optimizer"):
            if (zo.get(key) or {}).get("device", "none") not in ("none", None):
                raise ConfigError(f"zero_optimization.{key}: offloading is not supported with block-sharded "
                                  f"parameters yet; remove it")
    if zero in (1, 2) and (zo.get("offload_optimizer") or {}).get("device", "none") not in ("none", None) \
            and not cuda:
        raise ConfigError("zero_optimization.offload_optimizer: offloading is for GPU runs")
    return out


MONITORS = {"tensorboard": "tensorboard", "wandb": "wandb", "csv_monitor": None}


def monitor_sections(job: TrainJobConfig, ds: dict) -> dict:
    """DeepSpeed's monitor sections, completed: log.tensorboard=true (or auto, with tensorboard
    installed) is shorthand for an enabled `tensorboard` section (an explicit section in the job
    file wins); output paths default to
    log.dir; wandb runs are written under log.dir (WANDB_MODE=offline works without network)."""
    import importlib.util

    out, tb = {}, job.log.tensorboard
    if tb == "auto":
        tb = importlib.util.find_spec("tensorboard") is not None
    for key, package in MONITORS.items():
        sec = dict(ds.get(key) or ({"enabled": True} if key == "tensorboard" and tb else {}))
        if not sec.get("enabled"):
            continue
        if package:
            if importlib.util.find_spec(package) is None:
                raise ConfigError(f"{key}.enabled" + (" (log.tensorboard)" if key == "tensorboard" else "")
                                  + f": the {package} package is not installed; pip install "
                                    f"'jigsaw-weathermixer[monitor]' or disable it")
        if key == "wandb":
            os.environ.setdefault("WANDB_DIR", str(Path(job.log.dir).resolve()))
            Path(os.environ["WANDB_DIR"]).mkdir(parents=True, exist_ok=True)
        else:
            if not sec.get("output_path"):
                sec["output_path"] = str(job.log.dir)
            sec.setdefault("job_name", key)
        out[key] = sec
    return out


# ------------------------------------------------------------------------------------------------
def lr_lambda(cfg):
    """Linear warm-up to 1, then cosine decay to min_lr_ratio at the last step."""
    def f(step: int) -> float:  # step = optimizer steps taken so far
        if step < cfg.warmup:
            return (step + 1) / (cfg.warmup + 1)
        progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def param_groups(model: torch.nn.Module, rules, lr: float) -> list[dict]:
    """AdamW groups by name: the first rule a parameter matches decides its lr scale and weight decay.
    Group membership depends on names only, so it is the same on every rank."""
    groups = [{"params": [], "names": [], "name": f"rule{i}:{'|'.join(r.match)}", "lr": lr * r.lr_scale,
               **({"weight_decay": r.weight_decay} if r.weight_decay is not None else {})}
              for i, r in enumerate(rules)]
    default = {"params": [], "names": [], "name": "default", "lr": lr}
    for name, p in model.named_parameters():
        for g, r in zip(groups, rules):
            if any(fnmatch.fnmatchcase(name, pat) for pat in r.match):
                break
        else:
            g = default
        g["params"].append(p)
        g["names"].append(name)
    return [{k: v for k, v in g.items() if k != "names"} for g in [default] + groups if g["params"]]


def register_list_parameters(model: torch.nn.Module) -> None:
    """ZeRO-3 gathers a module's own parameters around its forward; the layers keep theirs in
    ParameterLists (a submodule whose forward never runs), so hand them to the owning layer."""
    from deepspeed.runtime.zero import register_external_parameter

    for module in model.modules():
        for child in module.children():
            if isinstance(child, torch.nn.ParameterList):
                for p in child:
                    register_external_parameter(module, p)


def set_threads() -> None:
    if "OMP_NUM_THREADS" in os.environ:
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, cores // local))


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # resident set, Linux: KiB


def prepare_data(job: TrainJobConfig, rank: int):
    """The gridded data config to read. For the embedded synthetic default, rank 0 writes the store
    and its statistics once (into a temporary name, renamed when complete, so an interrupted run
    never leaves a half-written store behind) while the other ranks wait."""
    if job.data.source != "synthetic":
        return job.data
    syn = job.data
    data_cfg = syn.gridded(job.model, job.rollout)
    store = syn.store_path(job.model)
    if rank == 0 and not (store.exists() and Path(data_cfg.stats).exists()):
        from ..data import GriddedDataset, compute_stats
        from ..data.synth import write_synthetic

        ch = job.model.channels
        print(f"writing the synthetic ERA5-like store {store} (once)", flush=True)
        tmp = store.with_name(store.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        store.parent.mkdir(parents=True, exist_ok=True)
        write_synthetic(str(tmp), job.model.grid, syn.start, syn.end, syn.dt_hours,
                        list(ch.surface) + list(ch.atmospheric), list(ch.levels) or None, seed=syn.seed,
                        noise=syn.noise)
        shutil.rmtree(store, ignore_errors=True)
        tmp.rename(store)
        train = data_cfg.splits["train"]
        stats = compute_stats(GriddedDataset(data_cfg.model_copy(update={"stats": None}), ch, job.model.grid),
                              *train)
        Path(data_cfg.stats + ".partial").write_text(json.dumps(stats, indent=1))
        Path(data_cfg.stats + ".partial").rename(data_cfg.stats)
    return data_cfg


class TrainingFailed(RuntimeError):
    pass


@dataclass
class Result:
    losses: dict[int, float] = field(default_factory=dict)  # step -> global training loss
    val: dict = field(default_factory=dict)                 # last validation
    start_step: int = 0
    exit_code: int = 0


# ------------------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, job: TrainJobConfig, ds: dict, log=print):
        self.job, self.ds, self.log = job, ds, log

    # setup ----------------------------------------------------------------------------------------
    def _setup(self):
        self._setup_engine()
        self._setup_data()

    def _setup_engine(self):
        """Process group (unless one exists), mesh, model, DeepSpeed engine, checkpoint manager."""
        import deepspeed
        import deepspeed.ops

        from jigsaw_ext.mesh import init_mesh
        from ..model.mixer import WeatherMixer

        job, tc = self.job, self.job.train
        cuda = torch.cuda.is_available()
        set_threads()
        deepspeed.ops.__compatible_ops__ = {"deepspeed_shm_comm": False}  # skip a ~45 s CPU op build
        if not dist.is_initialized():
            deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo",
                                       timeout=datetime.timedelta(seconds=tc.dist_timeout_s))
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.mesh = mesh = init_mesh(job.mesh)

        self.model = WeatherMixer(job.model, mesh, device=self.device)
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
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.model, model_parameters=groups, config=self.ds, mpu=mesh.mpu(),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tc)))
        CheckpointManager.install_safe_loading(self.engine)  # DeepSpeed's files: weights_only + allowlist
        e = self.engine
        dp = mesh.sizes["dp"]
        self.micro, self.gas = e.train_micro_batch_size_per_gpu(), e.gradient_accumulation_steps()
        if e.dp_world_size != dp or e.train_batch_size() != self.micro * self.gas * dp:
            raise RuntimeError(f"DeepSpeed computed dp={e.dp_world_size}, train_batch_size={e.train_batch_size()} "
                               f"but the mesh has dp={dp} (micro={self.micro}, accumulation={self.gas})")
        self.dtype = torch.bfloat16 if e.bfloat16_enabled() else torch.float16 if e.fp16_enabled() else torch.float32
        ck_root = Path(job.checkpoint.dir or Path(job.log.dir) / "checkpoints")
        self.ckpt = CheckpointManager(ck_root, job.checkpoint.keep_last)
        self.flops_per_sample = {}

    def _setup_data(self):
        from ..data import Normalizer, ShardedSampleLoader

        job, tc, cfg, mesh = self.job, self.job.train, self.job.model, self.mesh
        # rank 0 may write the synthetic store; a failure there must stop every rank
        err = None
        try:
            self.data_cfg = prepare_data(job, self.rank)
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
        self.w_lat = latitude_weights(torch.as_tensor(self.train_data.lat.copy()))[self.train_data.rows].to(self.device)
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

    # a layout-free (consolidated) checkpoint as the start of this run, on this mesh -----------------
    def load_consolidated(self, path) -> dict:
        """Weights, AdamW moments and step, schedule position and engine counters from a consolidated
        checkpoint into this engine (any mesh, any ZeRO stage). Returns {"step", "best", "sampler"}
        where sampler is the data-loader state for this mesh."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        from jigsaw_ext.checkpoint import KINDS, CheckpointFormatError, Consolidated

        try:
            c = Consolidated(path)
        except CheckpointFormatError as err:
            raise CheckpointError(str(err)) from None
        idx = c.index
        mine, theirs = self.job.model.model_dump(mode="json"), idx["job"]["model"]
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if diff:
            raise CheckpointError(f"{c.dir}: written for another model (model.{diff[0]}: checkpoint "
                                  f"{theirs.get(diff[0])!r}, this run {mine.get(diff[0])!r})")
        want = [[n for n in g["names"]] for g in idx["optimizer"]["groups"]]
        if want != self.group_names:
            raise CheckpointError(f"{c.dir}: optimizer groups {[len(g) for g in want]} differ from this run's "
                                  f"{[len(g) for g in self.group_names]} (train.param_groups changed?)")
        e, coords, step = self.engine, self.mesh.coords, int(idx["optimizer"]["step"])
        base = getattr(e.optimizer, "optimizer", e.optimizer)
        if isinstance(base, torch.optim.Optimizer):  # make sure the moments exist before they are set
            # ZeRO-3 puts its flat fp32 partitions into the torch groups only around each step
            flats = getattr(e.optimizer, "fp32_partitioned_groups_flat", None)
            for q in flats if flats is not None else [q for g in base.param_groups for q in g["params"]]:
                st = base.state[q]
                st.setdefault("step", torch.tensor(0.0))
                for k in KINDS[1:]:
                    if k not in st:
                        st[k] = torch.zeros_like(q)
            if hasattr(e.optimizer, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2, bf16: link the moments
                e.optimizer._hp_optimizer_states_linked = False
                e.optimizer._lazy_init_hp_params_optimizer_state()
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                try:  # only this rank's block is read from each file
                    block = {k: c.block(name, k, p.block_layout, coords).contiguous() for k in KINDS}
                except CheckpointFormatError as err:
                    raise CheckpointError(str(err)) from None
                if hasattr(p, "ds_id"):  # ZeRO-3: this rank's partition of the flattened block
                    flat = block["param"].flatten().to(p.ds_tensor.dtype)
                    pn, d = p.ds_tensor.numel(), self.mesh.coords["dp"]
                    part = flat[d * pn:(d + 1) * pn]
                    p.ds_tensor.zero_()
                    p.ds_tensor[:part.numel()].copy_(part)
                else:
                    p.copy_(block["param"].to(p.dtype))
                if e.optimizer is base:  # ZeRO-0 fp32: the torch optimizer holds the parameter itself
                    base.state[p] = {"step": torch.tensor(float(step)), **{k: block[k].clone() for k in KINDS[1:]}}
                elif hasattr(p, "ds_id") or getattr(p, "_hp_mapping", None) is not None:
                    safe_set_full_fp32_param(p, block["param"])
                    for k in KINDS[1:]:
                        safe_set_full_optimizer_state(p, block[k], k)
                # else: ZeRO-1/2 and no part of p in this dp rank's partition (another rank sets it)
        if isinstance(base, torch.optim.Optimizer):
            for st in base.state.values():
                if "step" in st:
                    st["step"] = torch.tensor(float(step)) if torch.is_tensor(st["step"]) else step
        sched = idx.get("lr_scheduler")
        if sched and e.lr_scheduler is not None:
            e.lr_scheduler.load_state_dict(dict(sched, lr_lambdas=[None] * len(sched.get("base_lrs", []))))
            for g, lr in zip(e.optimizer.param_groups, e.lr_scheduler.get_last_lr()):
                g["lr"] = lr
        eng = idx.get("engine") or {}
        e.global_steps = int(eng.get("global_steps") or idx["step"])
        e.global_samples = int(eng.get("global_samples") or 0)
        e.skipped_steps = int(eng.get("skipped_steps") or 0)
        ld, dp = idx["loader"], self.mesh.sizes["dp"]
        per_step = self.micro * dp
        if ld["samples_in_epoch"] % per_step:
            raise CheckpointError(f"{c.dir}: the data position ({ld['samples_in_epoch']} samples into epoch "
                                  f"{ld['epoch']}) is not a whole number of this run's global micro batches "
                                  f"({self.micro} x dp {dp}); keep the global batch size")
        sampler = {"epoch": ld["epoch"], "step": ld["samples_in_epoch"] // per_step, "seed": ld["seed"],
                   "n": ld["n"], "batch": self.micro, "dp": dp, "shuffle": ld["shuffle"]}
        return {"step": int(idx["step"]), "best": idx.get("best") if idx.get("best") is not None else math.inf,
                "sampler": sampler}

    def _agree(self, err: BaseException | None, what: str) -> None:
        """Collective: if any rank failed, every rank raises (no rank is left waiting)."""
        from jigsaw_ext.mesh import failed_ranks

        bad = failed_ranks(err, device=self.device)
        if err is not None:
            raise ConfigError(f"{what}: {err}") if isinstance(err, (ConfigError, ValueError)) else err
        if bad:
            raise TrainingFailed(f"rank {min(bad)} failed while {what} (its message is above)")

    def _job_info(self) -> dict:
        """What a checkpoint records besides DeepSpeed's files: enough to read it on any mesh
        (every parameter's block layout, the optimizer's groups by name) without the model code, and
        to forecast from it without the training config or stats file: the normalisation statistics
        the run trained with, the gridded data config it read (variables, levels and dims mapping,
        dt), package versions and the git commit."""
        from .checkpointing import provenance

        data_cfg = getattr(self, "data_cfg", None)
        return {"mesh": self.job.mesh.model_dump(mode="json"), "model": self.job.model.model_dump(mode="json"),
                "zero_stage": zero_stage(self.ds), "world_size": self.world,
                "dtype": str(self.dtype).replace("torch.", ""),
                "weathermixer": self.job.model_dump(mode="json"), "deepspeed": self.ds,
                "layouts": {n: p.block_layout.to_json() for n, p in self.model.named_parameters()},
                "param_groups": self.group_names,
                "stats": getattr(self, "stats", None),
                "data": None if data_cfg is None or data_cfg.fake else data_cfg.model_dump(mode="json"),
                "provenance": provenance()}

    # helpers -------------------------------------------------------------------------------------
    def _to(self, t, dtype=None):
        if t is None:
            return None
        return t.to(self.device, dtype=dtype or t.dtype, non_blocking=True)

    def rollout_length(self, step: int) -> int:
        K = self.job.rollout
        if not self.job.train.random_rollout or K == 1:
            return K
        return int(np.random.default_rng([self.job.train.seed, 7919, step]).integers(1, K + 1))

    def forecast(self, fields, static, k: int) -> list[torch.Tensor]:
        """k leads through the engine's forward (ZeRO-3 micro-step counting and prefetch, timers,
        profilers and autocast all hang off it): latent rollout or autoregressive in data space."""
        return self.engine(fields, static, steps=k, every_lead=True,
                           autoregressive=self.job.train.rollout_mode == "autoregressive")

    def micro_step_loss(self, sample, k: int) -> torch.Tensor:
        """This rank's share of the replica's loss on one micro batch, averaged over the k leads."""
        f, s = self._to(sample.fields, self.dtype), self._to(sample.static, self.dtype)
        preds = self.forecast(f, s, k)
        count = self.micro * self.job.model.channels.n_fields * math.prod(self.job.model.grid)
        return sum(weighted_loss_term(p.float(), self._to(y), self.w_lat, self.w_chan, count)
                   for p, y in zip(preds, sample.targets[:k])) / k

    def _flops(self, k: int) -> int:
        """Training FLOPs of one sample with k leads (forward + backward = 3 x forward matmuls)."""
        if k not in self.flops_per_sample:
            from ..model.mixer import flops_per_sample

            cfg = self.job.model
            fwd = (flops_per_sample(cfg, steps=k, all_leads=True) if self.job.train.rollout_mode == "latent"
                   else k * flops_per_sample(cfg, steps=1))
            self.flops_per_sample[k] = 3 * fwd
        return self.flops_per_sample[k]

    def _peak_tflops(self) -> float | None:
        if self.job.log.peak_tflops:
            return self.job.log.peak_tflops
        if self.device.type != "cuda" or self.dtype == torch.float32:
            return None
        name = torch.cuda.get_device_name(self.device)
        return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)

    # validation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> dict:
        """Latitude-weighted RMSE per channel and lead on held-out samples (model and persistence),
        summed over the whole world; loss with the training weights."""
        from ..data import ShardedSampleLoader

        job, mesh, K = self.job, self.mesh, self.job.rollout
        C = self.job.model.channels.n_fields
        H, W = self.job.model.grid
        self.engine.eval()
        quota = math.ceil(job.validation.samples / mesh.size("dp"))  # samples per dp replica
        if not hasattr(self, "val_data"):
            self.val_data = ShardedSampleLoader(self.data_cfg, job.model, mesh, "val",
                                                batch=min(job.validation.batch, quota), seed=job.train.seed,
                                                shuffle=False, infinite=False)
        sse = torch.zeros(2, K, C, dtype=torch.float64, device=self.device)  # model/persistence, lead, channel
        loss = torch.zeros(2, dtype=torch.float64, device=self.device)       # weighted sum, samples
        seen = 0
        self.val_data.sampler.epoch, self.val_data.sampler.step = 0, 0
        for sample in self.val_data:
            if seen >= quota:
                break
            n = len(sample.times)
            seen += n
            f, s = self._to(sample.fields, self.dtype), self._to(sample.static, self.dtype)
            preds = self.forecast(f, s, K)
            x0 = self._to(sample.fields)
            for lead, (p, y) in enumerate(zip(preds, sample.targets)):
                y = self._to(y)
                sse[0, lead, self.chans] += per_channel_sse(p.float(), y, self.w_lat)
                sse[1, lead, self.chans] += per_channel_sse(x0, y, self.w_lat)
                loss[0] += weighted_loss_term(p.float().double(), y.double(), self.w_lat, self.w_chan, 1)
            loss[1] += n / mesh.size("model")  # every rank of the model group counts its samples
        self.val_data.stop()
        dist.all_reduce(sse)
        dist.all_reduce(loss)
        self.engine.train()
        n = loss[1].item()
        mse = (sse / (n * H * W)).cpu()
        rmse_norm = mse.sqrt()
        phys = rmse_norm * self.std.view(1, 1, -1)
        out = {"samples": int(round(n)), "val_loss": loss[0].item() / (n * C * H * W * K),
               "rmse_norm_lead1": mse[0, 0].mean().sqrt().item(),
               "persistence_norm_lead1": mse[1, 0].mean().sqrt().item(), "headline": {}}
        hours = self.data_cfg.dt_hours
        for label, c in self.headline:
            for lead in range(K):
                out["headline"][f"{label}@{(lead + 1) * hours:g}h"] = (phys[0, lead, c].item(), phys[1, lead, c].item())
        return out

    # the loop ------------------------------------------------------------------------------------
    def run(self) -> Result:
        """Set up, resume, then per step: train (forward/backward/step per micro batch), report
        (every log.every steps), validate and checkpoint when due; finish with the final report."""
        self._setup()
        result = Result(start_step=self._resume())
        self._open_outputs(result.start_step)
        end = min(self.job.train.steps, result.start_step + self.job.train.stop_after) \
            if self.job.train.stop_after else self.job.train.steps
        self.engine.train()
        self.batches = iter(self.train_data)
        try:
            for step in range(result.start_step + 1, end + 1):
                self._train_step(step)
                if step % self.job.log.every == 0 or step == end:
                    self._report(step, result)
                self._validate_and_save(step, end, result)
        except TrainingFailed as e:
            if self.rank == 0:
                self.log(f"train.py: {e}", file=sys.stderr)
            result.exit_code = 1
            return result
        finally:
            self.progress.close()
            self.train_data.stop()
        return self._finish(end, result)

    # phases of the loop, in the order they run ------------------------------------------------------
    def _resume(self) -> int:
        """Load the checkpoint checkpoint.resume names (DeepSpeed tag on this mesh, or a consolidated
        one on any mesh); returns the step it was written at (0 for a fresh start)."""
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
                got = self.load_consolidated(where[0])
            except (CheckpointError, ValueError) as e:
                err = e
            self._agree(err, f"loading consolidated checkpoint {where[0]}")
            self.best = got["best"]
            self.train_data.load_state_dict({"sampler": got["sampler"], "split": "train"})
            if rank == 0:
                self.log(f"starting from consolidated checkpoint {where[0]} (step {got['step']}) on mesh {job.mesh}")
            return got["step"]
        root, tag = where
        expect = {k: v for k, v in self._job_info().items() if k in ("mesh", "model", "zero_stage")}
        try:
            client, mine, _ = self.ckpt.load(self.engine, root, tag, expect)
        except CheckpointError as e:
            err = e
        self._agree(err, f"loading checkpoint {root / tag}")
        self.best = float(client.get("best", math.inf))
        self.train_data.load_state_dict(mine["loader"])
        set_rng_state(mine["rng"])
        if rank == 0:
            self.log(f"resuming from {root / tag} (step {client['step']})")
        return int(client["step"])

    def _open_outputs(self, step0: int) -> None:
        """The start line, the run log (metrics.csv and DeepSpeed's monitors) and the progress display."""
        from ..model.mixer import num_parameters

        job, tc, mesh = self.job, self.job.train, self.mesh
        dp, micro, gas = mesh.sizes["dp"], self.micro, self.gas
        self.global_batch = micro * gas * dp
        if self.rank == 0:
            self.log(f"mesh {job.mesh} on {self.world} process(es); model {num_parameters(job.model):,} parameters "
                     f"(this rank {self.model.local_num_parameters():,}); global batch {self.global_batch} "
                     f"(micro {micro} x accumulation {gas} x dp {dp}); ZeRO-{zero_stage(self.ds)}; "
                     f"{str(self.dtype).replace('torch.', '')}; steps {step0 + 1}..{tc.steps}; rollout k in "
                     f"1..{job.rollout} ({tc.rollout_mode}); lr {tc.lr:g}; output {job.log.dir}")
        self.runlog = RunLog(job.log.dir, job.log.csv, monitor=self.engine.monitor, resume_step=step0) \
            if self.rank == 0 else None
        self.progress = Progress(tc.steps, step0, enabled=self.rank == 0, log=self.log)
        self.peak = self._peak_tflops()
        self.watch = LossWatch(self.device, self.rank, self.world, scale=1.0 / (dp * gas))
        self.window = {"flops": 0, "samples": 0, "t": time.perf_counter()}

    def _train_step(self, step: int) -> None:
        """One optimizer step: `gas` micro batches through engine forward/backward/step. The loss
        stays on the device (no host round trip per micro step); LossWatch checks it at reports."""
        k = self.rollout_length(step)
        for _ in range(self.gas):
            loss = self.micro_step_loss(next(self.batches), k)
            self.watch.add(step, loss)
            self.engine.backward(loss)
            self.engine.step()
        self.window["flops"] += self._flops(k) * self.global_batch
        self.window["samples"] += self.global_batch
        self.progress.update(1)

    def _check_finite(self, result: Result) -> list[float]:
        """Collective: the global losses of the steps since the last check (into result.losses);
        raises TrainingFailed naming the first non-finite step and its rank(s)."""
        steps, losses, bad = self.watch.collect()
        if bad:
            first = min(bad.values())
            raise TrainingFailed(
                f"non-finite loss at step {first} on rank(s) {sorted(r for r, s in bad.items() if s == first)} "
                f"(found at step {max(steps)}; checked every log.every={self.job.log.every} steps and before "
                f"every validation and checkpoint); last good checkpoint: {self.ckpt.describe('latest')} (lower "
                f"weathermixer.train.lr, set gradient_clipping, or check the data)")
        result.losses.update(zip(steps, losses))
        return losses

    def _report(self, step: int, result: Result) -> None:
        """Collective: a log row (loss, lr, throughput, peak memory, grad norm, MFU) every log.every steps."""
        losses = self._check_finite(result)
        w, world = self.window, self.world
        elapsed = time.perf_counter() - w["t"]
        mem = torch.zeros(world, dtype=torch.float64, device=self.device)
        mem[self.rank] = peak_memory_bytes(self.device)
        dist.all_reduce(mem)
        rate, tflops = w["samples"] / elapsed, w["flops"] / elapsed / world / 1e12
        row = {"loss": sum(losses) / len(losses), "lr": self.engine.get_lr()[0], "samples_per_s": rate,
               "tflops_per_rank": tflops, "peak_mem_gb_max": mem.max().item() / 2 ** 30,
               "peak_mem_gb_min": mem.min().item() / 2 ** 30}
        gn = self.engine.get_global_grad_norm()
        if gn is not None:
            row["grad_norm"] = float(gn)
        if self.peak:
            row["mfu"] = tflops / self.peak
        if self.rank == 0:
            self.runlog.log(step, "train", row, samples=self.engine.global_samples)
            self.progress.set_postfix(loss=f"{row['loss']:.4f}", samples_s=f"{rate:.1f}", tflops_rank=f"{tflops:.3g}")
            self.progress.write(f"step {step}/{self.job.train.steps} loss {row['loss']:.4f} lr {row['lr']:.2e} "
                                f"samples/s {rate:.1f} TFLOP/s/rank {tflops:.3g} peak mem "
                                f"{row['peak_mem_gb_max']:.2f} GB" + (f" MFU {row['mfu']:.1%}" if self.peak else ""))
        self.window = {"flops": 0, "samples": 0, "t": time.perf_counter()}

    def _validate_and_save(self, step: int, end: int, result: Result) -> None:
        """Validation when due, then a checkpoint when due (latest/best pointers). A state with a
        non-finite loss is never validated or saved. Not counted as training time."""
        job, t_extra = self.job, time.perf_counter()
        last = step == job.train.steps
        validate = last or (job.validation.every and step % job.validation.every == 0)
        ck = job.checkpoint
        save = (ck.every and step % ck.every == 0) or (last and ck.at_end) or (step == end and not last)
        if not (validate or save):
            return
        self._check_finite(result)
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
            self._save(step, self.best, pointers, self.progress)
        self.window["t"] += time.perf_counter() - t_extra

    def _validate_and_log(self, step: int) -> dict:
        t0 = time.perf_counter()
        v = self.validate()
        if self.rank == 0:
            self.runlog.log(step, "val", {"val_loss": v["val_loss"], **{
                f"rmse_{key}": m for key, (m, _) in v["headline"].items()}}, samples=self.engine.global_samples)
            self.progress.write(f"validation at step {step} ({v['samples']} samples, {time.perf_counter() - t0:.1f} s): "
                                f"loss {v['val_loss']:.4f}; RMSE in {self.units} (persistence): " + ", ".join(
                                    f"{key} {m:.4g} ({p:.4g})" for key, (m, p) in v["headline"].items()))
        return v

    def _finish(self, end: int, result: Result) -> Result:
        """Stopped early (stop_after): say how to continue. Else the final validation line, the loss
        plot and memory.json (peak per rank)."""
        job, rank = self.job, self.rank
        if end < job.train.steps:
            if rank == 0:
                self.log(f"stopping after step {end} of {job.train.steps} (train.stop_after={job.train.stop_after}); "
                         f"rerun the same command to continue from {self.ckpt.describe('latest')}")
                self.runlog.close()
            return result
        if not result.val:  # resumed at the last step already: nothing to train, report the model
            result.val = self.validate()
        v = result.val
        mem = torch.zeros(self.world, dtype=torch.float64, device=self.device)
        mem[rank] = peak_memory_bytes(self.device)
        dist.all_reduce(mem)
        if rank == 0:
            self.log(f"final: model_rmse={v['rmse_norm_lead1']:.4f} persistence_rmse={v['persistence_norm_lead1']:.4f} "
                     f"ratio={v['rmse_norm_lead1'] / v['persistence_norm_lead1']:.3f}")
            self.runlog.close()
            if job.log.plot and (png := self.runlog.plot()):
                self.log(f"loss curve: {png}")
            Path(job.log.dir, "memory.json").write_text(json.dumps(
                {"device": str(self.device), "peak_bytes_per_rank": mem.tolist(),
                 "measure": "torch.cuda.max_memory_allocated" if self.device.type == "cuda" else "max RSS"},
                indent=1))
        if not math.isfinite(v["rmse_norm_lead1"]):
            result.exit_code = 1
        return result

    def _save(self, step: int, best: float, pointers: list[str], bar) -> None:
        t0 = time.perf_counter()
        client = {"step": step, "best": best}
        mine = {"loader": self.train_data.state_dict(), "rng": rng_state(), "step": step}
        path = self.ckpt.save(self.engine, step, client, mine, self._job_info(), pointers=pointers)
        if self.rank == 0:
            bar.write(f"checkpoint {path} ({', '.join(pointers)}) in {time.perf_counter() - t0:.1f} s")

