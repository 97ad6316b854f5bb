"""Compare a block-sharded model on a DP x DOMAIN x TP mesh with its single-process twin.

    python -m jigsaw_ext.selfcheck --dp 1 --domain 2 --tp 2 [--dtype fp32|bf16]

Launches dp*domain*tp processes (gloo on CPU, NCCL on GPU). Every rank builds the model on the
mesh and, from the same seed and batch, the serial model; it compares its own block of the forward
output, the loss, the input gradient, every parameter gradient and the parameters after 3 optimizer
steps with the same block of the serial result. Error of a quantity = max|a - b| / max|b| over the
tensor (the worst tensor and rank are reported).

The model is a `SelfCheckTask`. This module's default is a small generic block-sharded MLP-Mixer
(uneven token and feature shards on most meshes, an empty shard on TP=4). A model package plugs in
its own task (`python -m weathermixer.selfcheck` checks the WeatherMixer the same way).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import NamedTuple, cast

import torch
import torch.nn as nn

from .layout import Layout, Split, block_layout, even_split
from .mesh import Mesh, MeshConfig

FP32_TOL, BF16_TOL = 1e-5, 5e-2


class Batch(NamedTuple):
    inputs: list  # tensors (or None) passed to the model; inputs[0] is the one whose gradient is checked
    targets: list  # one target per output the loss compares


class SelfCheckTask:
    """What the self-check needs to know about a model. Every tensor of a Batch holds `size`
    samples along dim 0; `layouts` says how each is split over the mesh (None: not split)."""

    def check_mesh(self, mesh: Mesh) -> None:
        """Raise ValueError (naming the mesh key) if the model cannot be split over this mesh."""

    def build(self, mesh: Mesh) -> nn.Module:
        """The model on `mesh`, parameters made with jigsaw_ext.layers.make_param (block_layout)."""
        raise NotImplementedError

    def batch(self, size: int, gen: torch.Generator) -> Batch:
        raise NotImplementedError

    def layouts(self, model: nn.Module, size: int) -> Batch:
        """The Layout of every tensor of a batch of `size` samples (None for an absent input)."""
        raise NotImplementedError

    def forward_loss(self, model: nn.Module, batch: Batch, count: int):
        """(output compared, this rank's loss term): the loss terms of a model group add up to
        sum(weighted squared error) / count; the output has the layout of the last target."""
        raise NotImplementedError


# ------------------------------------------------------------------------------------------------
class _Mixer(nn.Module):
    """A generic block-sharded MLP-Mixer on (batch, tokens, features): embed, pre-norm token- and
    channel-mixing blocks, a two-segment head (LN([LN(z) || x]) -> features), no weather in it."""

    def __init__(self, mesh: Mesh, tokens: int, features: int, hidden: int, blocks: int, seed: int):
        from .init import init_parameters
        from .layers import BlockLinear, DistLayerNorm, bucket_small_gradients
        from .mlp import BlockMLP

        super().__init__()
        self.mesh = mesh
        split = lambda axis, n: Split(axis, even_split(n, mesh.size(axis)))  # noqa: E731
        self.tokens, self.features = split("domain", tokens), split("tp", features)
        d = split("tp", hidden)
        self.embed = BlockLinear(mesh, [self.features], d, contract="tp")
        self.blocks = nn.ModuleList()
        for _ in range(blocks):
            token = BlockMLP(
                mesh,
                "token_mixing",
                self.tokens,
                max(1, tokens // 2),
                row_split=d,
                row_dim=1,
                contract="domain",
                fc2_bias=False,
                norm="rows",
            )
            channel = BlockMLP(
                mesh,
                "channel_mixing",
                d,
                2 * hidden - 1,
                row_split=self.tokens,
                row_dim=1,
                contract="tp",
                norm="features",
            )
            self.blocks.append(
                nn.ModuleDict(
                    dict(
                        norm1=DistLayerNorm(mesh, [d], local=token.fuses_norm),
                        token=token,
                        norm2=DistLayerNorm(mesh, [d], local=channel.fuses_norm),
                        channel=channel,
                    )
                )
            )
        self.norm = DistLayerNorm(mesh, [d, self.features])
        self.head = BlockLinear(mesh, [d, self.features], self.features, contract="tp")
        init_parameters(self, mesh, seed)
        bucket_small_gradients(self, mesh)

    def forward(self, x):
        z = self.embed(x)
        for block in self.blocks:
            b = cast(nn.ModuleDict, block)
            z = z + b["token"](z.transpose(1, 2), b["norm1"]).transpose(1, 2)
            z = z + b["channel"](z, b["norm2"])
        return x + self.head(*self.norm(z, x))


@dataclass(frozen=True)
class MixerTask(SelfCheckTask):
    """The generic task: 13 tokens, 10 features, D = 12, 2 blocks (uneven shards on most meshes)."""

    tokens: int = 13
    features: int = 10
    hidden: int = 12
    blocks: int = 2
    seed: int = 1234

    def check_mesh(self, mesh: Mesh) -> None:
        for axis, n in (("domain", self.tokens // 2), ("tp", self.hidden)):
            if mesh.size(axis) > n:
                raise ValueError(
                    f"mesh.{axis}={mesh.size(axis)} exceeds the {n} rows the test model can split "
                    f"over it: allowed mesh.{axis} <= {n}"
                )

    def build(self, mesh: Mesh) -> nn.Module:
        return _Mixer(mesh, self.tokens, self.features, self.hidden, self.blocks, self.seed)

    def batch(self, size: int, gen: torch.Generator) -> Batch:
        x = torch.randn(size, self.tokens, self.features, generator=gen)
        return Batch([x], [x + 0.3 * torch.randn(x.shape, generator=gen)])

    def layouts(self, model, size: int) -> Batch:
        lay = Layout((size, self.tokens, self.features), (None, model.tokens, model.features))
        return Batch([lay], [lay])

    def forward_loss(self, model, batch: Batch, count: int):
        out = model(*batch.inputs)
        return out, (out.float() - batch.targets[0]).square().sum() / count


# ------------------------------------------------------------------------------------------------
def relative_error(a, b) -> float:
    """max|a - b| / max|b| (0 for an empty shard)."""
    if b.numel() == 0:  # an empty shard (e.g. 2 static channels over tp=3)
        return 0.0
    scale = b.abs().max().item()
    return (a.double() - b.double()).abs().max().item() / max(scale, 1e-30)


def _shard(layouts: Batch, batch: Batch, rows: slice, coords) -> Batch:
    """This rank's block of the samples `rows` of a global batch."""
    pick = lambda lay, t: None if t is None else lay.shard(t[rows], coords)  # noqa: E731
    return Batch(
        [pick(lay, t) for lay, t in zip(layouts.inputs, batch.inputs, strict=True)],
        [pick(lay, t) for lay, t in zip(layouts.targets, batch.targets, strict=True)],
    )


class _Side:
    """One side of the comparison: a model on a mesh, its optimizer and its block of the batch."""

    def __init__(self, task: SelfCheckTask, mesh: Mesh, full: Batch, rows: slice, device, dtype: str, optimizer: str):
        self.task, self.mesh, self.device = task, mesh, device
        self.model = task.build(mesh).to(device)
        self.layouts = task.layouts(self.model, rows.stop - rows.start)
        self.batch = _shard(self.layouts, full, rows, mesh.coords)
        self.count = full.targets[0][rows].numel()
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=(dtype == "bf16"))
        params = self.model.parameters()
        self.opt = (
            torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
            if optimizer == "adamw"
            else torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=0.01)
        )

    def forward_backward(self):
        """(output, loss, gradient of the loss with respect to inputs[0])."""
        self.model.zero_grad()
        x = self.batch.inputs[0].detach().to(self.device).requires_grad_(True)
        rest = [None if t is None else t.to(self.device) for t in self.batch.inputs[1:]]
        batch = Batch([x, *rest], [t.to(self.device) for t in self.batch.targets])
        with self.autocast:
            out, loss = self.task.forward_loss(self.model, batch, self.count)
        loss.backward()
        return out.detach().float(), loss.detach(), x.grad


def compare_with_serial(
    task: SelfCheckTask,
    mesh_config: MeshConfig,
    dtype: str = "fp32",
    steps: int = 3,
    local_batch: int = 2,
    data_seed: int = 7,
    optimizer: str = "sgd",
) -> dict:
    """Run on an initialised process group; returns {quantity: (max relative error over all
    ranks, where it occurred)}, identical on every rank."""
    import torch.distributed as dist

    from .mesh import init_mesh

    mesh = init_mesh(mesh_config)
    dp, coords = mesh.sizes["dp"], mesh.coords
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    full = task.batch(local_batch * dp, torch.Generator().manual_seed(data_seed))
    # the serial twin on the whole global batch (loss = mean over the batch = mean of the dp replicas)
    serial = _Side(task, Mesh.single(), full, slice(0, local_batch * dp), device, dtype, optimizer)
    rows = slice(coords["dp"] * local_batch, (coords["dp"] + 1) * local_batch)
    sharded = _Side(task, mesh, full, rows, device, dtype, optimizer)

    def step_sharded():
        out, loss, gin = sharded.forward_backward()
        for p in sharded.model.parameters():  # dp averaging (what DeepSpeed does over the dp group)
            if dp > 1:
                assert p.grad is not None  # set by forward_backward
                dist.all_reduce(p.grad, group=mesh.groups["dp"])
                p.grad /= dp
        if mesh.size("model") > 1:
            dist.all_reduce(loss, group=mesh.groups["model"])
        if dp > 1:
            dist.all_reduce(loss, group=mesh.groups["dp"])
            loss /= dp
        return out, loss, gin

    s_out, s_loss, s_gin = serial.forward_backward()
    out, loss, gin = step_sharded()
    s_params = dict(serial.model.named_parameters())
    errors, worst = {}, {}
    errors["output"] = relative_error(out, sharded.layouts.targets[-1].shard(s_out[rows], coords))
    errors["loss"] = relative_error(loss, s_loss)
    # a replica's loss is the mean over its own batch; the global objective is the mean over the
    # dp replicas, so d(global)/d(this replica's input) = gin / dp
    errors["input_grad"] = relative_error(gin / dp, sharded.layouts.inputs[0].shard(s_gin[rows], coords))
    errors["param_grad"], worst["param_grad"] = max(
        (relative_error(p.grad, block_layout(p).shard(cast(torch.Tensor, s_params[n].grad), coords)), n)
        for n, p in sharded.model.named_parameters()
    )
    for step in range(steps):
        if step:
            serial.forward_backward()
            step_sharded()
        serial.opt.step()
        sharded.opt.step()
    errors["params_after_steps"], worst["params_after_steps"] = max(
        (relative_error(p, block_layout(p).shard(s_params[n], coords)), n) for n, p in sharded.model.named_parameters()
    )
    return _worst_over_ranks(errors, worst, device)


def _worst_over_ranks(errors: dict, worst: dict, device) -> dict:
    import torch.distributed as dist

    vec = torch.tensor(list(errors.values()), dtype=torch.float64, device=device)
    dist.all_reduce(vec, op=dist.ReduceOp.MAX)
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (errors, worst))
    out = {}
    for key, value in zip(errors, vec.tolist(), strict=True):  # name the tensor and rank with the largest error
        rank = max(range(len(everyone)), key=lambda r: everyone[r][0][key])
        where = everyone[rank][1].get(key)
        out[key] = (value, f"{where} on rank {rank}" if where else f"rank {rank}")
    return out


# ------------------------------------------------------------------------------------------------
def _worker(rank, world, task, mesh_kwargs, dtype, optimizer="sgd"):
    return compare_with_serial(task, MeshConfig(**mesh_kwargs), dtype, optimizer=optimizer)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def main(
    argv=None,
    task: SelfCheckTask | None = None,
    prog: str = "python -m jigsaw_ext.selfcheck",
    doc: str = __doc__,
    preload: tuple = (),
) -> int:
    ap = argparse.ArgumentParser(
        allow_abbrev=False, prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--dp", type=_positive, default=1)
    ap.add_argument("--domain", type=_positive, default=1)
    ap.add_argument("--tp", type=_positive, default=1)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--replicate-weights-over", nargs="*", default=[], choices=["domain", "tp"])
    ap.add_argument(
        "--strategy",
        nargs="*",
        default=[],
        metavar="[KIND=]STRATEGY",
        help="per layer kind (token_mixing=stationary) or for every kind (stationary): "
        "gather, stationary or auto (mesh.strategy)",
    )
    ap.add_argument(
        "--optimizer", choices=["sgd", "adamw"], default="sgd", help="optimizer for the parameters-after-3-steps check"
    )
    ap.add_argument(
        "--tol", type=float, default=None, help=f"pass threshold (default {FP32_TOL} for fp32, {BF16_TOL} for bf16)"
    )
    ap.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args(argv)
    from .testing import WorkerFailure, run_workers

    task = task or MixerTask()
    strategy = dict(item.split("=", 1) if "=" in item else ("*", item) for item in args.strategy)
    mesh_kwargs = dict(
        dp=args.dp,
        domain=args.domain,
        tp=args.tp,
        replicate_weights_over=args.replicate_weights_over,
        strategy=strategy,
    )
    try:
        mc = MeshConfig(**mesh_kwargs)
        task.check_mesh(Mesh.virtual(mc))  # fail fast, before any process starts
    except ValueError as err:
        print(f"selfcheck FAIL invalid mesh: {err}")
        return 2
    tol = args.tol if args.tol is not None else (FP32_TOL if args.dtype == "fp32" else BF16_TOL)
    print(
        f"selfcheck: {type(task).__name__} on mesh {mc}, {mc.world_size} processes, dtype {args.dtype}, "
        f"tolerance {tol:g}",
        flush=True,
    )
    try:
        errors = run_workers(
            _worker,
            mc.world_size,
            task,
            mesh_kwargs,
            args.dtype,
            args.optimizer,
            timeout=args.timeout,
            preload=list(preload),
        )[0]
    except WorkerFailure as err:
        print(f"selfcheck FAIL {err}")
        return 1
    return report(errors, tol)


def report(errors: dict, tol: float) -> int:
    for name, (value, where) in errors.items():
        print(f"  {name:<20s} max_rel_err={value:.3e}   (worst: {where})")
    values = {k: v for k, (v, _) in errors.items()}
    worst = max(values.values())
    if worst <= tol:
        print(f"selfcheck PASS max_rel_err={worst:.3e}")
        return 0
    bad = ", ".join(f"{k}={v:.3e}" for k, v in values.items() if v > tol)
    print(f"selfcheck FAIL max_rel_err={worst:.3e} > {tol:g} ({bad})")
    return 1


if __name__ == "__main__":
    sys.exit(main())
