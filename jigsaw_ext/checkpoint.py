"""Checkpoints that outlive their layout: read a DeepSpeed checkpoint of a DP x DOMAIN x TP run as
full logical tensors, write it layout-free, and load it on any mesh.

    python -m jigsaw_ext.checkpoint inspect CKPT
    python -m jigsaw_ext.checkpoint consolidate CKPT OUT
    python -m jigsaw_ext.checkpoint reshard CKPT --dp A --domain B --tp C [--zero-stage S] OUT

CKPT is a checkpoint tag directory written by the trainer (`<run>/checkpoints/step00000100`), a
checkpoint root (its `latest` pointer is followed) or a consolidated directory.

Consolidated format ("jigsaw-consolidated/2"), framework-neutral and safe to share (nothing in it
is a pickle: JSON and safetensors only):
    OUT/index.json                 format, step, the job's configuration (project section and DeepSpeed
                                   keys), source mesh and ZeRO stage, optimizer step and groups (by
                                   parameter name), lr-scheduler state, data-loader position (samples
                                   consumed in the epoch), what a forecast needs (normalisation
                                   statistics, the data set's mapping, versions, git commit), and per
                                   tensor: shape, dtype, files
    OUT/tensors/<i>.<kind>.safetensors
                                   one safetensors file per tensor and kind (its one entry is named
                                   after the kind): param (fp32 master weights), exp_avg, exp_avg_sq
                                   (AdamW moments), full logical shapes; a loader that needs one block
                                   reads only that block (safe_open(...).get_slice)

Reading is streaming: every DeepSpeed file is memory-mapped and each logical tensor is assembled
from the byte ranges that hold it, written, and freed, so peak memory stays near the largest tensor.
The reader knows DeepSpeed 0.19's files for ZeRO 0 (fp32), 1, 2 and 3 (fp32 or bf16 training; the
fp32 master weights are what is read). The source checkpoint is only ever opened for reading. DeepSpeed's files are read with
torch.load(weights_only=True) and the allowlist of jigsaw_ext.safe_load: a shard holding anything
else (code) is refused, naming the file. Format 1 (tensors as torch pickles) is not read: re-run
`consolidate` on the original DeepSpeed checkpoint.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from .layout import Layout
from .safe_load import UnsafeCheckpointError, load_state, safe_torch_load, state_exists

FORMAT = "jigsaw-consolidated/2"
OLD_FORMATS = ("jigsaw-consolidated/1",)
# what a forecast needs besides the weights, copied from job.json into index.json
SELF_CONTAINED = ("stats", "data", "provenance")
KINDS = ("param", "exp_avg", "exp_avg_sq")


class CheckpointFormatError(ValueError):
    """A checkpoint that cannot be read as asked: names the file or tensor."""


# ------------------------------------------------------------------------------------------------
def resolve(path: str | Path) -> Path:
    """The tag directory (or consolidated directory) that `path` designates."""
    path = Path(path)
    if not path.exists():
        raise CheckpointFormatError(f"{path}: no such checkpoint")
    if (path / "index.json").is_file() or (path / "job.json").is_file():
        return path
    if (path / "latest").is_file():
        tag = (path / "latest").read_text().strip()
        return resolve(path / tag)
    raise CheckpointFormatError(f"{path}: neither a checkpoint tag directory (job.json), a checkpoint root "
                                f"(latest) nor a consolidated checkpoint (index.json)")


def is_consolidated(path: Path) -> bool:
    return (path / "index.json").is_file()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointFormatError(f"{path}: missing") from None
    except json.JSONDecodeError as err:
        raise CheckpointFormatError(f"{path}: corrupt JSON ({err})") from None


def read_index(path: Path) -> dict:
    """index.json of a consolidated checkpoint, of the current format (older ones: how to convert)."""
    idx = _read_json(path / "index.json")
    fmt = idx.get("format") if isinstance(idx, dict) else None
    if fmt in OLD_FORMATS:
        src = (idx.get("source") or {}).get("path", "the original DeepSpeed checkpoint")
        raise CheckpointFormatError(
            f"{path / 'index.json'}: format {fmt!r} keeps its tensors as torch pickles, which are not loaded "
            f"(unpickling can run code); convert it by re-running `python -m jigsaw_ext.checkpoint consolidate "
            f"{src} NEW_DIR` on the original DeepSpeed checkpoint (format {FORMAT!r}, safetensors)")
    if fmt != FORMAT:
        raise CheckpointFormatError(f"{path / 'index.json'}: format {fmt!r}, expected {FORMAT!r}")
    return idx


def read_job_info(path: str | Path) -> dict:
    """The configuration a checkpoint was written with: {"weathermixer": project section, "deepspeed":
    DeepSpeed keys, "mesh", "model", "zero_stage", "step", "layouts"} and, for checkpoints written
    since they are self-contained, "stats", "data" and "provenance"."""
    path = resolve(path)
    if is_consolidated(path):
        idx = read_index(path)
        return {"weathermixer": idx["job"], "deepspeed": idx["deepspeed"], "mesh": idx["source"]["mesh"],
                "model": idx["job"]["model"], "zero_stage": idx["source"]["zero_stage"], "step": idx["step"],
                "dtype": idx["source"].get("dtype", "float32"),
                "layouts": {n: t["layout"] for n, t in idx["tensors"].items()},
                **{k: idx.get(k) for k in SELF_CONTAINED}}
    if not (path / "COMPLETE").is_file():
        raise CheckpointFormatError(f"{path}: no COMPLETE marker (an interrupted save?)")
    return _read_json(path / "job.json")


def _load(path: Path) -> dict:
    """A DeepSpeed shard, memory-mapped, read with weights_only=True and the allowlist."""
    if not path.is_file():
        raise CheckpointFormatError(f"{path}: missing shard (the checkpoint is incomplete)")
    try:
        return safe_torch_load(path, map_location="cpu", mmap=True)
    except UnsafeCheckpointError as err:
        raise CheckpointFormatError(str(err)) from None
    except Exception as err:  # noqa: BLE001 - torch raises several types for damaged zip files
        raise CheckpointFormatError(f"{path}: unreadable ({type(err).__name__}: {err}); corrupt or truncated") from None


def _mesh_coords(rank_in_group: int, mesh: dict) -> dict:
    return {"dp": 0, "domain": rank_in_group // mesh["tp"], "tp": rank_in_group % mesh["tp"]}


def read_trainer_state(tag_dir: Path, rank: int) -> dict:
    """Rank `rank`'s trainer state (data position, RNG states): trainer_rankNNNNN.json (+ .safetensors);
    a trainer_rankNNNNN.pt of an older version is read with weights_only=True (tensors, numpy arrays
    and plain containers only)."""
    base = Path(tag_dir) / f"trainer_rank{rank:05d}"
    try:
        if state_exists(base):
            return load_state(base)
        legacy = base.with_name(base.name + ".pt")
        if legacy.is_file():
            return safe_torch_load(legacy, numpy=True)
    except UnsafeCheckpointError as err:
        raise CheckpointFormatError(str(err)) from None
    except (ValueError, OSError) as err:
        raise CheckpointFormatError(str(err)) from None
    except Exception as err:  # noqa: BLE001 - a damaged legacy zip
        raise CheckpointFormatError(f"{base}.pt: unreadable ({type(err).__name__}: {err})") from None
    raise CheckpointFormatError(f"{base}.json: missing (checkpoint written by fewer ranks, or incomplete)")


# ------------------------------------------------------------------------------------------------
class DeepSpeedTag:
    """Full logical tensors from the per-rank files of one DeepSpeed checkpoint tag."""

    def __init__(self, tag_dir: Path):
        self.dir = tag_dir
        self.info = read_job_info(tag_dir)
        for key in ("layouts", "param_groups", "mesh"):
            if key not in self.info:
                raise CheckpointFormatError(f"{tag_dir / 'job.json'}: no '{key}' (written by an older version)")
        self.mesh = self.info["mesh"]
        self.dp, self.mp = self.mesh["dp"], self.mesh["domain"] * self.mesh["tp"]
        self.stage = int(self.info["zero_stage"])
        self.layouts = {n: Layout.from_json(d) for n, d in self.info["layouts"].items()}
        self._cache: dict[Path, dict] = {}
        if self.stage == 0 and self.info.get("dtype", "float32") != "float32":
            raise CheckpointFormatError(f"{tag_dir}: ZeRO stage 0 with {self.info['dtype']} keeps its fp32 master "
                                        f"weights in DeepSpeed's BF16/FP16 optimizer format, which this reader "
                                        f"does not know; train with ZeRO stage >= 1 for reshardable checkpoints")
        self.model_state = [self._file(self._model_file(m)) for m in range(self.mp)]
        self.step = int(self.model_state[0].get("step", self.model_state[0].get("global_steps", 0)))
        self._index = [self._build_index(m) for m in range(self.mp)]

    def _file(self, path: Path) -> dict:
        if path not in self._cache:
            self._cache[path] = _load(path)
        return self._cache[path]

    def _model_file(self, m: int) -> Path:
        return self.dir / (f"zero_pp_rank_0_mp_rank_{m:02d}_model_states.pt" if self.stage == 3
                           else f"mp_rank_{m:02d}_model_states.pt")

    def _optim_file(self, d: int, m: int) -> Path:
        name = f"zero_pp_rank_{d}_mp_rank_{m:02d}_optim_states.pt"
        if self.stage == 3 and not (self.dir / name).exists() and (self.dir / ("bf16_" + name)).exists():
            name = "bf16_" + name
        return self.dir / name

    def _build_index(self, m: int) -> dict:
        """name -> where its block lives in mp rank m's files."""
        names = set(self.layouts)
        if self.stage == 0:
            state = self.model_state[m]
            opt = state.get("optimizer") or {}
            groups = opt.get("param_groups") or []
            if len(groups) != len(self.info["param_groups"]):
                raise CheckpointFormatError(f"{self._model_file(m)}: {len(groups)} optimizer groups, job.json lists "
                                            f"{len(self.info['param_groups'])}")
            out = {}
            for g, gnames in zip(groups, self.info["param_groups"]):
                for idx, name in zip(g["params"], gnames):
                    out[name] = ("z0", idx)
            return self._check_names(out, names, self._model_file(m))
        shapes = self.model_state[m].get("param_shapes")
        if not shapes:
            raise CheckpointFormatError(f"{self._model_file(m)}: no param_shapes (not a ZeRO checkpoint?)")
        out = {}
        opt0 = self._file(self._optim_file(0, m))["optimizer_state_dict"]
        if self.stage in (1, 2):
            pads = opt0.get("param_alignment_paddings") or [[0] * len(s) for s in shapes]
            for g, group in enumerate(shapes):
                off = 0
                for (name, shape), pad in zip(group.items(), pads[g]):
                    n = math.prod(shape)
                    out[name] = ("z12", g, off, n)
                    off += n + pad
        else:  # stage 3: each parameter's flat numel split in ceil(n / dp) partitions, group by group
            for g, group in enumerate(shapes):
                off = 0
                for name, shape in group.items():
                    n = math.prod(shape)
                    pn = math.ceil(n / self.dp)
                    out[name] = ("z3", g, off, n, pn)
                    off += pn
        return self._check_names(out, names, self._model_file(m))

    @staticmethod
    def _check_names(found: dict, names: set, where: Path) -> dict:
        if set(found) != names:
            missing, extra = sorted(names - set(found)), sorted(set(found) - names)
            raise CheckpointFormatError(f"{where}: parameters do not match job.json layouts (missing {missing[:5]}, "
                                        f"unexpected {extra[:5]})")
        return found

    def _flat(self, d: int, m: int, kind: str, g: int) -> torch.Tensor:
        osd = self._file(self._optim_file(d, m))["optimizer_state_dict"]
        if kind == "param":
            key = "single_partition_of_fp32_groups" if self.stage in (1, 2) else "fp32_flat_groups"
            return osd[key][g]
        base = osd["base_optimizer_state"] if self.stage in (1, 2) else osd["optimizer_state_dict"]
        return base["state"][g][kind]

    def block(self, name: str, kind: str, m: int) -> torch.Tensor:
        """Model-group rank m's block of parameter `name` (fp32)."""
        loc = self._index[m][name]
        shape = self.layouts[name].local_shape(_mesh_coords(m, self.mesh))
        if loc[0] == "z0":
            state = self.model_state[m]
            t = state["module"][name] if kind == "param" else state["optimizer"]["state"][loc[1]][kind]
            return t.float().reshape(shape)
        if loc[0] == "z12":
            _, g, off, n = loc
            parts, pos = [], off
            part_size = self._flat(0, m, kind, g).numel()
            while pos < off + n:
                d, start = divmod(pos, part_size)
                take = min(off + n - pos, part_size - start)
                parts.append(self._flat(d, m, kind, g)[start:start + take])
                pos += take
            return torch.cat(parts).float().reshape(shape) if parts else torch.zeros(shape)
        _, g, off, n, pn = loc
        parts = [self._flat(d, m, kind, g)[off:off + pn] for d in range(self.dp)]
        return torch.cat(parts)[:n].float().reshape(shape)

    def full(self, name: str, kind: str) -> torch.Tensor:
        """The full logical tensor: each block written once, from the replica that owns it."""
        layout = self.layouts[name]
        out = torch.empty(layout.shape, dtype=torch.float32)
        done = set()
        for m in range(self.mp):
            coords = _mesh_coords(m, self.mesh)
            sl = layout.local_slices(coords)
            key = tuple((s.start, s.stop) for s in sl)
            if key in done:
                continue
            done.add(key)
            out[sl] = self.block(name, kind, m)
        return out

    def optimizer_step(self) -> int:
        if self.stage == 0:
            st = self.model_state[0]["optimizer"]["state"]
            return int(next(iter(st.values()))["step"]) if st else 0
        osd = self._file(self._optim_file(0, 0))["optimizer_state_dict"]
        base = osd["base_optimizer_state"] if self.stage in (1, 2) else osd["optimizer_state_dict"]
        return int(base["state"][0]["step"]) if base["state"] else 0

    def optimizer_groups(self) -> list[dict]:
        if self.stage == 0:
            groups = self.model_state[0]["optimizer"]["param_groups"]
        else:
            osd = self._file(self._optim_file(0, 0))["optimizer_state_dict"]
            groups = (osd["base_optimizer_state"] if self.stage in (1, 2) else osd["optimizer_state_dict"])["param_groups"]
        keep = ("lr", "initial_lr", "betas", "eps", "weight_decay", "name")
        return [dict({k: g[k] for k in keep if k in g}, names=names)
                for g, names in zip(groups, self.info["param_groups"])]

    def loader_state(self) -> dict:
        """Samples consumed in the current epoch (mesh independent) from rank 0's trainer state."""
        st = read_trainer_state(self.dir, 0)["loader"]["sampler"]
        return {"epoch": st["epoch"], "samples_in_epoch": st["step"] * st["batch"] * st["dp"], "seed": st["seed"],
                "n": st["n"], "shuffle": st["shuffle"]}


# ------------------------------------------------------------------------------------------------
def consolidate(src: str | Path, out: str | Path, log=print) -> Path:
    """Write the layout-free checkpoint of `src` to `out` (tensor by tensor, atomically)."""
    src_dir, out = resolve(src), Path(out)
    if is_consolidated(src_dir):
        raise CheckpointFormatError(f"{src_dir} is already consolidated")
    if out.exists():
        raise CheckpointFormatError(f"{out} exists; choose a new output directory")
    tag = DeepSpeedTag(src_dir)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "tensors").mkdir(parents=True)
    from safetensors.torch import save_file

    tensors = {}
    t0 = time.perf_counter()
    names = list(tag.layouts)
    for i, name in enumerate(names):
        files = {}
        for kind in KINDS:
            full = tag.full(name, kind)
            rel = f"tensors/{i:05d}.{kind}.safetensors"
            save_file({kind: full.contiguous()}, str(tmp / rel), metadata={"name": name, "kind": kind})
            files[kind] = rel
            del full
        tensors[name] = {"shape": list(tag.layouts[name].shape), "dtype": "float32", "files": files,
                         "layout": tag.info["layouts"][name]}
        if log and (i % 20 == 0 or i == len(names) - 1):
            log(f"consolidate: {i + 1}/{len(names)} tensors ({time.perf_counter() - t0:.1f} s)")
    st0 = tag.model_state[0]
    index = {"format": FORMAT, "step": tag.step, "best": st0.get("best"),
             "job": tag.info["weathermixer"], "deepspeed": tag.info["deepspeed"],
             "source": {"path": str(src_dir.resolve()), "mesh": tag.mesh, "zero_stage": tag.stage,
                        "dtype": tag.info.get("dtype", "float32")},
             "optimizer": {"step": tag.optimizer_step(), "groups": tag.optimizer_groups()},
             "lr_scheduler": _jsonable(st0.get("lr_scheduler")),
             "engine": {"global_steps": st0.get("global_steps"), "global_samples": st0.get("global_samples"),
                        "skipped_steps": st0.get("skipped_steps")},
             "loader": tag.loader_state(), **{k: tag.info.get(k) for k in SELF_CONTAINED}, "tensors": tensors}
    (tmp / "index.json").write_text(json.dumps(index, indent=1))
    os.replace(tmp, out)
    return out


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items() if not callable(v)}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if torch.is_tensor(x):
        return x.item() if x.numel() == 1 else x.tolist()
    return x


class Consolidated:
    """Reader of a consolidated checkpoint: full tensors or one block, from safetensors files."""

    def __init__(self, path: str | Path):
        self.dir = resolve(path)
        if not is_consolidated(self.dir):
            raise CheckpointFormatError(f"{self.dir}: not a consolidated checkpoint (no index.json)")
        self.index = read_index(self.dir)

    def _slice(self, name: str, kind: str, read):
        """read(slice object of safetensors) on the tensor file of (name, kind), checked against the index."""
        from safetensors import SafetensorError, safe_open

        try:
            entry = self.index["tensors"][name]
            rel = entry["files"][kind]
        except KeyError:
            raise CheckpointFormatError(f"{self.dir}: no tensor {name!r} ({kind})") from None
        path = (self.dir / rel).resolve()
        if self.dir.resolve() not in path.parents:
            raise CheckpointFormatError(f"{self.dir / 'index.json'}: file {rel!r} of {name} is outside the checkpoint")
        if not path.is_file():
            raise CheckpointFormatError(f"{path}: missing (the consolidated checkpoint is incomplete)")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                if kind not in f.keys():
                    raise CheckpointFormatError(f"{path}: no entry {kind!r} (holds {list(f.keys())[:5]})")
                sl = f.get_slice(kind)
                shape, dtype = list(sl.get_shape()), sl.get_dtype()
                if shape != entry["shape"] or dtype != "F32":
                    raise CheckpointFormatError(f"{path}: {dtype} tensor of shape {shape}, index.json expects F32 "
                                                f"{entry['shape']} for {name} ({kind})")
                return read(sl)
        except SafetensorError as err:
            raise CheckpointFormatError(f"{path}: not a readable safetensors file ({err}); corrupt, truncated or "
                                        f"not written by consolidate") from None

    def full(self, name: str, kind: str = "param") -> torch.Tensor:
        return self._slice(name, kind, lambda sl: sl[:])

    def block(self, name: str, kind: str, layout: Layout, coords) -> torch.Tensor:
        """This rank's block of (name, kind) under `layout`, reading only that block."""
        shape = self.index["tensors"].get(name, {}).get("shape")
        if shape is not None and list(layout.shape) != shape:
            raise CheckpointFormatError(f"{self.dir}: {name} has shape {shape}, this model expects "
                                        f"{list(layout.shape)} (another model config?)")
        sl = layout.local_slices(coords)
        out = self._slice(name, kind, lambda s: s[sl] if sl else s[:])
        return out.reshape(layout.local_shape(coords))


def full_tensors(path: str | Path, kind: str = "param"):
    """(name, full logical tensor) for every parameter of any checkpoint, one at a time."""
    path = resolve(path)
    if is_consolidated(path):
        c = Consolidated(path)
        for name in c.index["tensors"]:
            yield name, c.full(name, kind)
    else:
        tag = DeepSpeedTag(path)
        for name in tag.layouts:
            yield name, tag.full(name, kind)


def load_into_model(model: torch.nn.Module, path: str | Path) -> dict:
    """Copy each parameter's block (of this rank's mesh coordinates) from any checkpoint into a
    model built on any mesh; returns the checkpoint's job info. Weights only."""
    path = resolve(path)
    info = read_job_info(path)
    mesh = model.mesh
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(info["layouts"]))
    if missing:
        raise CheckpointFormatError(f"{path}: no tensors for parameters {missing[:5]} (another model config?)")
    reader = Consolidated(path) if is_consolidated(path) else DeepSpeedTag(path)
    with torch.no_grad():
        for name, p in params.items():
            layout = p.block_layout
            if list(layout.shape) != info["layouts"][name]["shape"]:
                raise CheckpointFormatError(f"{path}: {name} has shape {info['layouts'][name]['shape']}, this model "
                                            f"expects {list(layout.shape)} (another model config?)")
            if isinstance(reader, Consolidated):
                block = reader.block(name, "param", layout, mesh.coords)
            else:
                block = layout.shard(reader.full(name, "param"), mesh.coords)
            p.copy_(block.to(p.dtype))
    return info


# ------------------------------------------------------------------------------------------------
def inspect(path: str | Path) -> dict:
    path = resolve(path)
    info = read_job_info(path)
    layouts = info["layouts"]
    n = sum(math.prod(d["shape"]) for d in layouts.values())
    return {"path": str(path), "kind": "consolidated" if is_consolidated(path) else "deepspeed",
            "mesh": info["mesh"], "zero_stage": info["zero_stage"], "step": info.get("step"),
            "dtype": info.get("dtype", "float32"), "parameters": n,
            "tensors": {k: {"shape": d["shape"], "split": [None if s is None else s["axis"] for s in d["splits"]]}
                        for k, d in layouts.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jigsaw_ext.checkpoint", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("inspect", help="mesh, ZeRO stage, step, parameter count, per-tensor shapes")
    p.add_argument("ckpt")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("consolidate", help="write a single layout-free checkpoint")
    p.add_argument("ckpt")
    p.add_argument("out")
    p = sub.add_parser("reshard", help="write a DeepSpeed checkpoint for another mesh / ZeRO stage")
    p.add_argument("ckpt")
    p.add_argument("out")
    for axis in ("dp", "domain", "tp"):
        p.add_argument(f"--{axis}", type=int, default=1)
    p.add_argument("--zero-stage", type=int, default=None, help="default: the source's")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="train_micro_batch_size_per_gpu of the target (default: keep the global batch)")
    p.add_argument("--timeout", type=float, default=1800.0)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "inspect":
            r = inspect(args.ckpt)
            if args.json:
                print(json.dumps(r, indent=1))
            else:
                m = r["mesh"]
                print(f"{r['path']} ({r['kind']}): mesh {m['dp']}x{m['domain']}x{m['tp']} (dp x domain x tp), "
                      f"ZeRO-{r['zero_stage']}, {r['dtype']}, step {r['step']}, {r['parameters']:,} parameters")
                for k, t in r["tensors"].items():
                    print(f"  {k:48s} {str(tuple(t['shape'])):18s} split {t['split']}")
        elif args.cmd == "consolidate":
            out = consolidate(args.ckpt, args.out, log=lambda s: print(s, file=sys.stderr))
            print(out)
        else:
            from weathermixer.train.reshard import reshard

            out = reshard(args.ckpt, args.out, dp=args.dp, domain=args.domain, tp=args.tp,
                          zero_stage=args.zero_stage, micro_batch=args.micro_batch, timeout=args.timeout)
            print(out)
    except (CheckpointFormatError, ValueError) as err:
        print(f"jigsaw_ext.checkpoint: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
