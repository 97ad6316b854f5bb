"""Full logical tensors from the per-rank files of one DeepSpeed checkpoint tag (DeepSpeed 0.19's
files for ZeRO 0 (fp32), 1, 2 and 3, fp32 or bf16 training; the fp32 master weights are what is
read). Every file is first checked against the tag's MANIFEST.json (size and sha256, see
manifest.py), then memory-mapped and read with torch.load(weights_only=True) and the allowlist of
jigsaw_ext.safe_load; the source is only ever opened for reading."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..layout import Layout
from ..safe_load import UnsafeCheckpointError, load_state, safe_torch_load, state_exists
from .errors import CheckpointFormatError
from .job_info import read_job_info
from .manifest import verify_file


def _load(path: Path) -> dict:
    """A DeepSpeed shard, memory-mapped, read with weights_only=True and the allowlist."""
    if not path.is_file():
        raise CheckpointFormatError(f"{path}: missing shard (the checkpoint is incomplete)")
    verify_file(path)
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
            for suffix in (".json", ".safetensors"):
                if base.with_name(base.name + suffix).is_file():
                    verify_file(base.with_name(base.name + suffix))
            return load_state(base)
        legacy = base.with_name(base.name + ".pt")
        if legacy.is_file():
            verify_file(legacy)
            return safe_torch_load(legacy, numpy=True)
    except UnsafeCheckpointError as err:
        raise CheckpointFormatError(str(err)) from None
    except CheckpointFormatError:
        raise
    except (ValueError, OSError) as err:
        raise CheckpointFormatError(str(err)) from None
    except Exception as err:  # noqa: BLE001 - a damaged legacy zip
        raise CheckpointFormatError(f"{base}.pt: unreadable ({type(err).__name__}: {err})") from None
    raise CheckpointFormatError(f"{base}.json: missing (checkpoint written by fewer ranks, or incomplete)")


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
            raise CheckpointFormatError(
                f"{tag_dir}: ZeRO stage 0 with {self.info['dtype']} keeps its fp32 master "
                f"weights in DeepSpeed's BF16/FP16 optimizer format, which this reader "
                f"does not know; train with ZeRO stage >= 1 for reshardable checkpoints"
            )
        self.model_state = [self._file(self._model_file(m)) for m in range(self.mp)]
        self.step = int(self.model_state[0].get("step", self.model_state[0].get("global_steps", 0)))
        self._index = [self._build_index(m) for m in range(self.mp)]

    def _file(self, path: Path) -> dict:
        if path not in self._cache:
            self._cache[path] = _load(path)
        return self._cache[path]

    def _model_file(self, m: int) -> Path:
        return self.dir / (
            f"zero_pp_rank_0_mp_rank_{m:02d}_model_states.pt" if self.stage == 3 else f"mp_rank_{m:02d}_model_states.pt"
        )

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
                raise CheckpointFormatError(
                    f"{self._model_file(m)}: {len(groups)} optimizer groups, job.json lists "
                    f"{len(self.info['param_groups'])}"
                )
            out: dict[str, tuple] = {}
            for g, gnames in zip(groups, self.info["param_groups"], strict=True):
                for idx, name in zip(g["params"], gnames, strict=True):
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
                for (name, shape), pad in zip(group.items(), pads[g], strict=True):
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
            raise CheckpointFormatError(
                f"{where}: parameters do not match job.json layouts (missing {missing[:5]}, unexpected {extra[:5]})"
            )
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
                parts.append(self._flat(d, m, kind, g)[start : start + take])
                pos += take
            return torch.cat(parts).float().reshape(shape) if parts else torch.zeros(shape)
        _, g, off, n, pn = loc
        parts = [self._flat(d, m, kind, g)[off : off + pn] for d in range(self.dp)]
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
            groups = (osd["base_optimizer_state"] if self.stage in (1, 2) else osd["optimizer_state_dict"])[
                "param_groups"
            ]
        keep = ("lr", "initial_lr", "betas", "eps", "weight_decay", "name")
        return [
            dict({k: g[k] for k in keep if k in g}, names=names)
            for g, names in zip(groups, self.info["param_groups"], strict=True)
        ]

    def trainer_state(self) -> dict:
        """Rank 0's trainer state with its tensors (RNG states: mesh specific) left out."""
        return _without_tensors(read_trainer_state(self.dir, 0))


def _without_tensors(x):
    if isinstance(x, dict):
        return {k: _without_tensors(v) for k, v in x.items() if not _holds_tensor(v)}
    return x


def _holds_tensor(x) -> bool:
    if torch.is_tensor(x):
        return True
    if isinstance(x, dict):
        return any(_holds_tensor(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return any(_holds_tensor(v) for v in x)
    return False
