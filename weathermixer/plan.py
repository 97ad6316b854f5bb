"""Plan a WeatherMixer run on 8 to 8192 GPUs before paying for it.

    python -m weathermixer.plan --preset jigsaw_3b --hardware h100-sxm-8pernode --world 64 256
    python -m weathermixer.plan --config deepspeed_configs/era5_0.25deg_1b.json --hardware h200-8pernode \\
        --world 8 --global-batch 8 --emit-config runs/plan_8.json
    weathermixer-plan ... --json plan.json --top 5 --zero 1 2 --headroom 0.1

For every layout dp x domain x tp of each world size (ZeRO stage, weights stored once or replicated
over one model axis, micro-batch and accumulation for the global batch) it prints the predicted
step time, samples/s, MFU, weak-scaling efficiency against one node, memory per GPU (fits or not)
and the bottleneck, fastest fitting layout first. The numbers come from jigsaw_ext.plan: the
model's own code traced on the meta device (communication, matmul shapes, activations) priced with
a hardware profile (jigsaw_ext/plan/profiles/*.json, or a JSON file; benchmarks/bench_gpu.py
writes one from measurements). `--emit-config` writes the job file of the chosen row, which
`train.py --deepspeed_config` accepts unchanged.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

from jigsaw_ext.files import make_output_folders
from jigsaw_ext.mesh import Mesh, MeshConfig
from jigsaw_ext.plan.cost import Estimate
from jigsaw_ext.plan.hardware import load_hardware, profile_names
from jigsaw_ext.plan.search import Constraints, Planner

from .config import ConfigError, ModelConfig, read_job_file
from .grid import Geometry
from .model.mixer import WeatherMixer, flops_per_sample
from .model.presets import PRESETS

BASE_JOB = "era5_0.25deg_1b"  # the job file a preset's emitted config starts from
DATA_BYTES = 4  # training data on disk: float32


class WeatherPlanModel:
    """jigsaw_ext.plan.PlanModel for a WeatherMixer configuration."""

    def __init__(self, cfg: ModelConfig, rollout: int = 1, name: str = "weathermixer"):
        self.cfg, self.rollout, self.name = cfg, rollout, name

    def trace_key(self) -> str:
        """Everything build and step depend on: planners of this configuration share their traces."""
        return json.dumps({"model": self.cfg.model_dump(mode="json"), "rollout": self.rollout}, sort_keys=True)

    def check_mesh(self, mesh: MeshConfig) -> None:
        Geometry(self.cfg, Mesh.virtual(mesh))

    def build(self, mesh: Mesh, dtype: torch.dtype, micro_batch: int = 1) -> WeatherMixer:
        return WeatherMixer(self.cfg, mesh, device="meta", dtype=dtype, micro_batch=micro_batch)

    def _inputs(self, model: WeatherMixer, mesh: Mesh, batch: int, dtype):
        geo, ch = model.geo, self.cfg.channels
        fields = torch.empty(geo.grid_layout(ch.n_fields, batch).local_shape(mesh.coords), device="meta", dtype=dtype)
        if self.cfg.history:
            fields = fields.unsqueeze(1).expand(-1, self.cfg.history + 1, -1, -1, -1)
        static = (
            torch.empty(geo.grid_layout(ch.n_static, batch).local_shape(mesh.coords), device="meta", dtype=dtype)
            if ch.n_static
            else None
        )
        return fields, static

    def step(self, model: WeatherMixer, mesh: Mesh, micro_batch: int, dtype) -> torch.Tensor:
        fields, static = self._inputs(model, mesh, micro_batch, dtype)
        return model(fields, static, steps=self.rollout).float().square().sum()

    def train_flops_per_sample(self) -> float:
        return 3.0 * flops_per_sample(self.cfg, self.rollout)

    def read_bytes(self, mesh: MeshConfig, micro_batch: int) -> int:
        """Input state(s), static fields and the target(s) of this rank's block, float32 on disk."""
        geo, ch = Geometry(self.cfg, Mesh.virtual(mesh)), self.cfg.channels
        rows, lon = geo.pixel_row_split.size(0), self.cfg.grid[1]
        channels = geo.channel_split(ch.n_fields).size(0) * (self.cfg.history + 1 + self.rollout) + geo.channel_split(
            ch.n_static
        ).size(0)
        return micro_batch * channels * rows * lon * DATA_BYTES


def _model_config(args) -> tuple[ModelConfig, dict]:
    if args.preset:
        base = read_job_file(BASE_JOB)
        base["weathermixer"]["model"] = json.loads(PRESETS[args.preset].model_dump_json())
        return PRESETS[args.preset], base
    base = read_job_file(args.config)
    section = base.get("weathermixer", {})
    return ModelConfig.model_validate(section.get("model", {})), base


def emit_config(base: dict, est: Estimate, path: Path, dtype: str, chunk_mb: float | None = None) -> None:
    """The job file of one planned layout: `base` with its mesh, ZeRO stage, batch and precision set."""
    c, job = est.candidate, copy.deepcopy(base)
    section = job.setdefault("weathermixer", {})
    section["mesh"] = {
        "dp": c.dp,
        "domain": c.domain,
        "tp": c.tp,
        "replicate_weights_over": list(c.replicate),
        "strategy": dict(est.strategies),
    }  # what the plan priced, pinned
    if chunk_mb is not None:
        section["mesh"]["chunk_mb"] = chunk_mb
    job["train_micro_batch_size_per_gpu"] = c.micro_batch
    job["gradient_accumulation_steps"] = c.accumulation
    job.pop("train_batch_size", None)
    zero = job.setdefault("zero_optimization", {})
    zero["stage"] = c.zero
    if c.zero in (1, 2):
        zero["overlap_comm"] = True
    job["bf16"] = {"enabled": dtype == "bfloat16"}
    section.setdefault("log", {})["dir"] = f"runs/plan_{c.world}gpu_{c.mesh}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(job, indent=2) + "\n")


def _short(strategies: dict) -> str:
    """'gat/sta': the token- and channel-mixing strategies of a row."""
    return "/".join(strategies.get(k, "-")[:3] for k in ("token_mixing", "channel_mixing"))


EFFICIENCY_DEFINITION = (
    "eff = weak-scaling efficiency: per-GPU throughput of the row / per-GPU throughput of the best layout on "
    "one node (the fewest whole nodes holding one model group) with the same samples per GPU per step, the "
    "same ZeRO stage and the optimizer state sharded over as many ranks as the row's; that layout set "
    "includes the row's own, so eff <= 100 %."
)
MODE_NAMES = {
    "bf16": "bf16/fp16 tensor-core",
    "tf32": "TF32 (fp32 tensors, train.tf32 on)",
    "fp32": "FP32 (train.tf32 off)",
}


def peak_line(rows: list[Estimate]) -> str:
    e = rows[0]
    return f"MFU against the {MODE_NAMES.get(e.math, e.math)} peak, {e.peak_tflops:g} TFLOP/s per device"


def table(rows: list[Estimate], top: int) -> str:
    head = (
        f"{'#':>3} {'dp x dom x tp':>13} {'ZeRO':>4} {'replicate':>9} {'mb x acc':>8} {'step s':>8} "
        f"{'samples/s':>9} {'MFU':>6} {'eff':>6} {'GB/GPU':>7} {'fits':>4} {'token/chan':>10}  bottleneck"
    )
    lines = [peak_line(rows), head]
    for i, e in enumerate(rows[:top], 1):
        c = e.candidate
        eff = "-" if e.efficiency is None else f"{100 * e.efficiency:.0f}%"
        lines.append(
            f"{i:>3} {c.mesh:>13} {c.zero:>4} {'+'.join(c.replicate) or '-':>9} "
            f"{c.micro_batch:>3} x {c.accumulation:<3} {e.step_s:8.3f} {e.samples_per_s:9.2f} "
            f"{100 * e.mfu:5.1f}% {eff:>6} {e.memory_GB:7.1f} {'yes' if e.fits else 'NO':>4} "
            f"{_short(e.strategies):>10}  {e.bottleneck}"
        )
    return "\n".join(lines)


def parse_args(argv):
    ap = argparse.ArgumentParser(
        allow_abbrev=False,
        prog="python -m weathermixer.plan",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=sorted(PRESETS))
    src.add_argument("--config", help="job JSON file (its weathermixer.model section)")
    ap.add_argument("--hardware", required=True, help=f"profile name ({', '.join(profile_names())}) or JSON file")
    ap.add_argument("--world", type=int, nargs="+", required=True, help="world sizes (GPUs)")
    batch = ap.add_mutually_exclusive_group()
    batch.add_argument("--global-batch", type=int, help="samples per optimizer step (same for every world size)")
    batch.add_argument("--batch-per-node", type=int, default=4, help="weak scaling: global batch = this x nodes")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "fp16"])
    ap.add_argument(
        "--tf32",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train.tf32: fp32 GEMMs in TF32 (priced at, and MFU against, the TF32 peak); default: the "
        "job file's train.tf32, else on for Ampere and newer chips (as the trainer decides)",
    )
    ap.add_argument("--rollout", type=int, default=1, help="latent rollout steps trained per sample")
    ap.add_argument("--zero", type=int, nargs="+", choices=[0, 1, 2, 3], default=[0, 1, 2, 3])
    ap.add_argument("--micro-batches", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--no-replicate", action="store_true", help="only weights stored once per model group")
    ap.add_argument("--headroom", type=float, default=0.0, help="fraction of GPU memory to keep free")
    ap.add_argument(
        "--strategy",
        nargs="*",
        metavar="[KIND=]STRATEGY",
        help="mesh.strategy (token_mixing=stationary, or one strategy for every kind); default: "
        "the job file's mesh.strategy, else auto (each layer's cost model per layout)",
    )
    ap.add_argument(
        "--chunk-mb",
        type=float,
        help="mesh.chunk_mb (gathered weights and partial sums in chunks of "
        "at most this many MiB); default: the job file's",
    )
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--json", help="write every ranked row as JSON here")
    ap.add_argument("--emit-config", help="write the job file of --row of the (last) world size here")
    ap.add_argument("--row", type=int, default=1, help="row of the table for --emit-config (1 = best)")
    ap.add_argument(
        "--sensitivity",
        action="store_true",
        help="also print how each printed row moves when each unmeasured figure is halved and doubled",
    )
    ap.add_argument("--sensitivity-rows", type=int, default=3, help="rows per world size in --sensitivity")
    args = ap.parse_args(argv)
    if args.top < 1:
        ap.error("--top must be at least 1")
    make_output_folders(ap, {"--json": args.json, "--emit-config": args.emit_config})
    return args


def plan(args) -> tuple[dict, Planner, dict]:
    cfg, base = _model_config(args)
    hw = load_hardware(args.hardware)
    if args.strategy is not None:
        strategy = dict(item.split("=", 1) if "=" in item else ("*", item) for item in args.strategy)
    else:
        strategy = base.get("weathermixer", {}).get("mesh", {}).get("strategy", {})
    chunk_mb = (
        args.chunk_mb if args.chunk_mb is not None else base.get("weathermixer", {}).get("mesh", {}).get("chunk_mb")
    )
    MeshConfig(strategy=strategy, chunk_mb=chunk_mb)  # validates them (a ValidationError is a ValueError)
    tf32 = args.tf32 if args.tf32 is not None else base.get("weathermixer", {}).get("train", {}).get("tf32")
    planner = Planner(
        WeatherPlanModel(cfg, args.rollout), hw, args.dtype, strategy=strategy, chunk_mb=chunk_mb, tf32=tf32
    )
    limits = Constraints(
        zero=tuple(args.zero),
        micro_batches=tuple(args.micro_batches),
        replicate=not args.no_replicate,
        headroom=args.headroom,
    )
    results = {}
    for world in args.world:
        nodes = max(1, -(-world // hw.devices_per_node))
        gb = args.global_batch or args.batch_per_node * nodes
        rows = planner.rank(world, gb, limits)
        if not rows:
            raise ConfigError(f"no layout of {world} GPUs divides global batch {gb}: change --global-batch")
        for e in rows[: args.top]:
            e.efficiency = planner.efficiency(e, limits)
        results[world] = {"global_batch": gb, "rows": rows, "limits": limits}
    return results, planner, base


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        results, planner, base = plan(args)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    hw = planner.hw
    for world, res in results.items():
        print(
            f"\n{world} x {hw.name}  global batch {res['global_batch']}  dtype {planner.dtype}  "
            f"tf32 {'on' if planner.tf32 else 'off'}"
        )
        print(table(res["rows"], args.top))
    print(f"\n{EFFICIENCY_DEFINITION}")
    if args.sensitivity:
        from jigsaw_ext.plan.sensitivity import sensitivity, sensitivity_table

        for world, res in results.items():
            rows = res["rows"][: min(args.top, args.sensitivity_rows)]
            res["sensitivity"] = sensitivity(planner, rows, res["limits"])
            print(f"\nsensitivity, {world} GPUs: MFU / eff of each row with one unmeasured figure x0.5 and x2")
            print(sensitivity_table(rows, res["sensitivity"]))
    if args.json:
        doc = {
            "hardware": hw.model_dump(),
            "model": planner.model.cfg.model_dump(),
            "dtype": planner.dtype,
            "tf32": planner.tf32,
            "efficiency_definition": EFFICIENCY_DEFINITION,
            "worlds": {
                str(w): {
                    "global_batch": r["global_batch"],
                    "rows": [e.as_dict() for e in r["rows"]],
                    **({"sensitivity": r["sensitivity"]} if "sensitivity" in r else {}),
                }
                for w, r in results.items()
            },
        }
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    if args.emit_config:
        rows = results[args.world[-1]]["rows"]
        if not 1 <= args.row <= len(rows):
            print(f"error: --row {args.row}: the table has {len(rows)} rows", file=sys.stderr)
            return 2
        emit_config(base, rows[args.row - 1], Path(args.emit_config), planner.dtype, planner.chunk_mb)
        print(f"\nwrote {args.emit_config} (row {args.row} of {args.world[-1]} GPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
