"""The run folder, claimed before any expensive setup: writable, locked, and its ranks registered.

    folder = open_run_folder(job, device, log)   # collective, right after the process group exists

1. Every rank checks that log.dir and the checkpoint folder can be written: a
   folder under a file, a read-only mount or a full disk is named with its key before the data is
   prepared, the model built or DeepSpeed initialised.
2. Rank 0 takes RUN.lock in log.dir and in the checkpoint folder (checkpoint.dir, else
   log.dir/checkpoints), wherever it lies, so a run whose checkpoint.dir lies inside another run's
   log.dir meets that run's lock instead of writing beside its checkpoints: a small JSON
   file with the holder's host, pid, process start time, boot id and pid namespace, created
   atomically (a complete temporary file hard-linked to the name, O_EXCL where links are not
   supported), so two runs never share a folder. It is released at the end (Trainer.run) and on every
   exit path (main's failure paths and the SIGTERM watcher in rankwatch; atexit otherwise).
   A lock left by a SIGKILLed holder is stale when the holder ran on this machine and its pid is
   gone or now belongs to a process started at another time: it is taken over with a message. A
   holder on another host cannot be checked from here: the lock counts as held unless
   log.break_lock=true.
3. The ranks agree in one all_gather (every rank raises the same kind of error: exit 2 everywhere,
   nobody waits) and exchange (rank, host, pid, start time): the registry rankwatch uses to name the
   rank that died first.
"""

from __future__ import annotations

import atexit
import datetime
import errno
import json
import os
import socket
import sys
import time
from pathlib import Path

from ..config import ConfigError
from .process import describe, me, proc_status, read_text

LOCK_NAME = "RUN.lock"


class RunFolderError(ConfigError):
    """The run folder cannot be used (exit 2: a setting or another run, not a crash)."""


# ------------------------------------------------------------------------------------------------
# writable folders
def run_folders(job) -> dict[str, Path]:
    """{key: folder} this run writes: log.dir and checkpoint.dir (unset: log.dir/checkpoints)."""
    return {
        "log.dir": Path(job.log.dir),
        "checkpoint.dir": Path(job.checkpoint.dir or Path(job.log.dir) / "checkpoints"),
    }


def check_writable(folders: dict[str, Path]) -> None:
    """Create each folder and a probe file in it; RunFolderError naming the key and the folder."""
    for key, folder in folders.items():
        probe = folder / f".write-test.{socket.gethostname()}.{os.getpid()}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            try:
                os.write(fd, b"ok")
                os.fsync(fd)
            finally:
                os.close(fd)
                probe.unlink(missing_ok=True)
        except OSError as err:
            where = f" ({err.filename})" if err.filename and str(err.filename) != str(folder) else ""
            raise RunFolderError(
                f"{key}={folder}: this run cannot write there: {err.strerror or err}{where}; "
                f"choose a writable folder (--output-dir / --set log.dir=... / --set "
                f"checkpoint.dir=...)"
            ) from err


# ------------------------------------------------------------------------------------------------
# the lock
def _lock_folders(folders: dict[str, Path]) -> dict[str, Path]:
    """The folders that get a RUN.lock: each folder the run writes, once (the checkpoint folder even
    inside log.dir: another run may name it as its checkpoint.dir)."""
    out, seen = {}, set()
    for key, folder in folders.items():
        if folder.resolve() not in seen:
            seen.add(folder.resolve())
            out[key] = folder
    return out


def _create(path: Path, text: str) -> bool:
    """Create `path` holding `text` atomically; False if it exists."""
    tmp = path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        try:
            os.link(tmp, path)  # atomic, complete content, fails if the name exists
            return True
        except FileExistsError:
            return False
        except OSError as err:  # a filesystem without hard links: O_EXCL (content follows the create)
            if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _remove_if_same(path: Path, text: str) -> bool:
    """Remove the lock at `path` if it still holds `text` (a racing taker may have replaced it)."""
    aside = path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.stale")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    if read_text(str(aside)) == text.strip():
        aside.unlink(missing_ok=True)
        return True
    try:  # not the file we judged stale: put it back unless someone created a new one meanwhile
        os.link(aside, path)
    except OSError:
        pass
    aside.unlink(missing_ok=True)
    return False


def _read_holder(path: Path) -> tuple[str | None, dict | None]:
    """(text, parsed) of a lock file; parsed is None for a file that stays unreadable for a second
    (an O_EXCL creator writes its content after creating the name)."""
    for _ in range(10):
        text = read_text(str(path))
        if text is None:
            return None, None
        try:
            holder = json.loads(text)
            return text, holder if isinstance(holder, dict) and "pid" in holder else None
        except ValueError:
            time.sleep(0.1)
    return text, None


class RunLock:
    """RUN.lock in each folder of `folders` ({key: folder}); see the module docstring."""

    def __init__(self, folders: dict[str, Path], break_lock: bool = False, log=print):
        self.folders, self.break_lock, self.log = _lock_folders(folders), break_lock, log
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        self.text = json.dumps({**me(), "started": started, "command": " ".join(sys.argv)}) + "\n"
        self.held: list[Path] = []

    def acquire(self) -> None:
        """Take every lock or none (RunFolderError naming the holder)."""
        try:
            for key, folder in self.folders.items():
                try:
                    self.held.append(self._take(key, folder))
                except OSError as err:
                    raise RunFolderError(f"{key}={folder}: cannot take {folder / LOCK_NAME}: {err}") from err
        except BaseException:
            self.release()
            raise
        atexit.register(self.release)

    def release(self) -> None:
        """Remove the locks this run holds (only files that are still ours); idempotent."""
        while self.held:
            path = self.held.pop()
            if read_text(str(path)) == self.text.strip():
                path.unlink(missing_ok=True)

    def _take(self, key: str, folder: Path) -> Path:
        path = folder / LOCK_NAME
        folder.mkdir(parents=True, exist_ok=True)
        for _ in range(20):
            if _create(path, self.text):
                return path
            text, holder = _read_holder(path)
            if text is None:  # released between our create and our read
                continue
            if holder is not None and all(holder.get(k) == v for k, v in me().items()):
                _remove_if_same(path, text)  # this process's own, from an earlier Trainer not released
                continue
            stale, why = self._judge(holder)
            if not stale:
                raise RunFolderError(self._held_message(key, folder, path, holder, why))
            self.log(f"{key}={folder}: taking over {path} ({why})", file=sys.stderr)
            _remove_if_same(path, text)
        raise RunFolderError(f"{key}={folder}: could not take {path}: other runs keep taking it")

    def _judge(self, holder: dict | None) -> tuple[bool, str]:
        if holder is None:
            return self.break_lock, "its content is not a lock this program wrote" + (
                "; log.break_lock=true" if self.break_lock else ""
            )
        status = proc_status(holder)
        who = f"the run it names ({describe(holder)}, started {holder.get('started')})"
        if status == "gone":
            return True, f"{who} is no longer running"
        if status == "reused":
            return True, f"{who} is no longer running: pid {holder.get('pid')} is another process now"
        if status == "unknown" and self.break_lock:
            return True, f"{who} runs on another host or in another container; log.break_lock=true"
        return False, status

    def _held_message(self, key: str, folder: Path, path: Path, holder: dict | None, status: str) -> str:
        if holder is None:
            return (
                f"{key}={folder} is in use by another run, or was: {path} exists but is not a lock this "
                f"program wrote. If no run uses this folder, remove {path} or set --set log.break_lock=true"
            )
        head = (
            f"{key}={folder} is in use by another run: {path} is held by pid {holder.get('pid')} on host "
            f"{holder.get('host')} (started {holder.get('started')}: {holder.get('command')}). "
        )
        if status == "running":
            return head + (
                "That run is still running on this host: wait for it to finish, or give this run "
                "another folder (--output-dir or --set log.dir=...)"
            )
        return head + (
            "It runs on another host (or in another container), so this one cannot tell whether it "
            f"is still running. If that run is gone, remove {path} or set --set log.break_lock=true; "
            "otherwise give this run another folder (--output-dir or --set log.dir=...)"
        )


# ------------------------------------------------------------------------------------------------
class RunFolder:
    """What open_run_folder returns: the registry (one dict per rank) and rank 0's lock."""

    def __init__(self, ranks: list[dict], lock: RunLock | None):
        self.ranks, self.lock = ranks, lock

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()


def open_run_folder(job, device, log=print) -> RunFolder:
    """Collective (every rank, right after the process group exists): check the folders, lock them
    (rank 0), agree, register the ranks with rankwatch. Raises RunFolderError on every rank if any
    rank found a problem."""
    import torch.distributed as dist

    from . import rankwatch

    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    folders = run_folders(job)
    lock = RunLock(folders, job.log.break_lock, log) if rank == 0 else None
    err = None
    try:
        check_writable(folders)
        if lock is not None:
            rankwatch.on_exit(lock.release)
            lock.acquire()
    except Exception as e:  # noqa: BLE001 - every rank must reach the agreement below
        err = e
    mine = (str(err) if err else None, {"rank": rank, **me(), "t0": time.time()})
    gathered = [mine]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
    bad = [r for r, (msg, _) in enumerate(gathered) if msg]
    if bad:
        if lock is not None:
            lock.release()
        if err is not None:
            raise err
        raise RunFolderError(f"stopping: rank(s) {bad} cannot use the run folder ({gathered[bad[0]][0]})")
    ranks = [info for _, info in gathered]
    rankwatch.register(Path(job.log.dir), ranks, rank, write=rank == 0)
    return RunFolder(ranks, lock)
