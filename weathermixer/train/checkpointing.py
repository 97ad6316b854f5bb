"""Checkpoints of a weather training job: layout-free (resumed on any mesh, ZeRO stage and dp),
crash-safe and checksummed, with the trainer's own state beside them.

    root/
      step00000100/                 one tag
        state/00000/ ...            the layout-free tensors: every rank wrote its parts of the fp32
                                    master weights and AdamW moments in parallel
                                    (jigsaw_ext.checkpoint.layout_free; torch.distributed.checkpoint)
        trainer_rank00000.json      per rank: data-loader position, RNG states (torch, numpy, python, cuda)
        trainer_rank00000.safetensors   (JSON and safetensors: nothing that runs code when read)
        job.json                    the job's project section and DeepSpeed config, mesh, step, every
                                    parameter's layout, the state's description (batches, optimizer
                                    step, lr-scheduler state, DeepSpeed's counters), client_state and
                                    what a forecast needs: normalisation statistics, the data set's
                                    mapping, package versions and git commit
        MANIFEST.json               size and sha256 of every file above (jigsaw_ext.checkpoint.manifest)
        COMPLETE                    written last, after every rank has finished writing
      step00000100.1/               the same step saved again (a run resumed from an older tag)
      latest                        name of the newest complete tag (replaced atomically)
      best                          name of the tag with the best validation loss

Before anything is written, rank 0 compares the tag's size (estimate_bytes: the fp32 master weights
and two moments) with the free space of the checkpoint folder's file system and stops the save
there, naming both, when it cannot fit. A save never touches an existing tag: every rank writes
into `stepNNNNNNNN.partial`, the ranks
share the hashing of the files, rank 0 writes MANIFEST.json and COMPLETE, renames the directory to
a name that is not taken (`stepNNNNNNNN`, else `stepNNNNNNNN.1`, ...) and only then moves the
pointers. A crash or a full disk at any point leaves every pointer naming a complete checkpoint;
a failed write (ENOSPC) is agreed on by every rank, the partial directory removed and the job
stopped with a message naming the file system. Stale partial and incomplete directories are
removed by the next successful save (never a tag a pointer names).

Loading checks the files against MANIFEST.json first (the ranks share the hashing, so each byte is
hashed once), then every rank reads the blocks of ITS layout (jigsaw_ext.checkpoint.layout_free:
the DCP metadata through an allowlist, tensors with weights_only=True). A damaged, truncated or
missing file is an error naming it and an older complete checkpoint to resume from. A checkpoint
of the DeepSpeed 0.19 per-rank format is refused with how to convert it (old_format_message).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from jigsaw_ext.checkpoint import CheckpointFormatError, read_trainer_state
from jigsaw_ext.checkpoint.common import read_pointer
from jigsaw_ext.checkpoint.deepspeed_engine import install_safe_checkpoint_engine
from jigsaw_ext.checkpoint.layout_free import load_layout_free, save_layout_free
from jigsaw_ext.checkpoint.manifest import (
    describe as describe_file,
)
from jigsaw_ext.checkpoint.manifest import (
    list_files,
    mark_verified,
    read_manifest,
    verify_tree,
    warn_unverified,
    write_manifest,
)
from jigsaw_ext.checkpoint.sharded import failing_rank
from jigsaw_ext.safe_load import UnsafeCheckpointError, save_error, save_state

from .checkpoint_folder import (
    PARTIAL,
    POINTERS,
    STATE,
    checkpoint_root,
    durable_write_text,
    filesystem,
    fsync_dir,
    tag_key,
    tag_of,
    trainer_state_base,
)


class CheckpointError(RuntimeError):
    pass


def _all_gather(obj) -> list:
    """Collective: every rank's `obj`, in rank order (a world of one: [obj])."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _broadcast(obj):
    """Collective: rank 0's `obj` on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def estimate_bytes(model) -> int:
    """The size of a tag of `model`, from below: per parameter its fp32 master weights and two AdamW
    moments (global shapes), plus 64 KiB for the JSON and trainer state files."""
    import math

    return sum(12 * math.prod(p.block_layout.shape) for p in model.parameters()) + (64 << 10)


def finished_at(job) -> tuple[int, Path] | None:
    """(step, tag) when the checkpoint that checkpoint.resume names was written at or after train.steps:
    the run is complete and a rerun has nothing to train. Reads only the pointer files and the tag's
    name (no process group, engine or data). None: steps are left, nothing to resume from, or a
    pointer this check cannot follow (the run's own resume then reports it)."""
    try:
        where = CheckpointManager(checkpoint_root(job), job.checkpoint.keep_last).resolve(job.checkpoint.resume)
    except (CheckpointError, OSError):
        return None
    key = tag_key(where[1]) if where and where[1] else None
    if key is None or key[0] < job.train.steps:
        return None
    return key[0], where[0] / where[1]


class CheckpointManager:
    def __init__(self, root: str | Path, keep_last: int = 2):
        self.root = Path(root)
        self.keep_last = keep_last
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1

    @staticmethod
    def install_safe_loading(engine) -> None:
        """Should anything call engine.load_checkpoint on a DeepSpeed checkpoint: its files are read
        with weights_only=True and the allowlist of jigsaw_ext.safe_load (idempotent). The trainer's
        own checkpoints are layout-free and never go through it."""
        install_safe_checkpoint_engine(engine)

    # pointers -----------------------------------------------------------------------------------
    def pointer(self, name: str) -> str | None:
        path = self.root / name
        if not path.is_file():
            return None
        try:
            tag = read_pointer(path)
        except CheckpointFormatError as err:
            raise CheckpointError(str(err)) from None
        if not (self.root / tag / "COMPLETE").is_file():
            raise CheckpointError(f"{path} names tag '{tag}' but {self.root / tag} is not a complete checkpoint")
        return tag

    def describe(self, name: str = "latest") -> str:
        try:
            tag = self.pointer(name)
        except CheckpointError as err:
            return f"unusable ({err})"
        return str(self.root / tag) if tag else "none"

    def _tags(self, complete: bool = True) -> list[str]:
        """Tag directories under root, oldest first (by step, then the newer save of a step)."""
        if not self.root.is_dir():
            return []
        tags = [d.name for d in self.root.iterdir() if d.is_dir() and tag_key(d.name) is not None]
        return sorted((t for t in tags if not complete or (self.root / t / "COMPLETE").is_file()), key=tag_key)

    # save ---------------------------------------------------------------------------------------
    def save(
        self, engine, step: int, client_state: dict, trainer_state: dict, job_info: dict, pointers=("latest",)
    ) -> Path:
        """Collective: every rank calls it. Returns the tag directory. Writes a new directory (never
        one a pointer names), checksums it, marks it COMPLETE, renames it into place, then moves the
        pointers. Raises CheckpointError on every rank if any rank failed to write (disk full, ...):
        the pointers are untouched and the partial directory is removed."""
        work_dir = self.root / (tag_of(step) + PARTIAL)
        final = made = None
        if self.rank == 0:
            shutil.rmtree(work_dir, ignore_errors=True)  # left by an interrupted save of this step
            final = self._free_name(tag_of(step))
            made = self._too_big(engine.module)
            try:
                if made is None:
                    work_dir.mkdir(parents=True)
            except OSError as err:
                made = save_error(work_dir, err)
        final, made = _broadcast((final, made))  # also: nobody writes before the stale directory is gone
        self._stop_if_failed(step, work_dir, [made])
        failed, state = [], None
        try:  # collective; DCP agrees on a failed write itself (every rank raises)
            state = save_layout_free(engine, engine.module, work_dir / STATE)
        except (Exception, CheckpointException) as err:  # noqa: BLE001 - a full disk, a damaged file system
            r, exc = failing_rank(err)
            failed = [dict(save_error(work_dir / STATE, exc), rank=self.rank if r is None else r)]
        if not failed:
            info = dict(job_info, step=step, tag=final, state=state, client_state=client_state)
            failed = self._write_own(work_dir, trainer_state, info)
        self._stop_if_failed(step, work_dir, _all_gather(failed[0] if failed else None))
        files, failed = _broadcast(list_files(work_dir) if self.rank == 0 else None), None
        digests = {}
        try:  # the ranks share the hashing: rank r hashes files r, r + world, ...
            for rel in files[self.rank :: self.world]:
                digests[rel] = describe_file(work_dir / rel)
        except OSError as err:
            failed = save_error(work_dir, err)
        shares = _all_gather((digests, failed))
        self._stop_if_failed(step, work_dir, [f for _, f in shares])
        outcome = None
        if self.rank == 0:
            try:
                self._commit(step, work_dir, final, {k: v for d, _ in shares for k, v in d.items()}, pointers)
            except OSError as err:
                outcome = save_error(work_dir, err)
        self._stop_if_failed(step, work_dir, [_broadcast(outcome)])
        return self.root / final

    def _too_big(self, model) -> dict | None:
        """Before anything is written: a failure (as save_error reports one) if the file system holding
        the checkpoints has less free space than the tag will take (estimate_bytes), else None."""
        need = estimate_bytes(model)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            st = os.statvfs(self.root)
        except OSError:
            return None  # the save itself will name the problem
        free = (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize
        if free >= need:
            return None
        return {
            "path": str(self.root),
            "no_space": True,
            "error": f"this checkpoint needs about {need / 2**20:,.1f} MiB (fp32 master weights and two AdamW "
            f"moments), {free / 2**20:,.1f} MiB are free; nothing was written",
        }

    def _free_name(self, tag: str) -> str:
        """tag, or tag.1, tag.2, ... : a directory name nothing has (a pointer may name `tag`)."""
        name, k = tag, 0
        while (self.root / name).exists():
            k += 1
            name = f"{tag}.{k}"
        return name

    def _write_own(self, work_dir: Path, trainer_state: dict, job_info: dict) -> list[dict]:
        """This rank's files beside DeepSpeed's (rank 0 also job.json); [] or the failure."""
        path = trainer_state_base(work_dir, self.rank)
        try:
            work_dir.mkdir(parents=True, exist_ok=True)
            save_state(path, trainer_state)
            if self.rank == 0:
                path = work_dir / "job.json"
                durable_write_text(path, json.dumps(job_info, indent=1))
        except Exception as err:  # noqa: BLE001 - safetensors reports a full disk as SafetensorError
            return [save_error(path, err)]
        return []

    def _commit(self, step: int, work_dir: Path, final: str, digests: dict, pointers) -> None:
        """Rank 0: manifest, COMPLETE, rename into place, then the pointers; prune."""
        write_manifest(work_dir, digests)
        durable_write_text(work_dir / "COMPLETE", f"{step}\n")
        os.rename(work_dir, self.root / final)  # `final` is not taken: nothing a pointer names is touched
        fsync_dir(self.root)
        for name in pointers:
            durable_write_text(self.root / name, final + "\n")
        self._prune()

    def _stop_if_failed(self, step: int, work_dir: Path, failures: list) -> None:
        """Collective outcome of a save phase: if any rank failed, rank 0 removes the partial
        directory and every rank raises CheckpointError (rank 0's names the file and the cause)."""
        bad = {r: f for r, f in enumerate(failures) if f}
        if not bad:
            return
        if self.rank == 0:
            shutil.rmtree(work_dir, ignore_errors=True)
        if dist.is_initialized():
            dist.barrier()
        r, first = min(bad.items())
        r = first.get("rank", r)  # the rank whose write failed (DCP reports it to every rank)
        rank = f" on rank {r}" if self.world > 1 else ""
        where = f"({first['path']}{rank}: {first['error']})"
        if any(f["no_space"] for f in bad.values()):
            head = f"no space left on {filesystem(self.root)} while writing checkpoint step {step} {where}"
            todo = "free space there (or set checkpoint.dir elsewhere, or a smaller checkpoint.keep_last)"
        else:
            head, todo = f"writing checkpoint step {step} failed {where}", "fix the cause"
        raise CheckpointError(
            f"{head}; the previous checkpoint is kept ({self.describe('latest')}; no pointer "
            f"moved) and the partial {work_dir} removed; {todo} and rerun the same command to "
            f"resume from it"
        )

    def _prune(self) -> None:
        """Remove complete tags beyond keep_last, incomplete and partial ones; never a tag a pointer names."""
        keep = set()
        for name in POINTERS:
            p = self.root / name
            if p.is_file():
                keep.add(p.read_text(errors="replace").strip())
        keep.update(self._tags()[-self.keep_last :] if self.keep_last > 0 else [])
        for d in self.root.iterdir():
            stale = d.name.endswith(PARTIAL) and tag_key(d.name[: -len(PARTIAL)]) is not None
            if d.is_dir() and d.name not in keep and (stale or tag_key(d.name) is not None):
                shutil.rmtree(d, ignore_errors=True)

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
        hint = ""
        if tag_key(path.name) is not None and (path.parent / "latest").is_file():
            newest = CheckpointManager(path.parent).describe("latest")
            hint = (
                f"; {path.name} is gone from {path.parent} (removed by checkpoint.keep_last once newer "
                f"checkpoints were saved?), whose latest is {newest}: to continue, use --resume {path.parent} "
                f"(its latest) or --resume auto"
            )
        raise CheckpointError(
            f"checkpoint.resume={resume!r}: not a complete checkpoint tag directory (no "
            f"COMPLETE file) nor a checkpoint root with a 'latest' pointer{hint}"
        )

    def verify(self, path: Path, root: Path | None = None) -> None:
        """Collective: check every file of a checkpoint (a tag or a consolidated directory) against
        its checksums, the ranks sharing the hashing; then loading them hashes nothing again. Raises
        CheckpointError on every rank (rank 0's names the damaged files and an older checkpoint)."""
        try:
            problems = verify_tree(path, self.rank, self.world)
        except CheckpointFormatError as err:
            problems = [str(err)]
        if problems is None:
            warn_unverified(path, quiet=self.rank != 0)
            return
        found = list(dict.fromkeys(p for mine in _all_gather(problems) for p in mine))
        if not found:
            mark_verified(path)
            return
        if self.rank != 0:
            raise CheckpointError(f"checkpoint {path} is damaged (rank 0 names the files)")
        raise CheckpointError(
            "\n  ".join([f"checkpoint {path} is damaged:", *found[:8]])
            + (f"\n  ... and {len(found) - 8} more" if len(found) > 8 else "")
            + "\n  "
            + self.older_hint(root, path.name)
        )

    def older_hint(self, root: Path | None, tag: str) -> str:
        """Where to resume from instead of a damaged `tag` of `root`: the newest older complete tag
        whose files have the sizes its manifest records (`inspect --verify` checks the digests)."""
        key = tag_key(tag)
        if root is None or key is None:
            return "resume from another checkpoint (check one with `python -m jigsaw_ext.checkpoint inspect --verify`)"
        for t in reversed(CheckpointManager(root)._tags()):
            if tag_key(t) >= key:
                continue
            files = read_manifest(root / t) if (root / t / "MANIFEST.json").is_file() else {}
            if all(
                (root / t / rel).is_file() and (root / t / rel).stat().st_size == e.get("size")
                for rel, e in (files or {}).items()
            ):
                return (
                    f"an older complete checkpoint: resume with --resume {root / t} (check it first: python -m "
                    f"jigsaw_ext.checkpoint inspect --verify {root / t})"
                )
        return f"there is no older complete checkpoint in {root}"

    def load(self, engine, root: Path, tag: str, expect: dict) -> tuple[dict, dict, dict]:
        """Collective. Load tag into the engine on this run's mesh (any mesh, ZeRO stage and dp: the
        state is layout-free); returns (client_state, trainer state for this rank, job info). The
        trainer state holds rank 0's data position ("loader") and, on the mesh that wrote it, this
        rank's RNG states ("rng"; None on another mesh). `expect` holds what must match (the model,
        the optimizer groups): a mismatch names the key. The files are verified first (verify)."""
        tag_dir = root / tag
        self.verify(tag_dir, root)
        try:
            info = json.loads((tag_dir / "job.json").read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{tag_dir / 'job.json'}: unreadable ({err})") from None
        if "state" not in info:
            raise CheckpointError(old_format_message(tag_dir))
        _check_expected(tag_dir, info, expect)
        same_mesh = info.get("mesh") == expect.get("mesh") and info.get("world_size") == self.world
        try:
            load_layout_free(engine, engine.module, tag_dir / STATE, info["state"])
            mine = {
                "loader": read_trainer_state(tag_dir, 0)["loader"],
                "rng": read_trainer_state(tag_dir, self.rank)["rng"] if same_mesh else None,
            }
        except (CheckpointFormatError, UnsafeCheckpointError) as err:
            raise CheckpointError(f"{err}\n  {self.older_hint(root, tag)}") from None
        return info.get("client_state") or {}, mine, info


def _check_expected(tag_dir: Path, info: dict, expect: dict) -> None:
    """The model configuration and optimizer groups of the checkpoint are this run's (named key)."""
    for key in ("model", "param_groups"):
        if key not in expect or info.get(key) == expect[key]:
            continue
        mine, theirs = expect[key], info.get(key)
        if isinstance(mine, dict) and isinstance(theirs, dict):
            k = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))[0]
            raise CheckpointError(
                f"checkpoint {tag_dir} was written for another model ({key}.{k}: checkpoint "
                f"{theirs.get(k)!r}, this run {mine.get(k)!r})"
            )
        raise CheckpointError(
            f"checkpoint {tag_dir}: optimizer groups {[len(g) for g in theirs or []]} differ "
            f"from this run's {[len(g) for g in mine]} (train.param_groups changed?)"
        )


def old_format_message(tag_dir: Path) -> str:
    return (
        f"checkpoint {tag_dir} is in the per-rank DeepSpeed format of earlier versions (mp_rank_*/zero_pp_rank_* "
        f"files, no layout-free state), which is no longer resumed directly. Convert it once, on any machine "
        f"(one process, streaming): `python -m jigsaw_ext.checkpoint consolidate {tag_dir} OUT`, then start "
        f"with `--resume OUT` on any mesh; every checkpoint written from then on is layout-free"
    )


def sampler_for(loader: dict, micro: int, dp: int, where) -> dict:
    """A data position (samples consumed in the epoch, whatever mesh wrote it) as the sampler state of
    a mesh with `dp` replicas of `micro` samples each."""
    st = loader["sampler"]
    samples, per_step = st["step"] * st["batch"] * st["dp"], micro * dp
    if samples % per_step:
        raise CheckpointError(
            f"{where}: the data position ({samples} samples into epoch {st['epoch']}) is not a "
            f"whole number of this run's global micro batches ({micro} x dp {dp}); keep the "
            f"global batch size"
        )
    return {
        "epoch": st["epoch"],
        "step": samples // per_step,
        "seed": st["seed"],
        "n": st["n"],
        "batch": micro,
        "dp": dp,
        "shuffle": st["shuffle"],
    }
