"""The training job through its real entry points: loss-curve equality over meshes, ZeRO stages and
precisions, per-rank memory by kind under ZeRO 0-3, and throughput of the quickstart model.

    python benchmarks/bench_train.py [--quick] [--out FILE] [--data-dir DIR] [--parts loss_curves,memory,throughput]

Prints one JSON document on stdout (progress goes to stderr). Three figures:

  loss_curves  train.py launched with torchrun (plain python for one process) on every mesh and
               variant; per-step training loss from metrics.csv versus the 1x1x1 fp32 ZeRO-0 run
  memory       Trainer built inside jigsaw_ext.testing.run_workers ranks; two micro-steps by hand;
               every live tensor storage after the second backward (before engine.step) classified
               as parameters / gradients / optimizer state / DeepSpeed buffers / other
  throughput   samples/s and TFLOP/s per rank from metrics.csv, the meshes alternated in one run

The synthetic data (the quickstart's store) are written once into --data-dir (default: a temporary
directory removed at the end). See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import math
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from jigsaw_ext.files import make_output_folders  # noqa: E402
from jigsaw_ext.testing import run_workers  # noqa: E402

CONFIG = ROOT / "deepspeed_configs" / "quickstart_cpu.json"
GLOBAL_BATCH = 8
# every run: a CSV row per step, validation only at the end (8 samples), no TensorBoard/plot/checkpoint
# (checkpoint.best=false as well: with best=true the end-of-run validation writes a checkpoint even
# with checkpoint.at_end=false)
RUN_SETTINGS = [
    "log.every=1",
    "validation.every=0",
    "validation.samples=8",
    "log.tensorboard=false",
    "log.plot=false",
    "checkpoint.every=0",
    "checkpoint.at_end=false",
    "checkpoint.best=false",
]
QUICK_DATA = ["data.end=2020-01-20 18:00", "data.val_start=2020-01-17"]  # 20 days instead of 4 months
LOSS_TARGET = 1e-5

# (label, ZeRO stage, precision, held to the target?)
LOSS_VARIANTS = [
    ("fp32_zero0", 0, "fp32", True),
    ("fp32_zero1", 1, "fp32", True),
    ("fp32_zero2", 2, "fp32", True),
    ("fp32_zero3", 3, "fp32", False),
    ("bf16_zero0", 0, "bf16", False),
    ("bf16_zero2", 2, "bf16", False),
]
MEMORY_HIDDEN = 256
# (label, ZeRO stage, extra settings); ZeRO-3 keeps parameters below stage3_param_persistence_threshold
# (DeepSpeed's default 1e5 elements: every parameter of this model) whole on every rank, so it is
# measured with the default and with the threshold at 0
MEMORY_VARIANTS = [
    ("zero0", 0, []),
    ("zero1", 1, []),
    ("zero2", 2, []),
    ("zero3", 3, []),
    ("zero3_persistence0", 3, ["ds.zero_optimization.stage3_param_persistence_threshold=0"]),
]
PRELOAD = [
    "deepspeed",
    "megatron.core",
    "weathermixer.train.trainer",
    "benchmarks.bench_train",
]  # imported once, forked
LOSS_MESHES = [(1, 1, 1), (1, 2, 2), (2, 1, 2), (4, 1, 1)]
SETTINGS = {
    "full": dict(
        loss_steps=20,
        loss_runs=[(v[0], mesh) for v in LOSS_VARIANTS for mesh in LOSS_MESHES],
        memory_meshes=[(1, 2, 2), (2, 2, 2)],
        memory_variants=[v[0] for v in MEMORY_VARIANTS],
        throughput_steps=30,
        throughput_log_every=5,
        throughput_reps=3,
    ),
    "quick": dict(
        loss_steps=3,
        loss_runs=[("fp32_zero0", (1, 1, 1)), ("fp32_zero2", (1, 2, 2))],
        memory_meshes=[(2, 1, 1)],
        memory_variants=["zero0", "zero2"],
        throughput_steps=6,
        throughput_log_every=2,
        throughput_reps=1,
    ),
}
PARTS = ("loss_curves", "memory", "throughput")
# throughput settings: (label, mesh, threads per rank); 1x1x1 with 2 threads is what the trainer picks
# on an idle 2-core machine (cores // local ranks), 1x2x2 gets 1 thread per rank
THROUGHPUT_RUNS = [("1x1x1_2threads", (1, 1, 1), 2), ("1x1x1_1thread", (1, 1, 1), 1), ("1x2x2_1thread", (1, 2, 2), 1)]


def log(msg: str) -> None:
    print(f"[bench_train] {msg}", file=sys.stderr, flush=True)


def mesh_name(mesh) -> str:
    return "x".join(map(str, mesh))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def _sig(x: float | None, digits: int = 4):
    return None if x is None else float(f"{x:.{digits}g}")


# ------------------------------------------------------------------------------------------------
# train.py runs
# ------------------------------------------------------------------------------------------------
def mesh_settings(mesh) -> list[str]:
    dp, domain, tp = mesh
    if GLOBAL_BATCH % dp:
        raise ValueError(f"global batch {GLOBAL_BATCH} is not divisible by dp={dp}")
    return [
        f"mesh.dp={dp}",
        f"mesh.domain={domain}",
        f"mesh.tp={tp}",
        f"ds.train_micro_batch_size_per_gpu={GLOBAL_BATCH // dp}",
        "ds.gradient_accumulation_steps=1",
    ]


def variant_settings(stage: int, precision: str) -> list[str]:
    return [f"ds.zero_optimization.stage={stage}", f"ds.bf16.enabled={'true' if precision == 'bf16' else 'false'}"]


def train(mesh, settings: list[str], out: Path, threads: int = 1, timeout: float = 600) -> dict:
    """Launch train.py on dp*domain*tp processes; the per-step rows of its metrics.csv."""
    nproc = math.prod(mesh)
    args = ["train.py", "--deepspeed_config", str(CONFIG), "--output-dir", str(out), "--resume", "never"]
    for s in mesh_settings(mesh) + settings:
        args += ["--set", s]
    if nproc == 1:
        cmd = [sys.executable, *args]  # train.py sets up a world of one itself
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_port",
            str(_free_port()),
            *args,
        ]
    env = dict(
        os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads), DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES=""
    )
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    start = time.perf_counter()
    try:
        run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        code, tail = run.returncode, (run.stdout[-1500:] + run.stderr[-2500:])
    except subprocess.TimeoutExpired as e:
        code, tail = "timeout", str(e)[-2000:]
    wall = time.perf_counter() - start
    rows = {}
    csv_path = out / "metrics.csv"
    if code == 0 and csv_path.exists():
        with open(csv_path, newline="") as f:
            rows = {int(r["step"]): r for r in csv.DictReader(f) if r["kind"] == "train"}
    result = {
        "mesh": mesh_name(mesh),
        "processes": nproc,
        "threads_per_rank": threads,
        "wall_s": round(wall, 1),
        "rows": rows,
    }
    if code != 0:
        result["error"] = {"exit_code": code, "output_tail": tail}
    return result


# ------------------------------------------------------------------------------------------------
# Figure 1: loss curves
# ------------------------------------------------------------------------------------------------
def loss_curves_figure(cfg: dict, base: list[str], work: Path) -> dict:
    variants = {v[0]: v for v in LOSS_VARIANTS}
    runs = {}
    for label, mesh in cfg["loss_runs"]:  # grouped by variant: one DeepSpeed setting at a time
        _, stage, precision, _ = variants[label]
        name = f"{mesh_name(mesh)}_{label}"
        r = train(
            mesh, base + variant_settings(stage, precision) + [f"train.steps={cfg['loss_steps']}"], work / "loss" / name
        )
        r["losses"] = {s: float(row["loss"]) for s, row in sorted(r.pop("rows").items())}
        runs[(label, mesh_name(mesh))] = r
        log(f"loss curve {name}: {r['wall_s']} s" + (f" FAILED ({r['error']['exit_code']})" if "error" in r else ""))

    ref = runs[("fp32_zero0", "1x1x1")]
    if "error" in ref or len(ref["losses"]) != cfg["loss_steps"]:
        raise RuntimeError(f"the 1x1x1 fp32 ZeRO-0 reference run failed: {ref.get('error')}")

    def max_rel(losses, reference):
        if sorted(losses) != sorted(reference["losses"]):
            return None
        return max(_rel(losses[s], reference["losses"][s]) for s in losses)

    rows, worst_target = [], 0.0
    for (label, mesh), r in runs.items():
        _, stage, precision, held = variants[label]
        row = {
            "variant": label,
            "zero_stage": stage,
            "precision": precision,
            "mesh": mesh,
            "micro_batch": GLOBAL_BATCH // int(mesh.split("x")[0]),
            "wall_s": r["wall_s"],
        }
        if "error" in r:
            row["error"] = r["error"]
            if held:
                worst_target = math.inf
            rows.append(row)
            continue
        row["max_rel_diff_vs_1x1x1_fp32_zero0"] = _sig(max_rel(r["losses"], ref), 3)
        same = runs.get((label, "1x1x1"))
        if label != "fp32_zero0" and mesh != "1x1x1" and same and "error" not in same:
            row["max_rel_diff_vs_1x1x1_same_variant"] = _sig(max_rel(r["losses"], same), 3)
        row["final_loss"] = _sig(r["losses"][max(r["losses"])], 6)
        if held:
            d = row["max_rel_diff_vs_1x1x1_fp32_zero0"]
            worst_target = max(worst_target, math.inf if d is None else d)
        rows.append(row)
    return {
        "definition": f"train.py on each mesh (dp x domain x tp) with global batch {GLOBAL_BATCH} (micro batch "
        f"{GLOBAL_BATCH}/dp, no accumulation), the same seed and {cfg['loss_steps']} steps of the "
        "quickstart (rollout k drawn from 1..K per step as in the config); max over steps of "
        "|loss - loss_ref| / |loss_ref| with loss_ref = the 1x1x1 fp32 ZeRO-0 run (the per-step "
        "training loss that metrics.csv logs with log.every=1). Variants not held to the target "
        "(ZeRO-3, bf16) are reported as measured, also against their own 1x1x1 run",
        "settings": RUN_SETTINGS,
        "target": f"max_rel_diff_vs_1x1x1_fp32_zero0 <= {LOSS_TARGET:g} for fp32 ZeRO 0/1/2 on every mesh",
        "reference_losses": {str(s): v for s, v in ref["losses"].items()},
        "rows": rows,
        "worst_fp32_zero012": worst_target if math.isfinite(worst_target) else "a run failed or missed steps",
        "pass": worst_target <= LOSS_TARGET,
    }


# ------------------------------------------------------------------------------------------------
# Figure 2: memory by kind, measured inside the ranks
# ------------------------------------------------------------------------------------------------
KINDS = ("parameters", "gradients", "optimizer_state", "deepspeed_buffers", "other")
MASTER_COPIES = ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition")


def _tensors(obj, path: str, depth: int = 0, seen: set | None = None):
    """(path, tensor) for every tensor reachable from obj through containers and DeepSpeed's own
    objects (not through nn.Modules or other libraries' objects)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth > 8:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield path, obj
        if obj.grad is not None:
            yield f"{path}.grad", obj.grad
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(k, f"{path}[key]", depth + 1, seen)
            yield from _tensors(v, f"{path}[{k if isinstance(k, (int, str)) else type(k).__name__}]", depth + 1, seen)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{path}[{i}]", depth + 1, seen)
    elif (
        not isinstance(obj, torch.nn.Module)
        and type(obj).__module__.startswith("deepspeed")
        and hasattr(obj, "__dict__")
    ):
        for k, v in vars(obj).items():
            yield from _tensors(v, f"{path}.{k}", depth + 1, seen)


class StorageCensus:
    """Every live tensor storage counted once (by the address of its data), in the first kind it is
    claimed for: claim parameters first, then gradients, then optimizer state, then the rest."""

    def __init__(self):
        self.kind, self.nbytes, self.where = {}, {}, {}

    def claim(self, t, kind: str, where: str = "") -> None:
        if not isinstance(t, torch.Tensor) or t.is_meta or t.layout != torch.strided:
            return
        storage = t.untyped_storage()
        ptr, n = storage.data_ptr(), storage.nbytes()
        if n == 0 or ptr in self.kind:
            return
        self.kind[ptr], self.nbytes[ptr], self.where[ptr] = kind, n, where or f"{tuple(t.shape)} {t.dtype}"

    def totals(self) -> dict:
        out = dict.fromkeys(KINDS, 0)
        for ptr, kind in self.kind.items():
            out[kind] += self.nbytes[ptr]
        return out

    def largest(self, kind: str, n: int = 3) -> list:
        ptrs = sorted((p for p, k in self.kind.items() if k == kind), key=lambda p: -self.nbytes[p])[:n]
        return [[self.where[p], self.nbytes[p]] for p in ptrs]


def _claim_model(c: StorageCensus, params: list) -> None:
    for p in params:  # ZeRO-3: ds_tensor is the partition, p.data empty (or whole if the parameter is persistent)
        c.claim(getattr(p, "ds_tensor", None), "parameters")
        c.claim(p, "parameters")
    for p in params:
        c.claim(p.grad, "gradients")


def _claim_optimizer(c: StorageCensus, opt, base) -> None:
    for name, value in vars(opt).items():  # ZeRO gradient partitions and accumulators
        if "grad" in name.lower():
            for path, t in _tensors(value, f"optimizer.{name}"):
                c.claim(t, "gradients", path)
    for state in base.state.values():
        for key, t in state.items():
            c.claim(t, "optimizer_state", f"optimizer state {key}")
    for name in MASTER_COPIES:
        for path, t in _tensors(getattr(opt, name, None), f"optimizer.{name}"):
            c.claim(t, "optimizer_state", path)
    for group in base.param_groups:  # the tensors the base optimizer updates (ZeRO: the fp32 partitions)
        for t in group["params"]:
            c.claim(t, "optimizer_state", "base optimizer param (master weights)")
    for path, t in _tensors(opt, "optimizer"):
        c.claim(t, "deepspeed_buffers", path)


def _claim_the_rest(c: StorageCensus) -> None:
    gc.collect()
    with warnings.catch_warnings():  # isinstance() on deprecated module proxies warns
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            try:
                if isinstance(obj, torch.Tensor):
                    c.claim(obj, "other")
            except Exception:  # noqa: BLE001 - some exotic objects fail isinstance checks
                pass


def census(trainer) -> dict:
    """Every tensor storage alive mid-step, claimed once, in this order: parameters, gradients,
    optimizer state, DeepSpeed's buffers, then anything else the heap holds."""
    engine, model = trainer.engine, trainer.engine.module
    opt = engine.optimizer
    base = opt.optimizer if isinstance(getattr(opt, "optimizer", None), torch.optim.Optimizer) else opt
    c = StorageCensus()
    params = list(model.parameters())
    _claim_model(c, params)
    _claim_optimizer(c, opt, base)
    _claim_the_rest(c)
    local_numel = sum(int(getattr(p, "ds_numel", p.numel())) for p in params)
    return {
        "bytes": c.totals(),
        "local_param_numel": local_numel,
        "largest": {kind: c.largest(kind, 3) for kind in KINDS},
        "optimizer": type(opt).__name__,
        "base_optimizer": type(base).__name__,
    }


def _memory_worker(rank, world, settings):
    from weathermixer.train.config import load_train_job
    from weathermixer.train.job import check_job
    from weathermixer.train.trainer import Trainer

    job, ds = load_train_job(CONFIG, settings=settings)
    ds = check_job(job, ds, world, torch.cuda.is_available())
    trainer = Trainer(job, ds, log=lambda *a, **k: None)
    trainer._setup()
    batches = iter(trainer.train_data)
    trainer.engine.train()
    result = None
    for step in (1, 2):
        loss = trainer.micro_step_loss(next(batches), trainer.rollout_length(step))  # as in Trainer.run
        trainer.engine.backward(loss)
        del loss
        if step == 2:  # optimizer state exists (step 1 was taken), this step's gradients are alive
            result = census(trainer)
        trainer.engine.step()
    trainer.train_data.stop()
    return result


def _expected(stage: int, psi: float, dp: int) -> dict:
    """fp32 AdamW, psi = bytes of this rank's share of the model (logical bytes / model-group size).
    DeepSpeed's ZeRO optimizers keep an fp32 master copy of their partition even in fp32 training."""
    return {
        "parameters": psi / dp if stage >= 3 else psi,
        "gradients": psi / dp if stage >= 2 else psi,
        "optimizer_state": 3 * psi / dp if stage >= 1 else 2 * psi,
    }


def memory_figure(cfg: dict, base: list[str], work: Path) -> dict:
    from weathermixer.model import num_parameters
    from weathermixer.train.config import load_train_job

    settings = base + [f"model.hidden={MEMORY_HIDDEN}"]
    job, _ = load_train_job(CONFIG, settings=settings)
    logical = num_parameters(job.model) * 4
    rows = []
    for mesh in cfg["memory_meshes"]:
        dp, domain, tp = mesh
        psi = logical / (domain * tp)
        for label, stage, extra in (v for v in MEMORY_VARIANTS if v[0] in cfg["memory_variants"]):
            start = time.perf_counter()
            ranks = run_workers(
                _memory_worker,
                dp * domain * tp,
                settings
                + mesh_settings(mesh)
                + variant_settings(stage, "fp32")
                + extra
                + [f"log.dir={work / 'memory' / mesh_name(mesh)}_{label}"],
                timeout=600,
                preload=PRELOAD,
                env={"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"},
            )
            expected = _expected(stage, psi, dp)
            per_kind = {kind: [r["bytes"][kind] for r in ranks] for kind in KINDS}
            row = {
                "mesh": mesh_name(mesh),
                "variant": label,
                "zero_stage": stage,
                "extra_settings": extra,
                "optimizer": ranks[0]["optimizer"],
                "per_rank_bytes": per_kind,
                "max_bytes": {k: max(v) for k, v in per_kind.items()},
                "min_bytes": {k: min(v) for k, v in per_kind.items()},
                "expected_bytes": {k: round(v) for k, v in expected.items()},
                "max_over_expected": {k: _sig(max(per_kind[k]) / v, 3) for k, v in expected.items()},
                "local_param_numel": [r["local_param_numel"] for r in ranks],
                "largest_storages_rank0": ranks[0]["largest"],
            }
            rows.append(row)
            log(f"memory {mesh_name(mesh)} {label}: {time.perf_counter() - start:.1f} s; max bytes {row['max_bytes']}")
    zero0 = {r["mesh"]: r for r in rows if r["variant"] == "zero0"}
    for row in rows:
        if row["mesh"] in zero0:
            row["max_over_zero0_same_mesh"] = {
                k: _sig(row["max_bytes"][k] / zero0[row["mesh"]]["max_bytes"][k], 3)
                for k in ("parameters", "gradients", "optimizer_state")
            }
    return {
        "definition": "Trainer(job, ds)._setup() on run_workers ranks (gloo, 1 thread per rank), two training "
        "micro-steps by hand as in Trainer.run; after the second engine.backward and before its "
        "engine.step, every live tensor storage (deduplicated by untyped_storage().data_ptr(), whole "
        "storage counted) is classified, first match wins: parameters (model parameters' storages; "
        "ZeRO-3: p.ds_tensor, plus p.data where a parameter is kept whole), gradients (p.grad and "
        "tensors reachable from DeepSpeed optimizer attributes whose name contains 'grad'), "
        "optimizer_state (base optimizer state, fp32 master partitions "
        f"{list(MASTER_COPIES)}, the base optimizer's own params), deepspeed_buffers (any other "
        "tensor reachable from the DeepSpeed optimizer, e.g. ZeRO reduction buckets) and other "
        "(every remaining tensor in gc.get_objects(): data batches in the loader's prefetch queue, "
        "latitude/channel weights, the model's own buffers). Bytes are allocated storage sizes, "
        "not resident memory",
        "model": {
            "hidden": MEMORY_HIDDEN,
            "logical_parameters": logical // 4,
            "logical_bytes_fp32": logical,
            "note": f"the quickstart model with model.hidden={MEMORY_HIDDEN} (else as in the config)",
        },
        "expected": "psi = logical bytes / (domain*tp); fp32 AdamW: parameters psi (ZeRO-3: psi/dp), gradients "
        "psi (ZeRO>=2: psi/dp), optimizer state 2 psi (exp_avg, exp_avg_sq; ZeRO>=1: 3 psi/dp, "
        "the fp32 master partition included). ZeRO partitions over dp only: on 1x2x2 (dp=1) stages "
        "1-3 cannot save anything",
        "rows": rows,
    }


# ------------------------------------------------------------------------------------------------
# Figure 3: throughput
# ------------------------------------------------------------------------------------------------
def _windows(rows: dict, skip_first: bool = True) -> dict:
    """Samples/s and TFLOP/s per rank over the logged windows (after the first): total samples over
    total seconds, each window's seconds recovered as samples / rate."""
    steps = sorted(rows)[1:] if skip_first else sorted(rows)
    prev = dict(zip(sorted(rows)[1:], sorted(rows), strict=False))
    seconds = samples = tflop_s = 0.0
    for s in steps:
        n = (s - prev.get(s, 0)) * GLOBAL_BATCH
        rate, tf = float(rows[s]["samples_per_s"]), float(rows[s]["tflops_per_rank"])
        t = n / rate
        seconds, samples, tflop_s = seconds + t, samples + n, tflop_s + tf * t
    return {
        "samples_per_s": samples / seconds,
        "tflops_per_rank": tflop_s / seconds,
        "seconds": seconds,
        "windows": len(steps),
    }


def throughput_figure(cfg: dict, base: list[str], work: Path) -> dict:
    steps, every, reps = cfg["throughput_steps"], cfg["throughput_log_every"], cfg["throughput_reps"]
    settings = base + variant_settings(0, "fp32") + [f"train.steps={steps}", f"log.every={every}"]
    measured = {label: [] for label, _, _ in THROUGHPUT_RUNS}
    for rep in range(reps):
        order = THROUGHPUT_RUNS if rep % 2 == 0 else THROUGHPUT_RUNS[::-1]
        for label, mesh, threads in order:
            r = train(mesh, settings, work / "throughput" / f"{label}_{rep}", threads=threads)
            if "error" in r:
                raise RuntimeError(f"throughput run {label} failed: {r['error']}")
            measured[label].append(_windows(r.pop("rows")))
            log(f"throughput {label} rep {rep}: {measured[label][-1]['samples_per_s']:.2f} samples/s")
    summary = {}
    for label, mesh, threads in THROUGHPUT_RUNS:
        m = measured[label]
        summary[label] = {
            "mesh": mesh_name(mesh),
            "ranks": math.prod(mesh),
            "threads_per_rank": threads,
            "samples_per_s": _sig(statistics.median(x["samples_per_s"] for x in m)),
            "tflops_per_rank": _sig(statistics.median(x["tflops_per_rank"] for x in m)),
            "samples_per_s_per_rep": [_sig(x["samples_per_s"]) for x in m],
            "timed_seconds_per_rep": [round(x["seconds"], 2) for x in m],
        }

    def ratio(a, b, key="samples_per_s"):
        return _sig(statistics.median(x[key] / y[key] for x, y in zip(measured[a], measured[b], strict=True)), 3)

    return {
        "definition": f"quickstart model, ZeRO-0 fp32, global batch {GLOBAL_BATCH}, {steps} steps logged every "
        f"{every} (log.every={every}); samples/s = samples / seconds over the logged windows after "
        "the first (warm-up excluded, validation excluded by the trainer), TFLOP/s per rank = "
        "Trainer's model FLOPs (3 x forward matmuls) / seconds / world size; the settings "
        f"alternated (order reversed every repetition), {reps} repetition(s), medians",
        "runs": summary,
        "ratios": {
            "samples_per_s_1x2x2_over_1x1x1_2threads": ratio("1x2x2_1thread", "1x1x1_2threads"),
            "samples_per_s_1x2x2_over_1x1x1_1thread": ratio("1x2x2_1thread", "1x1x1_1thread"),
            "tflops_per_rank_1x2x2_over_1x1x1_2threads": ratio("1x2x2_1thread", "1x1x1_2threads", "tflops_per_rank"),
        },
        "note": "4 ranks share 2 cores on this machine (oversubscribed): the ratio measures the overhead of the "
        "domain x tp decomposition of a small model, not the scaling it would have on 4 devices",
    }


# ------------------------------------------------------------------------------------------------
def prepare_data(base: list[str]) -> float:
    """Write the synthetic store and its statistics once, before any run (as rank 0 would)."""
    from weathermixer.train.config import load_train_job
    from weathermixer.train.job import prepare_data as write

    job, _ = load_train_job(CONFIG, settings=base)
    start = time.perf_counter()
    write(job, rank=0)
    return time.perf_counter() - start


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="2 meshes x 2 variants x 3 steps on 20 days of data, memory on 2x1x1 ZeRO 0/2, one short throughput pass",
    )
    ap.add_argument("--out", help="also write the JSON document to this file")
    ap.add_argument(
        "--data-dir",
        help="directory for the synthetic store (kept and reused); default: a temporary directory removed at the end",
    )
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    args = ap.parse_args(argv)
    make_output_folders(ap, {"--out": args.out})
    parts = [p for p in args.parts.split(",") if p]
    if unknown := set(parts) - set(PARTS):
        ap.error(f"--parts: unknown {sorted(unknown)}; allowed: {', '.join(PARTS)}")
    cfg = SETTINGS["quick" if args.quick else "full"]
    # stdout carries only the JSON document: anything else (workers inherit fd 1) goes to stderr
    json_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    start, load_start = time.perf_counter(), round(os.getloadavg()[0], 2)
    if load_start > 0.5:
        log(f"warning: load average {load_start} before start: other processes will distort the timings")

    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    data_dir = Path(args.data_dir) if args.data_dir else work / "synthetic"
    base = RUN_SETTINGS + [f"data.path={data_dir.resolve()}"] + (QUICK_DATA if args.quick else [])
    try:
        log(f"synthetic data in {data_dir}")
        data_s = prepare_data(base)
        report = {
            "benchmark": "training job: loss-curve equality, per-rank memory by kind, throughput",
            "quick": args.quick,
            "machine": {
                "cpus": os.cpu_count(),
                "processor": platform.processor() or platform.machine(),
                "torch": torch.__version__,
                "deepspeed": _version("deepspeed"),
                "backend": "gloo",
            },
            "config": {
                "file": str(CONFIG.relative_to(ROOT)),
                "global_batch": GLOBAL_BATCH,
                "base_settings": base,
                "data_write_s": round(data_s, 1),
            },
        }
        figures = {"loss_curves": loss_curves_figure, "memory": memory_figure, "throughput": throughput_figure}
        for part in parts:
            log(f"--- {part}")
            report[part] = figures[part](cfg, base, work)
        report["pass"] = {"loss_curves": report["loss_curves"]["pass"]} if "loss_curves" in report else {}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["machine"]["load_average_1min_at_start_and_end"] = [load_start, round(os.getloadavg()[0], 2)]
    report["machine"]["note"] = "shared 2-core host: timings are ratios of runs alternated in one invocation"
    report["elapsed_s"] = round(time.perf_counter() - start, 1)
    text = json.dumps(report, indent=1)
    json_out.write(text + "\n")
    json_out.flush()
    if args.out:
        Path(args.out).write_text(text + "\n")
    log(f"done in {report['elapsed_s']} s: {report['pass']}")
    return 0


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    # run the copy importable as benchmarks.bench_train: workers are pickled by module name
    from benchmarks.bench_train import main as _main

    sys.exit(_main())
