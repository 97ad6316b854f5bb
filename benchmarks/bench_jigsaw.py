"""Jigsaw WeatherMixer versus a Megatron tensor + sequence parallel baseline, measured side by side.

    python benchmarks/bench_jigsaw.py [--quick]

Prints one JSON document on stdout (progress goes to stderr). For each mesh (dp x domain x tp) and
weight mode it reports, per rank and maximised over ranks: parameter bytes, bytes saved for backward
in one training step, and bytes sent per training step by collective type; then the step time of the
1x1x1 model against a plain PyTorch MLP-Mixer of identical shapes, and strong scaling on this
machine. Every figure carries its definition, target and pass flag. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from jigsaw_ext.commstats import KINDS, count_comm  # noqa: E402
from jigsaw_ext.mesh import MeshConfig, init_mesh  # noqa: E402
from jigsaw_ext.testing import run_workers  # noqa: E402
from weathermixer.baselines import TrainStep, megatron_blocks_step, ours_blocks_step, ours_step  # noqa: E402
from weathermixer.config import ModelConfig  # noqa: E402
from weathermixer.grid import Geometry  # noqa: E402
from weathermixer.model import WeatherMixer  # noqa: E402

MESHES = [(1, 1, 1), (1, 2, 1), (1, 1, 2), (1, 2, 2), (1, 4, 1), (1, 2, 4)]  # (dp, domain, tp)
WEIGHT_MODES = {  # mode -> mesh settings; block_sharded is the fully sharded policy (weights gathered)
    "block_sharded": dict(replicate_weights_over=[], strategy={"*": "gather"}),
    "replicated": dict(replicate_weights_over=["domain", "tp"], strategy={"*": "gather"}),
    "auto": dict(replicate_weights_over=[], strategy={}),  # what train.py runs: each MLP's cheaper strategy
}
SUFFIX = {"block_sharded": "", "replicated": "_replicated_weights", "auto": "_auto"}
MEDIUM = dict(
    grid=(32, 64), patch=(1, 8), hidden=128, blocks=2, token_fraction=0.5, channel_fraction=1.0, head="tendency", seed=0
)
COMPUTE_BOUND = dict(MEDIUM, hidden=512)
SETTINGS = {  # batch sizes and repetitions; --quick keeps every measurement, with fewer repetitions
    "full": dict(batch=16, overhead_reps=30, scaling_batch=16, scaling_reps=15, warmup=3, matmul_reps=100),
    "quick": dict(batch=8, overhead_reps=10, scaling_batch=6, scaling_reps=4, warmup=2, matmul_reps=30),
}
TARGETS = {
    "parameter_memory": "max-rank parameter bytes / (serial parameter bytes / (domain*tp)) <= 1.05 "
    "(block-sharded weights; replicated weights trade memory for traffic by design)",
    "activation_memory": "max-rank saved-for-backward bytes / (serial / (domain*tp)) <= 1.15",
    "communication": "max-rank bytes sent per step: ours (mixer blocks) / Megatron SP baseline (same blocks) < 1",
    "serial_overhead": "step time WeatherMixer on 1x1x1 / plain PyTorch MLP-Mixer <= 1.10",
    "strong_scaling": "2 ranks x 1 thread versus 1 rank x 1 thread, same global batch: speed-up >= 1.7",
}
PRELOAD = ["weathermixer.model", "weathermixer.baselines", "megatron.core.tensor_parallel", "benchmarks.bench_jigsaw"]


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def mesh_name(mesh) -> str:
    return "x".join(map(str, mesh))


# ------------------------------------------------------------------------------------------------
# What we measure about a training step (weathermixer.baselines.TrainStep)
# ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def saved_for_backward(params):
    """Record the storages autograd saves for backward inside the block: {data_ptr: nbytes}.

    A storage is counted once and whole (a saved view keeps its whole storage alive); parameter
    storages are excluded. The saved tensors are held until the block ends, so no storage is freed
    and its address reused for another one during the count."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    storages, held = {}, []

    def pack(t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in param_ptrs and ptr not in storages:
            storages[ptr] = storage.nbytes()
            held.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield storages
    held.clear()


def measure(step: TrainStep) -> dict:
    """Parameter bytes, saved-for-backward bytes and bytes sent of one training step (after one
    warm-up step, so lazily allocated buffers exist); the local loss terms of both steps."""
    loss_before = step()
    with saved_for_backward(step.params) as saved, count_comm() as comm:
        loss = step()
    return {
        "param_bytes": sum(p.numel() * p.element_size() for p in step.params),
        "activation_bytes": sum(saved.values()),
        "comm": comm.as_dict(),
        "loss_terms": (loss_before, loss),
    }


def time_interleaved(steps: dict, reps: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per step of each named step, alternating the order every repetition; with a process
    group, every rank starts each step together (the slowest rank is taken by the caller)."""
    barrier = dist.barrier if dist.is_initialized() and dist.get_world_size() > 1 else (lambda: None)
    for _ in range(warmup):
        for step in steps.values():
            step()
    names, times = list(steps), {name: [] for name in steps}
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            barrier()
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    return times


class PlainMixer(nn.Module):
    """The same WeatherMixer written as a plain single-process MLP-Mixer: nn.Linear/nn.LayerNorm,
    one embedding of the concatenated [fields || static] patch, decoder on [LN(z) || z0]."""

    def __init__(self, geo: Geometry):
        super().__init__()
        cfg, ch = geo.cfg, geo.cfg.channels
        self.patch, self.cols = cfg.patch, geo.patch_cols
        P, D, T = geo.patch_pixels, cfg.hidden, geo.tokens
        self.embed = nn.Linear((ch.n_fields + ch.n_static) * P, D)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                dict(
                    norm1=nn.LayerNorm(D),
                    token_fc1=nn.Linear(T, geo.token_hidden),
                    token_fc2=nn.Linear(geo.token_hidden, T, bias=False),
                    norm2=nn.LayerNorm(D),
                    channel_fc1=nn.Linear(D, geo.channel_hidden),
                    channel_fc2=nn.Linear(geo.channel_hidden, D),
                )
            )
            for _ in range(cfg.blocks)
        )
        self.norm = nn.LayerNorm(D)
        self.recovery = nn.Linear(2 * D, ch.n_fields * P)

    def patchify(self, x):
        (B, C, H, W), (ph, pw) = x.shape, self.patch
        x = x.reshape(B, C, H // ph, ph, W // pw, pw).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(B, (H // ph) * (W // pw), C * ph * pw)

    def unpatchify(self, tokens, C):
        (B, T, _), (ph, pw) = tokens.shape, self.patch
        rows = T // self.cols
        x = tokens.reshape(B, rows, self.cols, C, ph, pw).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(B, C, rows * ph, self.cols * pw)

    def forward(self, fields, static):
        z0 = self.embed(self.patchify(torch.cat([fields, static], dim=1)))
        z = z0
        for b in self.blocks:
            z = z + b.token_fc2(F.gelu(b.token_fc1(b.norm1(z).transpose(1, 2)))).transpose(1, 2)
            z = z + b.channel_fc2(F.gelu(b.channel_fc1(b.norm2(z))))
        pred = self.recovery(torch.cat([self.norm(z), z0], dim=-1))
        return self.unpatchify(pred, fields.shape[1]) + fields

    @torch.no_grad()
    def load_from(self, ours: WeatherMixer) -> None:
        """Copy the weights of a WeatherMixer built on the 1x1x1 mesh (same logical model)."""

        def linear(dst, src):
            dst.weight.copy_(torch.cat(list(src.weights), dim=1))
            if dst.bias is not None:
                dst.bias.copy_(src.bias)

        def norm(dst, src):
            dst.weight.copy_(src.weights[0])
            dst.bias.copy_(src.biases[0])

        linear(self.embed, ours.embed)
        for b, o in zip(self.blocks, ours.blocks, strict=True):
            norm(b.norm1, o.norm1)
            norm(b.norm2, o.norm2)
            linear(b.token_fc1, o.token_mixing.fc1)
            linear(b.token_fc2, o.token_mixing.fc2)
            linear(b.channel_fc1, o.channel_mixing.fc1)
            linear(b.channel_fc2, o.channel_mixing.fc2)
        norm(self.norm, ours.norm)
        linear(self.recovery, ours.recovery)


# ------------------------------------------------------------------------------------------------
# Workers (run on gloo ranks by jigsaw_ext.testing.run_workers)
# ------------------------------------------------------------------------------------------------
def _footprint_worker(rank, world, mesh_kwargs, model_kwargs, batch, with_baseline):
    mesh = init_mesh(MeshConfig(**mesh_kwargs))
    cfg = ModelConfig(**model_kwargs)
    result = {"ours": measure(ours_step(cfg, mesh, batch)), "ours_blocks": measure(ours_blocks_step(cfg, mesh, batch))}
    if with_baseline:
        result["megatron_sp_blocks"] = measure(megatron_blocks_step(cfg, mesh, batch))
    return result


def _overhead_worker(rank, world, model_kwargs, batch, reps, warmup):
    cfg = ModelConfig(**model_kwargs)
    mesh = init_mesh(MeshConfig())
    ours = ours_step(cfg, mesh, batch)
    plain_model = PlainMixer(ours.model.geo)
    plain_model.load_from(ours.model)
    plain = TrainStep(plain_model, plain_model, ours.inputs, ours.target, ours.count)
    with torch.no_grad():  # the comparison is only fair if both compute the same function
        a, b = ours.model(*ours.inputs), plain_model(*ours.inputs)
        same = ((a - b).abs().max() / b.abs().max()).item()
    times = time_interleaved({"ours": ours, "plain": plain}, reps, warmup)
    return {"times": times, "max_rel_output_diff": same}


def _matmul_worker(rank, world, n, reps):
    """GFLOP/s of this rank's fp32 matmuls while every rank runs them at once: what the machine can give."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    dist.barrier()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e9


def _scaling_worker(rank, world, mesh_kwargs, model_kwargs, batch, reps, warmup):
    from weathermixer.runtime import bind_cores
    from weathermixer.train.engine import keep_freed_blocks

    bind_cores()  # train.py's CPU settings, in every setting alike: 2 ranks each on its own core,
    keep_freed_blocks()  # and freed blocks kept in the heap
    mesh = init_mesh(MeshConfig(**mesh_kwargs))
    step = ours_step(ModelConfig(**model_kwargs), mesh, batch)
    return time_interleaved({"step": step}, reps, warmup)["step"]


# ------------------------------------------------------------------------------------------------
# The report: one function per figure
# ------------------------------------------------------------------------------------------------
BASELINE = {
    "name": "megatron_sp_blocks",
    "definition": "Megatron tensor parallelism + sequence parallelism over all domain*tp ranks of the mesh, from "
    "megatron-core's ColumnParallelLinear/RowParallelLinear with tp_group = our model group and "
    "ModelParallelConfig(use_cpu_initialization=True, gradient_accumulation_fusion=False, "
    "sequence_parallel=True, params_dtype=float32); activations [tokens/P, batch, D] between blocks",
    "channel_mixer": "LN -> ColumnParallel(D->Hc, sequence_parallel: all-gather tokens) -> GELU -> "
    "RowParallel(Hc->D, sequence_parallel: reduce-scatter tokens)",
    "token_mixer": "LN -> gather_from_sequence_parallel_region (all-gather tokens; backward reduce-scatter) -> "
    "transpose -> ColumnParallel(T->Hs, no SP, disable_grad_reduce=True: its partial input gradient "
    "is summed by the gather's reduce-scatter, the cheapest correct choice) -> GELU -> "
    "the RowParallel(Hs->T) weight shard's partial product -> "
    "reduce_scatter_last_dim_to_tensor_parallel_region (reduce-scatter along tokens; backward "
    "all-gather) -> transpose: the sequence-parallel layout again, no all-reduce (a fair baseline)",
    "grad_reduction": "LayerNorm weights/biases and the sequence-parallel RowParallel bias are replicated: their "
    "gradients are all-reduced over the group in one flat all-reduce, as megatron's "
    "finalize_model_grads does (counted)",
    "scope": "mixer blocks only (N pre-norm token- + channel-mixing blocks with the same T, D, Hs, Hc): Megatron "
    "has no layer for our patch embedding/decoder in a sequence-parallel layout. Compare 'ours_blocks' "
    "with 'megatron_sp_blocks'; 'ours' is the whole WeatherMixer (embed, blocks, decoder, head)",
    "cpu_shim": "jigsaw_ext.megatron_cpu.install(); megatron's global memory buffer from "
    "parallel_state._set_global_memory_buffer(), no other parallel_state initialisation",
}
VARIANTS = {
    "ours": "whole WeatherMixer, block-sharded weights",
    "ours_replicated_weights": "whole WeatherMixer, replicate_weights_over=['domain','tp']",
    "ours_blocks": "WeatherMixer's mixer blocks only, block-sharded weights",
    "ours_blocks_replicated_weights": "mixer blocks only, replicated weights",
    "ours_auto": "whole WeatherMixer, mesh.strategy auto (each mixing MLP's cheaper strategy for this "
    "micro-batch: what train.py runs); the other ours* variants gather every weight",
    "ours_blocks_auto": "mixer blocks only, strategy auto",
    "megatron_sp_blocks": "the baseline (mixer blocks only)",
}
OURS = [v for v in VARIANTS if v.startswith("ours")]


def _ratio(a, b):
    return None if not b else round(a / b, 4)


def _run(fn, world, *args, threads=1, timeout=600):
    return run_workers(fn, world, *args, threads=threads, timeout=timeout, preload=PRELOAD)


def _measure_all_meshes(batch: int) -> dict:
    """{mesh: {variant: [per-rank measurements]}} for every mesh, weight mode and variant."""
    out = {}
    for mesh in MESHES:
        dp, domain, tp = mesh
        for mode, settings in WEIGHT_MODES.items():
            start = time.perf_counter()
            # the baseline does not depend on our weight mode: measured once, beside block-sharded weights
            ranks = _run(
                _footprint_worker,
                dp * domain * tp,
                dict(dp=dp, domain=domain, tp=tp, **settings),
                MEDIUM,
                batch,
                mode == "block_sharded",
            )
            for variant in ranks[0]:
                label = variant if variant.startswith("megatron") else variant + SUFFIX[mode]
                out.setdefault(mesh_name(mesh), {})[label] = [r[variant] for r in ranks]
            log(f"mesh {mesh_name(mesh)} {mode}: {time.perf_counter() - start:.1f} s")
    return out


def _memory_figure(runs, key: str, limit: float, target_variants, definition: str, target: str) -> dict:
    """Max-rank `key` bytes of every variant and its ratio to (1x1x1 value) / (domain*tp)."""
    rows, ok = [], True
    for mesh, variants in runs.items():
        P = math.prod(int(n) for n in mesh.split("x")[1:])
        row = {"mesh": mesh}
        for label, ranks in variants.items():
            worst = max(r[key] for r in ranks)
            row[label] = {"max_rank_bytes": worst, "ratio": _ratio(worst, runs["1x1x1"][label][0][key] / P)}
        row["pass"] = all(row[v]["ratio"] <= limit for v in target_variants)
        ok &= row["pass"]
        rows.append(row)
    return {"definition": definition, "target": target, "rows": rows, "pass": ok}


def parameter_figure(runs) -> dict:
    return _memory_figure(
        runs,
        "param_bytes",
        1.05,
        ["ours", "ours_blocks"],
        "bytes of the parameters a rank stores (sum of numel*element_size over model.parameters()), max over "
        "ranks; ratio = max_rank_bytes / (bytes of the same variant on 1x1x1 / (domain*tp))",
        "ratio <= 1.05 for ours and ours_blocks (block-sharded weights; replicated weights trade memory for "
        "traffic by design)",
    )


def activation_figure(runs) -> dict:
    return _memory_figure(
        runs,
        "activation_bytes",
        1.15,
        [v for v in OURS if not v.endswith("_auto")],
        "bytes of the unique tensor storages saved for backward (torch.autograd.graph.saved_tensors_hooks) in one "
        "training step, a storage counted once and whole, parameter storages excluded by data_ptr; all are alive "
        "when the forward pass ends, the peak of this quantity in the step. Max over ranks; ratio = "
        "max_rank_bytes / (same variant on 1x1x1 / (domain*tp))",
        "ratio <= 1.15 for every ours* variant that gathers its weights (the fully sharded policy); the _auto "
        "variants trade activation memory for fewer bytes where their cost model says so (reported)",
    )


def communication_figure(runs) -> dict:
    rows, ok = [], True
    for mesh, variants in runs.items():
        row = {"mesh": mesh}
        for label, ranks in variants.items():
            row[label] = {
                "max_rank_bytes": {k: max(r["comm"]["bytes"][k] for r in ranks) for k in KINDS},
                "max_rank_total": max(r["comm"]["total_bytes"] for r in ranks),
            }
        base = row["megatron_sp_blocks"]["max_rank_total"]
        if base:  # meshes with domain*tp > 1
            row["ours_blocks_over_baseline"] = {
                mode: _ratio(row[label]["max_rank_total"], base)
                for mode, label in (
                    ("block_sharded", "ours_blocks"),
                    ("replicated_weights", "ours_blocks_replicated_weights"),
                    ("auto", "ours_blocks_auto"),
                )
            }
            row["pass"] = all(v < 1 for v in row["ours_blocks_over_baseline"].values())
            ok &= row["pass"]
        rows.append(row)
    return {
        "definition": "bytes a rank sends per training step (forward, backward, gradient reductions), counted by "
        "jigsaw_ext.commstats.count_comm with ring-algorithm volumes over a group of n ranks: "
        "all_gather (n-1)/n x output bytes, reduce_scatter (n-1)/n x input bytes, all_reduce "
        "2(n-1)/n x bytes, all_to_all bytes leaving the rank, send_recv bytes sent; max over ranks "
        "per kind and of the total",
        "target": "ours_blocks_over_baseline < 1 on every mesh with domain*tp > 1, every weight mode",
        "rows": rows,
        "pass": ok,
    }


def sanity_figure(runs) -> dict:
    """The ranks' loss terms add up to the 1x1x1 loss, before and after one SGD step: every variant (the
    baseline included) computes the same function and the same gradients on every mesh."""
    worst = {}  # variant -> worst errors over the meshes
    for variants in runs.values():
        for label, ranks in variants.items():
            before, after = (sum(r["loss_terms"][i] for r in ranks) for i in (0, 1))
            ref_before, ref_after = runs["1x1x1"][label][0]["loss_terms"]
            errors = {
                "loss_rel_err": abs(after - ref_after) / abs(ref_after),
                "loss_drop_rel_err": abs((before - after) - (ref_before - ref_after)) / abs(ref_before - ref_after),
            }
            mine = worst.setdefault(label, dict.fromkeys(errors, 0.0))
            for key, value in errors.items():
                mine[key] = max(mine[key], float(f"{value:.3g}"))
    return {
        "definition": "sum over ranks of the local loss terms versus the same variant on 1x1x1: relative error "
        "of the loss after one SGD step, and of the loss drop that step caused (checks gradients); "
        "worst over the meshes",
        "target": "loss_rel_err < 1e-4 and loss_drop_rel_err < 1e-2",
        "worst": worst,
        "pass": all(v["loss_rel_err"] < 1e-4 and v["loss_drop_rel_err"] < 1e-2 for v in worst.values()),
    }


def serial_overhead_figure(settings) -> dict:
    log("serial overhead: WeatherMixer 1x1x1 versus plain PyTorch MLP-Mixer, interleaved")
    result = _run(_overhead_worker, 1, MEDIUM, settings["batch"], settings["overhead_reps"], settings["warmup"])[0]
    ours, plain = (statistics.median(result["times"][k]) for k in ("ours", "plain"))
    return {
        "definition": "median seconds per training step (forward, backward, SGD) of WeatherMixer on the 1x1x1 "
        "mesh and of a plain nn.Linear/nn.LayerNorm MLP-Mixer with identical shapes and weights, "
        f"1 process x 1 thread, the two alternated every repetition, {settings['overhead_reps']} "
        f"repetitions after {settings['warmup']} warm-up steps",
        "ours_s": round(ours, 5),
        "plain_s": round(plain, 5),
        "ratio": _ratio(ours, plain),
        "max_rel_output_diff": result["max_rel_output_diff"],
        "target": "ratio <= 1.10",
        "pass": ours / plain <= 1.10,
    }


def strong_scaling_figure(settings, hidden: int = COMPUTE_BOUND["hidden"]) -> dict:
    """The strong-scaling figure for the compute-bound model at this width (model.hidden)."""
    model, step_s = dict(COMPUTE_BOUND, hidden=hidden), {}
    for label, (dp, domain, tp), threads in (
        ("1_rank_1_thread", (1, 1, 1), 1),
        ("1_rank_2_threads", (1, 1, 1), 2),
        ("2_ranks_domain_1x2x1", (1, 2, 1), 1),
        ("2_ranks_tp_1x1x2", (1, 1, 2), 1),
    ):
        log(f"strong scaling, hidden {hidden}: {label}")
        per_rank = _run(
            _scaling_worker,
            dp * domain * tp,
            dict(dp=dp, domain=domain, tp=tp),
            model,
            settings["scaling_batch"],
            settings["scaling_reps"],
            settings["warmup"],
            threads=threads,
        )
        step_s[label] = statistics.median(
            max(step) for step in zip(*per_rank, strict=True)
        )  # slowest rank of each step
    log("strong scaling: matmul throughput of 1 and 2 concurrent single-thread processes")
    gflops = {w: sum(_run(_matmul_worker, w, 1024, settings["matmul_reps"])) for w in (1, 2)}
    two_ranks = [k for k in step_s if "ranks" in k]
    speedup = {k: round(step_s["1_rank_1_thread"] / t, 3) for k, t in step_s.items() if k != "1_rank_1_thread"}
    return {
        "hidden": hidden,
        "batch": settings["scaling_batch"],
        "reps": settings["scaling_reps"],
        "definition": "median over steps of the slowest rank's seconds per training step of the compute-bound "
        "model, same global batch; speed-up = time(1 rank x 1 thread) / time(setting); the 2-rank "
        "settings run 1 thread per rank on this machine's 2 cores",
        "step_s": {k: round(v, 4) for k, v in step_s.items()},
        "speedup": speedup,
        "speedup_vs_1_rank_2_threads": {k: round(step_s["1_rank_2_threads"] / step_s[k], 3) for k in two_ranks},
        "machine_matmul_ceiling": {
            "definition": "aggregate fp32 GFLOP/s of 1024^3 matmuls in 2 concurrent 1-thread processes / in 1 "
            "process: the best speed-up this machine gives a compute-bound job on 2 ranks",
            "gflops_1_process": round(gflops[1], 1),
            "gflops_2_processes": round(gflops[2], 1),
            "speedup": round(gflops[2] / gflops[1], 3),
        },
        "target": "speed-up >= 1.7 for both 2-rank settings (1_rank_2_threads is for reference)",
        "pass": all(speedup[k] >= 1.7 for k in two_ranks),
    }


def scaling_widths(settings, widths: list[int]) -> dict:
    """One strong-scaling figure per width; a single width keeps the figure's own layout."""
    if len(widths) == 1:
        return strong_scaling_figure(settings, widths[0])
    by_hidden = {str(h): strong_scaling_figure(settings, h) for h in widths}
    return {"by_hidden": by_hidden, "pass": all(f["pass"] for f in by_hidden.values())}


FIGURES = ("parameter_memory", "activation_memory", "communication", "serial_overhead", "strong_scaling", "sanity")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and smaller batches (< 3 min)")
    ap.add_argument(
        "--figures", default=",".join(FIGURES), help=f"comma-separated subset of {', '.join(FIGURES)} (default: all)"
    )
    ap.add_argument(
        "--scaling-hidden",
        default=str(COMPUTE_BOUND["hidden"]),
        help="strong_scaling: model.hidden values, comma-separated (the paper's width is 4320); with "
        "several, one figure per width under 'by_hidden'",
    )
    ap.add_argument("--scaling-batch", type=int, help="strong_scaling: global batch (default 16, --quick 6)")
    ap.add_argument("--scaling-reps", type=int, help="strong_scaling: timed steps per setting (default 15, --quick 4)")
    args = ap.parse_args(argv)
    figures = [f for f in args.figures.split(",") if f]
    unknown = sorted(set(figures) - set(FIGURES))
    if unknown:
        ap.error(f"--figures: unknown {', '.join(unknown)}; choose from {', '.join(FIGURES)}")
    settings = dict(SETTINGS["quick" if args.quick else "full"])
    settings.update(
        {k: v for k, v in (("scaling_batch", args.scaling_batch), ("scaling_reps", args.scaling_reps)) if v is not None}
    )
    widths = [int(h) for h in args.scaling_hidden.split(",")]
    # stdout carries only the JSON document: anything else (workers inherit fd 1) goes to stderr
    json_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    start, load_start = time.perf_counter(), round(os.getloadavg()[0], 2)
    if load_start > 0.5:
        log(f"warning: load average {load_start} before start: other processes will distort the timings")

    runs = None
    if {"parameter_memory", "activation_memory", "communication", "sanity"} & set(figures):
        log(f"memory and communication on {len(MESHES)} meshes x {len(WEIGHT_MODES)} weight modes")
        runs = _measure_all_meshes(settings["batch"])
    make = {
        "parameter_memory": lambda: parameter_figure(runs),
        "activation_memory": lambda: activation_figure(runs),
        "communication": lambda: communication_figure(runs),
        "serial_overhead": lambda: serial_overhead_figure(settings),
        "strong_scaling": lambda: scaling_widths(settings, widths),
        "sanity": lambda: sanity_figure(runs),
    }
    report = {
        "benchmark": "jigsaw-weathermixer versus megatron-core tensor + sequence parallelism",
        "quick": args.quick,
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "backend": "gloo",
            "threads_per_rank": 1,
        },
        "config": {
            "model": MEDIUM,
            "batch": settings["batch"],
            "meshes_dp_domain_tp": [mesh_name(m) for m in MESHES],
            "weight_modes": WEIGHT_MODES,
            "dtype": "float32",
            "optimizer": "SGD, one step per training step",
            "loss": "mean squared error against a fixed random target",
            "strong_scaling_model": COMPUTE_BOUND,
            "strong_scaling_hidden": widths,
            "strong_scaling_batch": settings["scaling_batch"],
        },
        "baseline": BASELINE,
        "variants": VARIANTS,
        "targets": TARGETS,
    }
    for name in FIGURES:  # in this order, whatever the order asked
        if name in figures:
            report[name] = make[name]()
    report["pass"] = {k: report[k]["pass"] for k in FIGURES if k in report}
    report["machine"]["load_average_1min_at_start_and_end"] = [load_start, round(os.getloadavg()[0], 2)]
    report["machine"]["note"] = "timings are only meaningful on an otherwise idle machine (load average ~0 at start)"
    report["elapsed_s"] = round(time.perf_counter() - start, 1)
    json.dump(report, json_out, indent=1)
    json_out.write("\n")
    json_out.flush()
    log(f"done in {report['elapsed_s']} s: {report['pass']}")
    return 0


if __name__ == "__main__":
    # run the copy importable as benchmarks.bench_jigsaw: workers are pickled by module name
    from benchmarks.bench_jigsaw import main as _main

    sys.exit(_main())
