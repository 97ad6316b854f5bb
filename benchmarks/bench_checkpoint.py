"""Time and peak memory of `consolidate` (and of `reshard` at a size this machine can hold)
versus the checkpoint's size on disk. Prints one JSON object.

    python benchmarks/bench_checkpoint.py                      # paper 1.06 B model (~16 GB on disk)
    python benchmarks/bench_checkpoint.py --preset small       # a quick run (~40 M parameters, with reshard)

The 1.06 B checkpoint is written directly in DeepSpeed 0.19's ZeRO-1 file format for mesh
1x2x2 (what the trainer writes: mp_rank_XX_model_states.pt with the module's blocks and
param_shapes, zero_pp_rank_0_mp_rank_XX_optim_states.pt with the fp32 master partition and AdamW
moments, job.json with the layouts, trainer_rankXXXXX.json), with random values: building the real engine for 1.06 B
parameters with AdamW needs ~17 GB across ranks, more than this 24 GB machine can spare beside
the benchmark. `reshard` does build engines (one process per target rank, each holding its share of
weights and optimizer state), so it is measured on the small model only and its memory scales
with (model + optimizer) / target ranks.

Memory of the consolidating process is sampled from /proc/self/status every 20 ms: RssAnon is the
memory the process really needs (the tensor being assembled); RssFile counts pages of the
memory-mapped source files, which the kernel can drop at any time.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_fake_zero1(out: Path, cfg, mesh_cfg, seed: int = 0) -> dict:
    """A ZeRO-1 checkpoint (dp=1) of `cfg` on `mesh_cfg` with random fp32 values."""
    import torch

    from jigsaw_ext.mesh import Mesh
    from jigsaw_ext.safe_load import save_state
    from weathermixer.model import WeatherMixer
    from weathermixer.train.config import TrainConfig
    from weathermixer.train.engine import param_groups

    assert mesh_cfg.dp == 1
    tag = out / "step00000100"
    tag.mkdir(parents=True)
    rules = TrainConfig().param_groups
    layouts, group_names = None, None
    g = torch.Generator().manual_seed(seed)
    for m in range(mesh_cfg.domain * mesh_cfg.tp):
        model = WeatherMixer(cfg, Mesh.virtual(mesh_cfg, m), device="meta")
        named = dict(model.named_parameters())
        if layouts is None:
            layouts = {n: p.block_layout.to_json() for n, p in named.items()}
            names = {id(p): n for n, p in named.items()}
            group_names = [[names[id(p)] for p in grp["params"]] for grp in param_groups(model, rules, 1e-3)]
        module, shapes, flats, states = OrderedDict(), [], [], {}
        for gi, gnames in enumerate(group_names):
            shp = OrderedDict((n, named[n].shape) for n in gnames)
            shapes.append(shp)
            numel = sum(s.numel() for s in shp.values())
            flat = torch.randn(numel, generator=g)
            off = 0
            for n, s in shp.items():
                module[n] = flat[off:off + s.numel()].view(s).clone()
                off += s.numel()
            flats.append(flat)
            states[gi] = {"step": torch.tensor(100.0), "exp_avg": torch.randn(numel, generator=g) * 1e-3,
                          "exp_avg_sq": torch.rand(numel, generator=g) * 1e-6}
        torch.save({"module": module, "param_shapes": shapes, "lr_scheduler": {"base_lrs": [1e-3] * len(shapes),
                    "last_epoch": 100, "_last_lr": [1e-3] * len(shapes)}, "global_steps": 100,
                    "global_samples": 800, "skipped_steps": 0, "step": 100, "best": 1.0},
                   tag / f"mp_rank_{m:02d}_model_states.pt")
        del module
        torch.save({"optimizer_state_dict": {
            "single_partition_of_fp32_groups": flats,
            "base_optimizer_state": {"state": states, "param_groups": [
                {"lr": 1e-3, "initial_lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": wd,
                 "params": [i]} for i, wd in enumerate([0.1, 0.0][:len(shapes)])]},
            "param_alignment_paddings": [[0] * len(s) for s in shapes], "zero_stage": 1}},
            tag / f"zero_pp_rank_0_mp_rank_{m:02d}_optim_states.pt")
        del flats, states
        save_state(tag / f"trainer_rank{m:05d}", {"loader": {"sampler": {
            "epoch": 0, "step": 100, "seed": 0, "n": 100000, "batch": 8, "dp": 1, "shuffle": True}, "split": "train"}})
    job = {"train": {}, "model": cfg.model_dump(mode="json"), "mesh": mesh_cfg.model_dump(mode="json")}
    (tag / "job.json").write_text(json.dumps({
        "mesh": mesh_cfg.model_dump(mode="json"), "model": cfg.model_dump(mode="json"), "zero_stage": 1,
        "world_size": mesh_cfg.world_size, "dtype": "float32", "weathermixer": job,
        "deepspeed": {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1,
                      "zero_optimization": {"stage": 1}, "optimizer": {"type": "AdamW", "params": {}}},
        "layouts": layouts, "param_groups": group_names, "step": 100, "tag": tag.name}))
    (tag / "COMPLETE").write_text("100\n")
    (out / "latest").write_text(tag.name + "\n")
    return {"parameters": sum(__import__("math").prod(d["shape"]) for d in layouts.values())}


_CHILD = r"""
import json, sys, threading, time
sys.path.insert(0, sys.argv[1])
peak = {"RssAnon": 0, "RssFile": 0}
def sample():
    while True:
        for line in open("/proc/self/status"):
            k = line.split(":")[0]
            if k in peak:
                peak[k] = max(peak[k], int(line.split()[1]) * 1024)
        time.sleep(0.02)
threading.Thread(target=sample, daemon=True).start()
from jigsaw_ext.checkpoint import consolidate
t0 = time.perf_counter()
consolidate(sys.argv[2], sys.argv[3], log=None)
print(json.dumps({"seconds": time.perf_counter() - t0, "peak_rss_anon_bytes": peak["RssAnon"],
                  "peak_rss_file_bytes": peak["RssFile"]}))
"""


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=["paper_1b", "small"], default="paper_1b")
    ap.add_argument("--workdir", default=None, help="where to write the checkpoints (default: a temp dir)")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()

    from jigsaw_ext.mesh import MeshConfig
    from weathermixer.model.presets import PRESETS

    cfg = PRESETS["paper_1b"]
    if args.preset == "small":
        cfg = cfg.model_copy(update={"grid": (121, 240), "patch": (1, 10), "hidden": 512, "blocks": 2})
    mesh = MeshConfig(dp=1, domain=2, tp=2)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_ckpt_"))
    src, cons = work / "src", work / "consolidated"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        t0 = time.perf_counter()
        info = write_fake_zero1(src, cfg, mesh)
        build_s = time.perf_counter() - t0
        child = subprocess.run([sys.executable, "-c", _CHILD, str(ROOT), str(src), str(cons)], capture_output=True,
                               text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        if child.returncode:
            print(child.stderr[-3000:], file=sys.stderr)
            return 1
        res = json.loads(child.stdout.strip().splitlines()[-1])
        largest = max(p.stat().st_size for p in (cons / "tensors").glob("*.safetensors"))
        src_bytes, cons_bytes = du(src), du(cons)
        out = {"benchmark": "checkpoint consolidate", "model": args.preset, "parameters": info["parameters"],
               "source": "ZeRO-1 on mesh 1x2x2, fp32 master + AdamW moments, random values (DeepSpeed 0.19 file "
                         "format written directly; see the docstring)",
               "source_bytes_on_disk": src_bytes, "consolidated_bytes_on_disk": cons_bytes,
               "largest_tensor_file_bytes": largest, "build_seconds": round(build_s, 1),
               "consolidate_seconds": round(res["seconds"], 1),
               "consolidate_MB_per_s": round(src_bytes / 2 ** 20 / res["seconds"], 1),
               "consolidate_peak_rss_anon_bytes": res["peak_rss_anon_bytes"],
               "consolidate_peak_rss_anon_vs_largest_tensor": round(res["peak_rss_anon_bytes"] / largest, 2),
               "consolidate_peak_rss_anon_vs_source_size": round(res["peak_rss_anon_bytes"] / src_bytes, 3),
               "consolidate_peak_rss_file_bytes": res["peak_rss_file_bytes"]}
        if args.preset == "small":  # reshard builds real engines: only at a size this machine holds
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, "-c", (
                "import resource, sys, time; sys.path.insert(0, sys.argv[1]);"
                "from weathermixer.train.reshard import reshard; t=time.perf_counter();"
                "reshard(sys.argv[2], sys.argv[3], dp=1, domain=1, tp=2, zero_stage=2, log=None);"
                "print(time.perf_counter()-t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss*1024)"),
                str(ROOT), str(cons), str(work / "resharded")], capture_output=True, text=True,
                env=dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu"))
            if r.returncode:
                print(r.stderr[-3000:], file=sys.stderr)
                return 1
            secs, self_rss = r.stdout.strip().splitlines()[-1].split()  # ranks run under a forkserver: not
            # children of this process, so only the driver (which consolidates first) is measured
            out.update({"reshard_target": "1x1x2 ZeRO-2 (2 processes)", "reshard_seconds": round(float(secs), 1),
                        "reshard_driver_peak_rss_bytes": int(self_rss),
                        "resharded_bytes_on_disk": du(work / "resharded")})
        print(json.dumps(out, indent=1))
        if args.out:
            Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
