"""The training steps the benchmarks measure and the tests check, and the Megatron baseline.

`TrainStep` is one training step of any model (forward, mean squared error, backward, SGD);
`ours_step` / `ours_blocks_step` build it for the whole WeatherMixer or its mixer blocks on this
rank's share of one global batch; `megatron_blocks_step` builds the same mixer blocks from
megatron-core's tensor + sequence parallel layers (`MegatronMixerBlock`), the baseline of
benchmarks/bench_jigsaw.py. `megatron_block_bytes` is what that baseline sends per training step
(checked against megatron-core on gloo), `trace_block` traces one of our mixer blocks on the meta
device (benchmarks/bench_comm.py), and `C1` is the Jigsaw paper's C1 block configuration.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from jigsaw_ext.layers import bucket_small_gradients
from jigsaw_ext.layout import Layout
from jigsaw_ext.mesh import Mesh, MeshConfig
from jigsaw_ext.mlp import resolved_strategies
from jigsaw_ext.plan.trace import fake_mesh, trace_step
from weathermixer.config import ModelConfig
from weathermixer.grid import Geometry
from weathermixer.model import WeatherMixer
from weathermixer.model.mixer import MixerBlock


class TrainStep:
    """forward -> sum of squared errors / `count` -> backward -> `after_backward` -> SGD update.

    `count` is the element count of the full (unsharded) target, so the local terms of the ranks of a
    model group add up to the serial loss (mean squared error)."""

    def __init__(self, model: nn.Module, forward, inputs, target, count: int, after_backward=None):
        self.model, self.forward, self.inputs, self.target = model, forward, inputs, target
        self.count, self.after_backward = count, after_backward
        self.params = list(model.parameters())
        self.optimizer = torch.optim.SGD(self.params, lr=0.05)

    def __call__(self) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        for x in self.inputs:
            if isinstance(x, torch.Tensor):
                x.grad = None
        loss = (self.forward(*self.inputs) - self.target).square().sum() / self.count
        loss.backward()
        if self.after_backward is not None:
            self.after_backward()
        self.optimizer.step()
        return loss.item()


def _full(shape, seed: int) -> torch.Tensor:
    """The same full tensor on every rank."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def ours_step(cfg: ModelConfig, mesh, batch: int) -> TrainStep:
    """The whole WeatherMixer (embed, blocks, decoder, tendency head) on this rank's grid block."""
    model = WeatherMixer(cfg, mesh, micro_batch=batch)
    C, S = cfg.channels.n_fields, cfg.channels.n_static
    fields, static = _full((batch, C, *cfg.grid), 1), _full((batch, S, *cfg.grid), 2)
    target = fields + 0.1 * _full(fields.shape, 3)
    f_lay, s_lay = model.geo.grid_layout(C, batch), model.geo.grid_layout(S, batch)
    return TrainStep(
        model,
        model,
        (f_lay.shard(fields, mesh.coords), s_lay.shard(static, mesh.coords)),
        f_lay.shard(target, mesh.coords),
        target.numel(),
    )


def _latent(cfg: ModelConfig, batch: int):
    geo = Geometry(cfg, Mesh.single())
    z = _full((batch, geo.tokens, cfg.hidden), 4)
    return z, z + 0.1 * _full(z.shape, 5)


def ours_blocks_step(cfg: ModelConfig, mesh, batch: int) -> TrainStep:
    """Only the N mixer blocks of WeatherMixer, on a latent block (batch, tokens/domain, D/tp)."""
    model = WeatherMixer(cfg, mesh, micro_batch=batch)
    blocks = nn.Sequential(*model.blocks)
    bucket_small_gradients(blocks, mesh)  # as in the whole model: one gradient all-reduce per axis
    geo = model.geo
    layout = Layout((batch, geo.tokens, cfg.hidden), (None, geo.token_split, geo.feature_split(cfg.hidden)))
    z, target = _latent(cfg, batch)
    z_local = layout.shard(z, mesh.coords).clone().requires_grad_(True)
    return TrainStep(blocks, blocks, (z_local,), layout.shard(target, mesh.coords), target.numel())


class MegatronMixerBlock(nn.Module):
    """The same pre-norm mixer block built from megatron-core's tensor-parallel layers, Megatron-LM
    style with sequence parallelism over all ranks of `group`: between blocks the activation is
    [tokens/P, batch, D] (megatron's [s, b, h] layout, s split).

    channel mixing: LN -> ColumnParallel(D->Hc, sequence_parallel: all-gathers tokens) -> GELU ->
                    RowParallel(Hc->D, sequence_parallel: reduce-scatters tokens)
    token mixing:   LN -> all-gather tokens -> transpose -> ColumnParallel(T->Hs, no SP; input-grad
                    reduction left to the gather's reduce-scatter dual) -> GELU -> the row-parallel
                    weight shard's product, its partial sums reduce-scattered along the last (token)
                    axis with megatron-core's reduce_scatter_last_dim_to_tensor_parallel_region ->
                    transpose: back to the sequence-parallel layout, with no all-reduce anywhere
    (megatron_block_bytes is what this sends, checked in tests/integration/test_mlp_strategies.py)."""

    def __init__(self, tokens: int, hidden: int, token_hidden: int, channel_hidden: int, group):
        super().__init__()
        from megatron.core import ModelParallelConfig
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        self.group = group
        P = group.size()
        common = dict(
            tensor_model_parallel_size=P,
            use_cpu_initialization=True,
            gradient_accumulation_fusion=False,
            params_dtype=torch.float32,
        )
        sp = ModelParallelConfig(sequence_parallel=P > 1, **common)
        no_sp = ModelParallelConfig(sequence_parallel=False, **common)

        def init(fan_in):  # nn.Linear's weight distribution; megatron draws the full matrix, then splits
            return lambda w: nn.init.uniform_(w, -(fan_in**-0.5), fan_in**-0.5)

        self.norm1, self.norm2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        for p in (*self.norm1.parameters(), *self.norm2.parameters()):
            p.sequence_parallel = P > 1  # replicated, used on token shards: gradients summed over group
        self.token_fc1 = ColumnParallelLinear(
            tokens,
            token_hidden,
            config=no_sp,
            init_method=init(tokens),
            bias=True,
            gather_output=False,
            disable_grad_reduce=True,
            tp_group=group,
        )
        self.token_fc2 = RowParallelLinear(
            token_hidden,
            tokens,
            config=no_sp,
            init_method=init(token_hidden),
            bias=False,
            input_is_parallel=True,
            skip_bias_add=False,
            tp_group=group,
        )
        self.channel_fc1 = ColumnParallelLinear(
            hidden, channel_hidden, config=sp, init_method=init(hidden), bias=True, gather_output=False, tp_group=group
        )
        self.channel_fc2 = RowParallelLinear(
            channel_hidden,
            hidden,
            config=sp,
            init_method=init(channel_hidden),
            bias=True,
            input_is_parallel=True,
            skip_bias_add=False,
            tp_group=group,
        )

    def forward(self, x):
        from megatron.core.tensor_parallel.mappings import (
            gather_from_sequence_parallel_region,
            reduce_scatter_last_dim_to_tensor_parallel_region,
        )

        y = gather_from_sequence_parallel_region(self.norm1(x), True, self.group)  # [T, B, D]
        y, _ = self.token_fc1(y.transpose(0, 2))  # [D, B, Hs/P]
        y = F.linear(F.gelu(y), self.token_fc2.weight)  # [D, B, T] partial sums
        if self.group.size() > 1:
            y = reduce_scatter_last_dim_to_tensor_parallel_region(y, self.group)  # [D, B, T/P]
        x = x + y.transpose(0, 2)
        y, _ = self.channel_fc1(self.norm2(x))  # [T, B, Hc/P]
        y, _ = self.channel_fc2(F.gelu(y))  # [T/P, B, D]
        return x + y


def _allreduce_sequence_parallel_grads(model: nn.Module, group) -> None:
    """What megatron's finalize_model_grads does for parameters used on token shards."""
    grads = [p.grad for p in model.parameters() if getattr(p, "sequence_parallel", False)]
    if grads:
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=group)
        for g, reduced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
            g.copy_(reduced)


def megatron_blocks_step(cfg: ModelConfig, mesh, batch: int) -> TrainStep:
    """The baseline's N mixer blocks over all domain*tp ranks of the mesh (its model group)."""
    from megatron.core import parallel_state

    from jigsaw_ext import megatron_cpu

    megatron_cpu.install()
    if parallel_state._GLOBAL_MEMORY_BUFFER is None:  # sequence parallelism's all-gather buffer;
        parallel_state._set_global_memory_buffer()  # the only piece of parallel_state it needs
    group = mesh.groups["model"]
    geo = Geometry(cfg, Mesh.single())
    torch.manual_seed(cfg.seed)  # megatron draws each full weight on every rank: same model on every mesh
    blocks = nn.Sequential(
        *(
            MegatronMixerBlock(geo.tokens, cfg.hidden, geo.token_hidden, geo.channel_hidden, group)
            for _ in range(cfg.blocks)
        )
    )
    P, r = group.size(), group.rank()
    if geo.tokens % P:
        raise ValueError(f"the Megatron baseline needs tokens ({geo.tokens}) divisible by domain*tp ({P})")
    mine = slice(r * geo.tokens // P, (r + 1) * geo.tokens // P)
    z, target = _latent(cfg, batch)
    z_local = z.transpose(0, 1)[mine].contiguous().requires_grad_(True)  # [T/P, B, D]
    target_local = target.transpose(0, 1)[mine].contiguous()
    reduce = (lambda: _allreduce_sequence_parallel_grads(blocks, group)) if P > 1 else None
    return TrainStep(blocks, blocks, (z_local,), target_local, target.numel(), after_backward=reduce)


C1 = dict(grid=(720, 1440), patch=(1, 60), hidden=4320, token_fraction=0.5, channel_fraction=1.0, blocks=1)


def megatron_block_bytes(
    tokens: int, hidden: int, batch: int, n: int, elem_bytes: int = 4, regather: bool = True
) -> dict:
    """Bytes one rank sends in one training step of one mixer block under megatron-core TP + SP over
    n ranks (benchmarks/bench_comm.py's docstring derives it): activations, and the small-parameter all-reduce (the two
    LayerNorms' weight and bias and the channel fc2 bias: 5 D elements, one flat all-reduce)."""
    if n == 1:
        return {"activations": 0, "small_params": 0, "total": 0}
    units = 9 if regather else 8
    act = units * (n - 1) * batch * tokens * hidden * elem_bytes // n
    small = 2 * (n - 1) * 5 * hidden * elem_bytes // n
    return {"activations": act, "small_params": small, "total": act + small}


def trace_block(
    cfg: ModelConfig,
    domain: int,
    tp: int,
    batch: int,
    strategy: dict,
    keep: bool = False,
    chunk_mb: float | None = None,
) -> tuple:
    """(trace, strategies) of one training step of one MixerBlock for rank 0 of domain x tp
    (keep: mesh.keep_gathered_weights; chunk_mb: mesh.chunk_mb)."""
    mesh = fake_mesh(
        MeshConfig(domain=domain, tp=tp, strategy=strategy, keep_gathered_weights=keep, chunk_mb=chunk_mb), 0
    )
    geo = Geometry(cfg, mesh)
    block = MixerBlock(geo, batch, device="meta")
    bucket_small_gradients(block, mesh)
    shape = (batch, geo.token_split.size(0), geo.feature_split(cfg.hidden).size(0))
    x = torch.empty(shape, device="meta", requires_grad=True)
    return trace_step(block, lambda m: m(x).square().sum()), resolved_strategies(block)
