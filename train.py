"""Train WeatherMixer on a DP x DOMAIN x TP mesh with DeepSpeed (first version of the main job).

    deepspeed --num_gpus 4 train.py --deepspeed_config deepspeed_configs/quickstart_cpu.json
    torchrun --nproc_per_node 2 train.py --deepspeed_config ... --domain 2 --tp 1
    python train.py --deepspeed_config ... --domain 1 --tp 1            (one process)

The JSON file holds DeepSpeed's settings plus the project section "weathermixer"
(weathermixer.train_config.TrainJobConfig: mesh, model, train, data). Everything that can be
checked without processes talking to each other is checked first, on every rank, so a bad
setting exits non-zero everywhere instead of leaving ranks blocked in a collective.

Data come from weathermixer.data: each rank reads only its block of each sample (channels over
TP, latitude rows over DOMAIN); all ranks of a model group take the same samples, dp replicas
disjoint ones. The default data section is the synthetic ERA5-like store, written once.
Loss = latitude-weighted MSE averaged over the leads of a latent rollout; each rank's term is its
share, so the model group's terms add up to the replica's loss; DeepSpeed averages over dp.
At the end: latitude-weighted RMSE (standardised units) at lead 1 on held-out times, model vs
persistence, printed by rank 0 as `final: model_rmse=... persistence_rmse=... ratio=...`.
"""
from __future__ import annotations

import argparse
import math
import os
import socket
import sys
import time
import warnings
from pathlib import Path

from weathermixer.config import ConfigError
from weathermixer.train_config import TrainJobConfig, load_train_job

EXIT_CONFIG, EXIT_FAILED = 2, 1
warnings.filterwarnings("ignore", message="absl.logging is not installed")  # megatron-core, harmless


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--deepspeed_config", required=True, help="JSON: DeepSpeed settings + 'weathermixer' section")
    ap.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    ap.add_argument("--steps", type=int, help="override weathermixer.train.steps")
    ap.add_argument("--dp", type=int, help="override weathermixer.mesh.dp")
    ap.add_argument("--domain", type=int, help="override weathermixer.mesh.domain")
    ap.add_argument("--tp", type=int, help="override weathermixer.mesh.tp")
    return ap.parse_args(argv)


# -------------------------------------------------------------------------------------------------
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


def check_job(job: TrainJobConfig, ds: dict, world: int, cuda: bool) -> dict:
    """Validate the job against the launch and return the DeepSpeed config to hand to initialize()."""
    from jigsaw_ext.mesh import Mesh, validate_world
    from weathermixer.geometry import Geometry

    try:
        validate_world(job.mesh, world)
        Geometry(job.model, Mesh.virtual(job.mesh))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    dp = job.mesh.dp
    micro, gas = resolve_batch(ds, dp)
    opt = dict(ds.get("optimizer") or {"type": "AdamW"})
    if opt.get("type", "").lower() not in ("adamw", "adam"):
        raise ConfigError(f"optimizer.type: {opt.get('type')!r} not supported; allowed: AdamW, Adam")
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
    zero = (out.get("zero_optimization") or {}).get("stage", 0)
    if zero not in (0, 1, 2):
        raise ConfigError(f"zero_optimization.stage: {zero} not supported by this first version "
                          f"(ZeRO-3 over block-sharded parameters is untested); allowed: 0, 1, 2")
    return out


def prepare_data(job: TrainJobConfig, rank: int, dist):
    """The gridded data config to read. For the embedded synthetic default, rank 0 writes the store
    and its statistics once (into a temporary name, renamed when complete, so an interrupted run
    never leaves a half-written store behind) while the other ranks wait."""
    if job.data.source != "synthetic":
        return job.data
    syn = job.data
    data_cfg = syn.gridded(job.model, job.rollout)
    store = syn.store_path(job.model)
    if rank == 0 and not (store.exists() and Path(data_cfg.stats).exists()):
        import json
        import shutil

        from weathermixer.data import GriddedDataset, compute_stats
        from weathermixer.data.synth import write_synthetic

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
    dist.barrier()
    return data_cfg


def lr_lambda(cfg):
    """Linear warm-up to 1, then cosine decay to min_lr_ratio at the last step."""
    def f(step: int) -> float:  # step = optimizer steps taken so far
        if step < cfg.warmup:
            return (step + 1) / (cfg.warmup + 1)
        progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def set_threads(torch) -> None:
    if "OMP_NUM_THREADS" in os.environ:
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, cores // local))


def single_process_env() -> None:
    """Plain `python train.py`: a world of one (deepspeed would otherwise try MPI discovery)."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


# -------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    args = parse_args(argv)
    single_process_env()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    overrides = {k: getattr(args, k) for k in ("steps", "dp", "domain", "tp")}

    import torch

    cuda = torch.cuda.is_available()
    try:
        job, ds = load_train_job(args.deepspeed_config, overrides)
        ds = check_job(job, ds, world, cuda)
    except ConfigError as err:
        if rank == 0:
            print(f"train.py: {err}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    return train(job, ds, rank, cuda, torch)


def train(job: TrainJobConfig, ds: dict, rank: int, cuda: bool, torch) -> int:
    import datetime

    import deepspeed
    import deepspeed.ops
    import torch.distributed as dist
    from tqdm import tqdm

    from jigsaw_ext.mesh import init_mesh
    from weathermixer.loss import latitude_weights, weighted_mse_term
    from weathermixer.model import WeatherMixer, num_parameters
    from weathermixer.data import ShardedSampleLoader

    set_threads(torch)
    deepspeed.ops.__compatible_ops__ = {"deepspeed_shm_comm": False}  # skip a ~45 s build (CPU inference op)
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo",
                               timeout=datetime.timedelta(seconds=job.train.dist_timeout_s))
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    mesh = init_mesh(job.mesh)
    cfg, tc = job.model, job.train
    model = WeatherMixer(cfg, mesh, device=device)
    schedule = lr_lambda(tc)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=ds, mpu=mesh.mpu(),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
    dp = mesh.sizes["dp"]
    micro, gas = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
    if engine.dp_world_size != dp or engine.train_batch_size() != micro * gas * dp:
        raise RuntimeError(f"DeepSpeed computed dp={engine.dp_world_size}, train_batch_size="
                           f"{engine.train_batch_size()} but the mesh has dp={dp} (micro={micro}, accumulation={gas})")

    K = job.rollout
    C, H, W = cfg.channels.n_fields, *cfg.grid
    data_cfg = prepare_data(job, rank, dist)
    train_data = ShardedSampleLoader(data_cfg, cfg, mesh, "train", batch=micro, seed=tc.seed)
    w_local = latitude_weights(torch.as_tensor(train_data.lat.copy()))[train_data.rows].to(device)
    world = dist.get_world_size()
    to_device = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731

    global_batch = micro * gas * dp
    if rank == 0:
        print(f"mesh {job.mesh} on {world} process(es); model {num_parameters(cfg):,} parameters "
              f"(this rank {model.local_num_parameters():,}); global batch {global_batch} "
              f"(micro {micro} x accumulation {gas} x dp {dp}); {tc.steps} steps, {K} lead(s), lr {tc.lr:g}",
              flush=True)

    count = micro * C * H * W  # elements of a replica's micro batch: the group's terms add up to the mean
    flags = torch.zeros(world + 1, dtype=torch.float64, device=device)
    bar = tqdm(total=tc.steps, disable=rank != 0, desc="train", dynamic_ncols=True, mininterval=1.0)
    loss_sum, loss_n, t_log = 0.0, 0, time.perf_counter()
    engine.train()
    batches = iter(train_data)
    for step in range(1, tc.steps + 1):
        for a in range(gas):
            sample = next(batches)
            fields, static, targets = to_device(sample.fields), to_device(sample.static), \
                [to_device(t) for t in sample.targets]
            leads = engine.module.forecast_leads(fields, static, K)
            loss = sum(weighted_mse_term(p.float(), y, w_local, count) for p, y in zip(leads, targets)) / K
            # one small all-reduce: the global loss (sum of the terms / dp) and which ranks went non-finite
            flags.zero_()
            finite = bool(torch.isfinite(loss))
            flags[0] = loss.detach().double() / dp if finite else 0.0
            flags[1 + rank] = 0.0 if finite else 1.0
            dist.all_reduce(flags)
            if flags[1:].any():
                bad = [r for r in range(world) if flags[1 + r] > 0]
                if rank == 0:
                    bar.close()
                    print(f"train.py: non-finite loss at step {step} (micro step {a}) on rank(s) {bad}: "
                          f"stopping (lower weathermixer.train.lr?)", file=sys.stderr, flush=True)
                return EXIT_FAILED
            engine.backward(loss)
            engine.step()
            loss_sum += flags[0].item() / gas
        loss_n += 1
        bar.update(1)
        if step % tc.log_every == 0 or step == tc.steps:
            elapsed = time.perf_counter() - t_log
            rate = loss_n * global_batch / elapsed
            lr = engine.get_lr()[0]
            bar.set_postfix(loss=f"{loss_sum / loss_n:.4f}", samples_s=f"{rate:.1f}", refresh=False)
            if rank == 0:
                bar.write(f"step {step}/{tc.steps} loss {loss_sum / loss_n:.4f} lr {lr:.2e} "
                          f"samples/s {rate:.1f}")
            loss_sum, loss_n, t_log = 0.0, 0, time.perf_counter()
    bar.close()

    # held-out evaluation at lead 1: model vs persistence, shards summed over the whole world
    engine.eval()
    val_data = ShardedSampleLoader(data_cfg, cfg, mesh, "val", batch=tc.val_batch, seed=tc.seed)
    sse = torch.zeros(3, dtype=torch.float64, device=device)  # model, persistence, samples
    seen = 0  # samples of this dp replica (the same on every rank of its model group)
    with torch.no_grad():
        for sample in val_data:
            if seen >= tc.val_samples / dp:
                break
            seen += len(sample.times)
            f, s, y = to_device(sample.fields), to_device(sample.static), to_device(sample.targets[0])
            pred = engine.module.forecast_leads(f, s, 1)[0]
            sse[0] += weighted_mse_term(pred.double(), y.double(), w_local, 1)
            sse[1] += weighted_mse_term(f.double(), y.double(), w_local, 1)
            sse[2] += len(sample.times) / mesh.size("model")  # every model-group rank counts its samples
    dist.all_reduce(sse)
    model_rmse, persistence_rmse = (sse[:2] / (sse[2] * C * H * W)).sqrt().tolist()
    if not math.isfinite(model_rmse):
        if rank == 0:
            print(f"train.py: non-finite validation RMSE ({model_rmse})", file=sys.stderr, flush=True)
        return EXIT_FAILED
    if rank == 0:
        print(f"final: model_rmse={model_rmse:.4f} persistence_rmse={persistence_rmse:.4f} "
              f"ratio={model_rmse / persistence_rmse:.3f}", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
