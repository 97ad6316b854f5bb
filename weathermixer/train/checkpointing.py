"""Checkpoints through DeepSpeed, crash-safe, with the trainer's own state beside them.

    root/
      step00000100/                 one tag = one DeepSpeed checkpoint (mp_rank_*, zero_pp_rank_* files)
        trainer_rank00000.json      per rank: data-loader position, RNG states (torch, numpy, python, cuda)
        trainer_rank00000.safetensors   (JSON and safetensors: nothing that runs code when read)
        job.json                    the job's project section and DeepSpeed config, mesh, step, and
                                    what a forecast needs: normalisation statistics, the data set's
                                    mapping, package versions and git commit
        COMPLETE                    written last, after every rank has finished writing
      latest                        name of the newest complete tag (replaced atomically)
      best                          name of the tag with the best validation loss

A crash during a save leaves a tag directory without COMPLETE that no pointer names: the previous
checkpoint stays loadable, and the stale directory is removed by the next successful save.

DeepSpeed's own files are read through jigsaw_ext.safe_load's checkpoint engine (weights_only=True
and an explicit allowlist); a file holding anything else is refused, naming the file.
"""
from __future__ import annotations

import functools
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from jigsaw_ext.checkpoint import CheckpointFormatError, read_trainer_state
from jigsaw_ext.safe_load import UnsafeCheckpointError, install_safe_checkpoint_engine, save_state

POINTERS = ("latest", "best")


class CheckpointError(RuntimeError):
    pass


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@functools.lru_cache(maxsize=1)
def provenance() -> dict:
    """Package versions and the git commit of the code (None outside a git checkout; never fails)."""
    from importlib import metadata

    versions = {"python": sys.version.split()[0]}
    for pkg in ("torch", "deepspeed", "megatron-core", "jigsaw-weathermixer", "numpy", "safetensors"):
        try:
            versions[pkg] = metadata.version(pkg)
        except Exception:  # noqa: BLE001 - not installed, or broken metadata
            versions[pkg] = None
    commit = dirty = None
    try:
        here = Path(__file__).resolve().parent
        run = dict(cwd=here, capture_output=True, text=True, timeout=10)
        r = subprocess.run(["git", "rev-parse", "HEAD"], **run)
        if r.returncode == 0 and r.stdout.strip():
            commit = r.stdout.strip()
            d = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], **run)
            dirty = bool(d.stdout.strip()) if d.returncode == 0 else None
    except Exception:  # noqa: BLE001 - no git, a timeout: the commit is unknown
        commit = dirty = None
    return {"versions": versions, "git_commit": commit, "git_dirty": dirty}


def trainer_state_base(tag_dir: Path, rank: int) -> Path:
    return Path(tag_dir) / f"trainer_rank{rank:05d}"


def tag_of(step: int) -> str:
    return f"step{step:08d}"


class CheckpointManager:
    def __init__(self, root: str | Path, keep_last: int = 2):
        self.root = Path(root)
        self.keep_last = keep_last
        self.rank = dist.get_rank() if dist.is_initialized() else 0

    @staticmethod
    def install_safe_loading(engine) -> None:
        """engine.load_checkpoint reads DeepSpeed's files with weights_only=True and the allowlist of
        jigsaw_ext.safe_load (call right after deepspeed.initialize; idempotent)."""
        install_safe_checkpoint_engine(engine)

    # pointers -----------------------------------------------------------------------------------
    def pointer(self, name: str) -> str | None:
        path = self.root / name
        if not path.is_file():
            return None
        tag = path.read_text().strip()
        if not (self.root / tag / "COMPLETE").is_file():
            raise CheckpointError(f"{path} names tag '{tag}' but {self.root / tag} is not a complete checkpoint")
        return tag

    def describe(self, name: str = "latest") -> str:
        try:
            tag = self.pointer(name)
        except CheckpointError as err:
            return f"unusable ({err})"
        return str(self.root / tag) if tag else "none"

    # save ---------------------------------------------------------------------------------------
    def save(self, engine, step: int, client_state: dict, trainer_state: dict, job_info: dict,
             pointers=("latest",)) -> Path:
        """Collective: every rank calls it. Returns the tag directory."""
        tag = tag_of(step)
        tag_dir = self.root / tag
        if self.rank == 0 and tag_dir.exists():  # an earlier, interrupted save of this step
            (tag_dir / "COMPLETE").unlink(missing_ok=True)
        dist.barrier()
        engine.save_checkpoint(str(self.root), tag=tag, client_state=client_state, save_latest=False)
        save_state(trainer_state_base(tag_dir, self.rank), trainer_state)
        dist.barrier()  # every rank's files are complete
        if self.rank == 0:
            _atomic_write(tag_dir / "job.json", json.dumps(dict(job_info, step=step, tag=tag), indent=1))
            _atomic_write(tag_dir / "COMPLETE", f"{step}\n")
            for name in pointers:
                _atomic_write(self.root / name, tag + "\n")
            self._prune()
        dist.barrier()
        return tag_dir

    def _prune(self) -> None:
        """Remove periodic tags beyond keep_last and incomplete ones, never a tag a pointer names."""
        keep = set()
        for name in POINTERS:
            p = self.root / name
            if p.is_file():
                keep.add(p.read_text().strip())
        tags = sorted(d.name for d in self.root.iterdir() if d.is_dir() and d.name.startswith("step"))
        complete = [t for t in tags if (self.root / t / "COMPLETE").is_file()]
        keep.update(complete[-self.keep_last:])
        for t in tags:
            if t not in keep:
                shutil.rmtree(self.root / t, ignore_errors=True)

    # load ---------------------------------------------------------------------------------------
    def resolve(self, resume: str) -> tuple[Path, str | None] | None:
        """(checkpoint root, tag) to resume from, (consolidated dir, None), or None. resume: auto |
        never | a root directory (its latest pointer) | a tag directory | a consolidated directory."""
        if resume == "never":
            return None
        if resume == "auto":
            tag = self.pointer("latest")
            return (self.root, tag) if tag else None
        path = Path(resume)
        if (path / "index.json").is_file():  # consolidated: loaded by the trainer on any mesh
            return path, None
        if (path / "COMPLETE").is_file():
            return path.parent, path.name
        if (path / "latest").is_file():
            mgr = CheckpointManager(path, self.keep_last)
            return path, mgr.pointer("latest")
        raise CheckpointError(f"checkpoint.resume={resume!r}: not a complete checkpoint tag directory (no "
                              f"COMPLETE file) nor a checkpoint root with a 'latest' pointer")

    def load(self, engine, root: Path, tag: str, expect: dict) -> tuple[dict, dict, dict]:
        """Load tag into the engine; returns (client_state, this rank's trainer state, job info).
        `expect` holds what must match (mesh, model, zero stage): a mismatch names the key."""
        tag_dir = root / tag
        try:
            info = json.loads((tag_dir / "job.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{tag_dir / 'job.json'}: unreadable ({err})") from None
        for key, want in expect.items():
            if info.get(key) != want:
                raise CheckpointError(
                    f"checkpoint {tag_dir} has {key}={info.get(key)} but this run has {key}={want}; a DeepSpeed "
                    f"checkpoint resumes on the mesh and ZeRO stage it was written with: convert it with "
                    f"`python -m jigsaw_ext.checkpoint reshard {tag_dir} OUT --dp .. --domain .. --tp ..` (or "
                    f"consolidate it and pass the result to --resume)")
        try:
            mine = read_trainer_state(tag_dir, self.rank)
        except CheckpointFormatError as err:
            raise CheckpointError(str(err)) from None
        install_safe_checkpoint_engine(engine)  # idempotent; DeepSpeed's files are never unpickled freely
        try:
            loaded, client = engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                                    load_lr_scheduler_states=True)
        except UnsafeCheckpointError as err:
            raise CheckpointError(str(err)) from None
        if loaded is None:
            raise CheckpointError(f"DeepSpeed could not load {tag_dir}")
        return client or {}, mine, info
