"""DeepSpeed's native checkpoint versus ours (layout-free, jigsaw_ext.checkpoint.layout_free), on real
engines: save wall time, load time on the same mesh, load time on another mesh (ours only: a
DeepSpeed checkpoint cannot be loaded there), peak memory per rank, bytes on disk. Prints JSON.

    python benchmarks/bench_checkpoint.py --blocks 1 --mesh 1x2x2 --other 2x1x2       # 391 M parameters
    python benchmarks/bench_checkpoint.py --blocks 1 --mesh 2x2x2 --other 1x2x2
    python benchmarks/bench_checkpoint.py --preset small --mesh 1x2x2 --other 2x1x2   # a quick run

The model is the paper's WeatherMixer (`paper_1b`, 1.06 B parameters at 3 blocks; `--blocks 1` keeps
its 0.25 deg embedding and head: 391 M), random weights and random AdamW moments, ZeRO-1 fp32 with
torch's AdamW, one CPU process per rank (gloo). Each phase starts after a barrier and ends after one;
its time is the slowest rank's; each phase runs --repeat times (alternating DeepSpeed's and ours)
and the fastest run is reported, since the machine is shared. Neither DeepSpeed's torch.save nor ours
fsyncs the data files (the trainer's MANIFEST.json checksums catch data a power cut lost);
`ours_save_with_fsync` is ours with DCP's fsync, measured last so that its writes do not evict the
other files from the page cache.
Memory: every rank samples its RssAnon (/proc/self/status) every 10 ms; `peak_extra` of a phase is its
peak minus the rank's RssAnon just before it (the rank's own share: parameters, master weights,
moments), to be compared with the largest single tensor (fp32).
Per-rank engines of the 1.06 B model need about 17 GB at 1x2x2 before any checkpoint buffer, more
than this 24 GB machine shared with other jobs can hold (and 2x2x2 holds the weights twice).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jigsaw_ext.files import emit_json, make_output_folders  # noqa: E402


class _Peak:
    """RssAnon of this process, sampled every 10 ms; `phase()` restarts the peak. The sampler and
    `phase()` hold a lock: without it a sample taken across a restart wrote the previous phase's
    peak back (the measurements before 2026-11-30 could carry a phase's peak into the next one)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.peak = self.now()
        threading.Thread(target=self._run, daemon=True).start()

    @staticmethod
    def now() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        return 0

    def _run(self):
        while True:
            with self.lock:
                self.peak = max(self.peak, self.now())
            time.sleep(0.01)

    def phase(self) -> int:
        with self.lock:
            self.peak = base = self.now()
        return base

    def read(self) -> int:
        with self.lock:
            return max(self.peak, self.now())


def _engine(cfg, mesh_str: str, micro: int = 1):
    import deepspeed
    import deepspeed.ops
    import torch

    from jigsaw_ext.checkpoint.engine_state import base_optimizer, create_moments
    from jigsaw_ext.mesh import MeshConfig, init_mesh
    from weathermixer.config.train import TrainConfig
    from weathermixer.model import WeatherMixer
    from weathermixer.train.engine import param_groups

    dp, domain, tp = (int(x) for x in mesh_str.split("x"))
    deepspeed.ops.__compatible_ops__ = {"deepspeed_shm_comm": False}
    mesh = init_mesh(MeshConfig(dp=dp, domain=domain, tp=tp))
    torch.manual_seed(mesh.rank)
    model = WeatherMixer(cfg, mesh)
    ds = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 1},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, TrainConfig().param_groups, 1e-3), config=ds, mpu=mesh.mpu()
    )
    create_moments(engine)
    with torch.no_grad():
        for st in base_optimizer(engine).state.values():
            st["exp_avg"].normal_(0, 1e-3)
            st["exp_avg_sq"].uniform_(0, 1e-6)
            st["step"] = torch.tensor(100.0)
    return engine, model


def _timed(peak, fn) -> dict:
    import torch.distributed as dist

    dist.barrier()
    base = peak.phase()
    t0 = time.perf_counter()
    fn()
    dist.barrier()
    return {"seconds": time.perf_counter() - t0, "peak_extra_bytes": peak.read() - base, "share_bytes": base}


def _best(runs: list[dict]) -> dict:
    """The fastest time of repeated runs of a phase (this machine is shared: the others are noise),
    the highest memory peak."""
    return dict(
        min(runs, key=lambda r: r["seconds"]),
        repeats=len(runs),
        peak_extra_bytes=max(r["peak_extra_bytes"] for r in runs),
    )


def _worker(rank, world, cfg, mesh_str, work, phases, repeat):
    import warnings

    import torch.distributed as dist

    from jigsaw_ext.checkpoint import UnverifiedCheckpointWarning
    from jigsaw_ext.checkpoint.layout_free import load_layout_free, save_layout_free

    warnings.simplefilter("ignore", UnverifiedCheckpointWarning)  # no MANIFEST.json here: not a trainer's tag
    peak = _Peak()
    engine, model = _engine(cfg, mesh_str)
    runs, work = {}, Path(work)
    desc_path = work / "ours0" / "desc.json"
    for r in range(repeat if "save" in phases else 0):  # alternating, each writing its own directory
        runs.setdefault("native_save", []).append(
            _timed(peak, lambda r=r: engine.save_checkpoint(str(work / f"native{r}"), tag="t", save_latest=False))
        )
        holder = {}
        runs.setdefault("ours_save", []).append(
            _timed(
                peak,
                lambda r=r, holder=holder: holder.update(
                    d=save_layout_free(engine, model, work / f"ours{r}" / "state")
                ),
            )
        )
        if rank == 0:
            (work / f"ours{r}" / "desc.json").write_text(json.dumps(holder["d"]))
        runs.setdefault("native_load", []).append(
            _timed(peak, lambda r=r: engine.load_checkpoint(str(work / f"native{r}"), tag="t"))
        )
        dist.barrier()
        runs.setdefault("ours_load", []).append(
            _timed(
                peak,
                lambda r=r: load_layout_free(
                    engine,
                    model,
                    work / f"ours{r}" / "state",
                    json.loads((work / f"ours{r}" / "desc.json").read_text()),
                ),
            )
        )
    if "save" not in phases:
        desc = json.loads(desc_path.read_text())
        for _ in range(repeat):
            runs.setdefault("ours_load", []).append(
                _timed(peak, lambda: load_layout_free(engine, model, work / "ours0" / "state", desc))
            )
    else:  # last: its writes would push the others' files out of the page cache
        runs["ours_save_fsync"] = [
            _timed(peak, lambda: save_layout_free(engine, model, work / "fsync" / "state", sync=True))
        ]
    return {k: _best(v) for k, v in runs.items()}


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _summary(results: list[dict], key: str) -> dict:
    rs = [r[key] for r in results]
    return {
        "seconds": round(max(r["seconds"] for r in rs), 2),
        "repeats": rs[0]["repeats"],
        "peak_extra_bytes_max": max(r["peak_extra_bytes"] for r in rs),
        "share_bytes_max": max(r["share_bytes"] for r in rs),
    }


def main() -> int:
    ap = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--preset", choices=["paper_1b", "small"], default="paper_1b")
    ap.add_argument("--blocks", type=int, default=None, help="mixer blocks (paper_1b: 3)")
    ap.add_argument("--mesh", default="1x2x2", help="dp x domain x tp of the run that saves")
    ap.add_argument("--other", default="2x1x2", help="the mesh that loads it too")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each phase; the fastest is reported")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    make_output_folders(ap, {"--out": args.out})

    import deepspeed
    import megatron.core
    import torch

    from jigsaw_ext.testing import run_workers
    from weathermixer.model.mixer import num_parameters
    from weathermixer.model.presets import PRESETS

    cfg = PRESETS["paper_1b"]
    if args.preset == "small":
        cfg = cfg.model_copy(update={"grid": (121, 240), "patch": (1, 10), "hidden": 512, "blocks": 2})
    if args.blocks:
        cfg = cfg.model_copy(update={"blocks": args.blocks})
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_ckpt_"))
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    world = lambda m: math.prod(int(x) for x in m.split("x"))  # noqa: E731
    pre = ["deepspeed", "weathermixer.model", "megatron.core.dist_checkpointing"]
    try:
        same = run_workers(
            _worker, world(args.mesh), cfg, args.mesh, str(work), ("save",), args.repeat, timeout=3600, preload=pre
        )
        other = run_workers(
            _worker, world(args.other), cfg, args.other, str(work), (), args.repeat, timeout=3600, preload=pre
        )
        from jigsaw_ext.mesh import Mesh
        from weathermixer.model import WeatherMixer

        meta = WeatherMixer(cfg, Mesh.single(), device="meta")
        largest = 4 * max(p.numel() for p in meta.parameters())
        out = {
            "benchmark": "checkpoint save/load: DeepSpeed native vs layout-free",
            "preset": args.preset,
            "blocks": cfg.blocks,
            "parameters": num_parameters(cfg),
            "mesh": args.mesh,
            "other_mesh": args.other,
            "zero_stage": 1,
            "dtype": "float32",
            "largest_tensor_bytes": largest,
            "versions": {
                "torch": torch.__version__,
                "deepspeed": deepspeed.__version__,
                "megatron-core": megatron.core.__version__,
            },
            "bytes_on_disk": {"native": du(work / "native0"), "ours": du(work / "ours0" / "state")},
            "native_save": _summary(same, "native_save"),
            "ours_save": _summary(same, "ours_save"),
            "ours_save_with_fsync": _summary(same, "ours_save_fsync"),
            "native_load_same_mesh": _summary(same, "native_load"),
            "ours_load_same_mesh": _summary(same, "ours_load"),
            "ours_load_other_mesh": _summary(other, "ours_load"),
        }
        n = out["native_save"]["seconds"], out["native_load_same_mesh"]["seconds"]
        out["ratios"] = {
            "save": round(out["ours_save"]["seconds"] / n[0], 2),
            "save_with_fsync": round(out["ours_save_with_fsync"]["seconds"] / n[0], 2),
            "load_same_mesh": round(out["ours_load_same_mesh"]["seconds"] / n[1], 2),
            "load_other_mesh_vs_native_same": round(out["ours_load_other_mesh"]["seconds"] / n[1], 2),
            "peak_extra_vs_largest_tensor": round(
                max(
                    out[k]["peak_extra_bytes_max"] for k in ("ours_save", "ours_load_same_mesh", "ours_load_other_mesh")
                )
                / largest,
                2,
            ),
        }
        emit_json(out, args.out)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
