"""Compare a WeatherMixer on a DP x DOMAIN x TP mesh with its single-process twin.

    python -m jigsaw_ext.selfcheck --dp 1 --domain 2 --tp 2 [--dtype fp32|bf16]

Launches dp*domain*tp processes (gloo on CPU, NCCL on GPU). Every rank builds the model on the
mesh and, from the same seed and batch, the serial model; it compares its own block of the forward
output, the loss, the input gradient, every parameter gradient and the parameters after 3 AdamW
steps with the same block of the serial result. Error of a quantity = max|a - b| / max|b| over the
tensor (the worst tensor is reported). The default model has uneven shards on most meshes, empty
static-channel shards, zero-padded patches, the blend head and a 2-step latent rollout.
(This tool lives in jigsaw_ext because users run it as one; it is the only place that imports the
weather model.)
"""
from __future__ import annotations

import argparse
import sys

FP32_TOL, BF16_TOL = 1e-5, 5e-2


def default_model_config(**overrides):
    from weathermixer.config import ChannelsConfig, ModelConfig

    base = dict(grid=(25, 24), patch=(2, 3), pad_to_patch=True, hidden=32, token_fraction=0.5,
                channel_fraction=1.5, blocks=2, rollout=2, head="blend", seed=1234,
                channels=ChannelsConfig(surface=["t2m", "u10"], atmospheric=["z", "t", "q"],
                                        levels=[500, 850], static=["lsm", "orography"]))
    base.update(overrides)
    return ModelConfig(**base)


def _rel(a, b) -> float:
    if b.numel() == 0:  # an empty shard (e.g. 2 static channels over tp=3)
        return 0.0
    scale = b.abs().max().item()
    return (a.double() - b.double()).abs().max().item() / max(scale, 1e-30)


def compare_with_serial(mesh_config, model_config=None, dtype: str = "fp32", steps: int = 3,
                        local_batch: int = 2, data_seed: int = 7, optimizer: str = "sgd") -> dict[str, float]:
    """Run on an initialised process group; returns {quantity: (max relative error over all
    ranks, where it occurred)}, identical on every rank."""
    import torch
    import torch.distributed as dist

    from jigsaw_ext.mesh import Mesh, init_mesh
    from weathermixer.loss import latitude_weights, weighted_mse_term
    from weathermixer.model import WeatherMixer

    cfg = model_config or default_model_config()
    mesh = init_mesh(mesh_config)
    dp = mesh.sizes["dp"]
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=(dtype == "bf16"))

    gen = torch.Generator().manual_seed(data_seed)
    C, S, k = cfg.channels.n_fields, cfg.channels.n_static, cfg.rollout
    B = local_batch * dp
    fields = torch.randn(B, C, *cfg.grid, generator=gen)
    static = torch.randn(B, S, *cfg.grid, generator=gen) if S else None
    targets = [fields + 0.3 * (i + 1) * torch.randn(B, C, *cfg.grid, generator=gen) for i in range(k)]
    lat = torch.linspace(-90, 90, cfg.grid[0])
    weights = latitude_weights(lat)

    def run(model, geo, fields, static, targets, weights, count):
        fields = fields.detach().to(device).requires_grad_(True)
        static = None if static is None else static.to(device)
        with autocast:
            leads = model.forecast_leads(fields, static)
        loss = sum(weighted_mse_term(p.float(), t.to(device), weights.to(device), count)
                   for p, t in zip(leads, targets)) / len(leads)
        loss.backward()
        return leads[-1].detach().float(), loss.detach(), fields.grad

    # serial twin on the whole global batch (loss = mean over the batch = mean of the DP replicas)
    serial = WeatherMixer(cfg, Mesh.single()).to(device)
    s_out, s_loss, s_gin = run(serial, serial.geo, fields, static, targets, weights, fields.numel())
    s_params = dict(serial.named_parameters())

    model = WeatherMixer(cfg, mesh).to(device)
    geo = model.geo
    rows = slice(mesh.coords["dp"] * local_batch, (mesh.coords["dp"] + 1) * local_batch)
    f_lay, s_lay = geo.grid_layout(C, local_batch), geo.grid_layout(S, local_batch)
    shard = lambda t, lay: lay.shard(t[rows], mesh.coords)  # noqa: E731
    local_w = weights[geo.pixel_row_split.slice(mesh.coords["domain"])]
    count = fields[rows].numel()

    def step_distributed():
        out, loss, gin = run(model, geo, shard(fields, f_lay), None if static is None else shard(static, s_lay),
                             [shard(t, f_lay) for t in targets], local_w, count)
        for p in model.parameters():  # DP averaging (what DeepSpeed does over the dp group)
            if dp > 1:
                dist.all_reduce(p.grad, group=mesh.groups["dp"])
                p.grad /= dp
        if mesh.size("model") > 1:
            dist.all_reduce(loss, group=mesh.groups["model"])
        if dp > 1:
            dist.all_reduce(loss, group=mesh.groups["dp"])
            loss /= dp
        return out, loss, gin

    errors: dict[str, float] = {}
    worst: dict[str, str] = {}
    out, loss, gin = step_distributed()
    errors["output"] = _rel(out, f_lay.shard(s_out[rows], mesh.coords))
    errors["loss"] = _rel(loss, s_loss)
    # a replica's loss is the mean over its own batch; the global objective is the mean over the
    # dp replicas, so d(global)/d(this replica's input) = gin / dp
    errors["input_grad"] = _rel(gin / dp, f_lay.shard(s_gin[rows], mesh.coords))
    errors["param_grad"], worst["param_grad"] = max(
        (_rel(p.grad, p.block_layout.shard(s_params[n].grad, mesh.coords)), n) for n, p in model.named_parameters())

    make_opt = lambda params: (torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01) if optimizer == "adamw"  # noqa: E731
                               else torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=0.01))
    opt_d, opt_s = make_opt(model.parameters()), make_opt(serial.parameters())
    for step in range(steps):
        if step:
            serial.zero_grad()
            model.zero_grad()
            run(serial, serial.geo, fields, static, targets, weights, fields.numel())
            step_distributed()
        opt_s.step()
        opt_d.step()
    errors["params_after_steps"], worst["params_after_steps"] = max(
        (_rel(p, p.block_layout.shard(s_params[n], mesh.coords)), n) for n, p in model.named_parameters())

    vec = torch.tensor(list(errors.values()), dtype=torch.float64, device=device)
    dist.all_reduce(vec, op=dist.ReduceOp.MAX)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (errors, worst))
    for key, value in zip(errors, vec.tolist()):  # name the tensor and rank with the largest error
        rank = max(range(len(everyone)), key=lambda r: everyone[r][0][key])
        where = everyone[rank][1].get(key)
        errors[key] = (value, f"{where} on rank {rank}" if where else f"rank {rank}")
    return errors


def _worker(rank, world, mesh_kwargs, dtype, model_overrides, optimizer="sgd"):
    from jigsaw_ext.mesh import MeshConfig

    cfg = default_model_config(**model_overrides)
    return compare_with_serial(MeshConfig(**mesh_kwargs), cfg, dtype, optimizer=optimizer)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jigsaw_ext.selfcheck", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dp", type=_positive, default=1)
    ap.add_argument("--domain", type=_positive, default=1)
    ap.add_argument("--tp", type=_positive, default=1)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--replicate-weights-over", nargs="*", default=[], choices=["domain", "tp"])
    ap.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd",
                    help="optimizer for the parameters-after-3-steps check (see the module doc)")
    ap.add_argument("--tol", type=float, default=None,
                    help=f"pass threshold (default {FP32_TOL} for fp32, {BF16_TOL} for bf16)")
    ap.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args(argv)
    from jigsaw_ext.mesh import MeshConfig
    from jigsaw_ext.testing import WorkerFailure, run_workers
    from weathermixer.geometry import Geometry
    from jigsaw_ext.mesh import Mesh

    mesh_kwargs = dict(dp=args.dp, domain=args.domain, tp=args.tp,
                       replicate_weights_over=args.replicate_weights_over)
    try:
        mc = MeshConfig(**mesh_kwargs)
        Geometry(default_model_config(), Mesh.virtual(mc))  # fail fast, before any process starts
    except ValueError as err:
        print(f"selfcheck FAIL invalid mesh: {err}")
        return 2
    tol = args.tol if args.tol is not None else (FP32_TOL if args.dtype == "fp32" else BF16_TOL)
    print(f"selfcheck: mesh {mc}, {mc.world_size} processes, dtype {args.dtype}, tolerance {tol:g}", flush=True)
    try:
        errors = run_workers(_worker, mc.world_size, mesh_kwargs, args.dtype, {}, args.optimizer,
                             timeout=args.timeout, preload=["weathermixer.model"])[0]
    except WorkerFailure as err:
        print(f"selfcheck FAIL {err}")
        return 1
    for name, (value, where) in errors.items():
        print(f"  {name:<20s} max_rel_err={value:.3e}   (worst: {where})")
    errors = {k: v for k, (v, _) in errors.items()}
    worst = max(errors.values())
    if worst <= tol:
        print(f"selfcheck PASS max_rel_err={worst:.3e}")
        return 0
    bad = ", ".join(f"{k}={v:.3e}" for k, v in errors.items() if v > tol)
    print(f"selfcheck FAIL max_rel_err={worst:.3e} > {tol:g} ({bad})")
    return 1


if __name__ == "__main__":
    sys.exit(main())
