"""Nothing lost, nothing silent: checksummed checkpoints, re-saves that never touch a tag a pointer
names, and damaged or unwritable checkpoints named with a way forward.

One short single-process run (ZeRO-1, checkpoints at steps 2 and 4) is shared; each test works on a
copy. Faults are injected by a wrapper around train.py that replaces torch.save (which DeepSpeed's
checkpoint engine calls) on one rank: SIGKILL in the middle of writing a shard, or ENOSPC."""

import contextlib
import hashlib
import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from jigsaw_ext.checkpoint import CheckpointFormatError, Consolidated, consolidate
from tests.integration.test_training_runs import ENV, ROOT, _launch, small_job

DATA = "state/00000/__0_0.distcp"  # rank 0's tensors of the first batch (torch.distributed.checkpoint)
ONE = ["--domain", "1", "--tp", "1", "--set", "ds.zero_optimization.stage=1", "--set", "checkpoint.every=2"]

FAULTY_TRAIN = '''"""train.py whose checkpoint files fail on rank $FAULT_RANK when their path contains $FAULT_AT:
torch.distributed.checkpoint opens each data file through FileSystem.create_stream."""
import contextlib, errno, os, runpy, signal, sys
from torch.distributed.checkpoint import filesystem

if os.environ.get("RANK", "0") == os.environ.get("FAULT_RANK", "0"):
    create, where, fault = filesystem.FileSystem.create_stream, os.environ["FAULT_AT"], os.environ["FAULT"]

    class Faulty:
        def __init__(self, f, path):
            self.f, self.path = f, path

        def write(self, b):
            if fault == "kill":  # half a file on disk, then the process dies
                self.f.write(bytes(b)[:len(b) // 2])
                self.f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))

        def __getattr__(self, name):
            return getattr(self.f, name)

    @contextlib.contextmanager
    def faulty_create(self, path, mode):
        with create(self, path, mode) as f:
            yield Faulty(f, path) if where in str(path) and "w" in mode else f

    filesystem.FileSystem.create_stream = faulty_create
sys.argv[0] = os.path.join(os.environ["TRAIN_ROOT"], "train.py")
runpy.run_path(sys.argv[0], run_name="__main__")
'''


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """4 steps on 1x1x1 with ZeRO-1: checkpoints step00000002 and step00000004 (latest, best)."""
    tmp = tmp_path_factory.mktemp("integrity")
    job = small_job(tmp, rollout=1, resume="auto")
    out = tmp / "base"
    run = _run(_launch(job, out, 1, *ONE, "--set", "train.steps=4", launcher="python"))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    root = out / "checkpoints"
    assert (root / "latest").read_text().strip() == "step00000004" and (root / "step00000002" / "COMPLETE").is_file()
    wrapper = tmp / "faulty_train.py"
    wrapper.write_text(FAULTY_TRAIN)
    return {"tmp": tmp, "job": job, "out": out, "wrapper": wrapper}


@contextlib.contextmanager
def small_tmpfs(mnt: Path, size: str):
    """A tmpfs of `size` mounted at `mnt` for the block (the test skips where mounting is not allowed)."""
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", f"jigsaw-{uuid.uuid4().hex[:6]}", str(mnt)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def _run(cmd, timeout=240, **env):
    return subprocess.run(
        cmd, cwd=ROOT, env=dict(ENV, TRAIN_ROOT=str(ROOT), **env), capture_output=True, text=True, timeout=timeout
    )


def _copy(base, where: Path) -> Path:
    """A copy of the base run's output directory; returns its checkpoint root."""
    shutil.copytree(base["out"], where)
    return where / "checkpoints"


def _faulty(cmd: list, wrapper: Path) -> list:
    return [str(wrapper) if c == "train.py" else c for c in cmd]


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode() + p.read_bytes())
    return h.hexdigest()


def _flip(path: Path, offset: int = 5000) -> None:
    """XOR 3 bytes of a file at `offset` (inside a tensor's bytes); the size stays the same."""
    data = bytearray(path.read_bytes())
    for k in range(3):
        data[offset + k] ^= 0x10
    path.write_bytes(bytes(data))


def _verify_cli(path: Path):
    return subprocess.run(
        [sys.executable, "-m", "jigsaw_ext.checkpoint", "inspect", "--verify", str(path)],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_bit_flips_are_refused_naming_the_file(base, tmp_path):
    """Bytes flipped inside the tensors of the latest checkpoint: consolidate and resume refuse naming
    the file (and the tensor it held), `inspect --verify` exits 1 naming it, and the resume error
    points at the older complete checkpoint. The consolidated format is checked the same way
    (index.json digests)."""
    root = _copy(base, tmp_path / "run")
    bad = root / "step00000004" / DATA
    _flip(bad)
    with pytest.raises(CheckpointFormatError, match=f"{bad}: checksum mismatch.*damaged: tensor "):
        consolidate(root, tmp_path / "cons", log=None)
    assert not (tmp_path / "cons").exists()
    r = _verify_cli(root)
    assert r.returncode == 1 and f"DAMAGED {root / 'step00000004'} (latest, best)" in r.stdout, r.stdout + r.stderr
    assert f"{bad}: checksum mismatch" in r.stdout and f"ok {root / 'step00000002'}" in r.stdout, r.stdout
    run = _run(_launch(base["job"], tmp_path / "run", 1, *ONE, "--set", "train.steps=6", launcher="python"))
    assert run.returncode != 0 and f"{bad}: checksum mismatch" in run.stderr, run.stderr[-3000:]
    assert f"--resume {root / 'step00000002'}" in run.stderr and "resuming from" not in run.stdout, run.stderr[-3000:]

    # consolidated: a flipped byte in one tensor file; index.json names the tensor
    from jigsaw_ext.checkpoint import verify

    cons = consolidate(root / "step00000002", tmp_path / "good", log=None)
    idx = json.loads((cons / "index.json").read_text())
    name = next(iter(idx["tensors"]))
    victim = cons / idx["tensors"][name]["files"]["exp_avg"]
    data = bytearray(victim.read_bytes())
    data[-5] ^= 0x01
    victim.write_bytes(bytes(data))
    with pytest.raises(CheckpointFormatError, match=f"{victim} \\(tensor {name}, exp_avg\\): checksum mismatch"):
        Consolidated(cons).full(name, "exp_avg")
    assert verify(cons)["problems"] and str(victim) in verify(cons)["problems"][0]
    assert verify(root / "step00000002") == dict(verify(root / "step00000002"), verified=True, problems=[])


def test_a_crash_while_resaving_the_latest_tag_keeps_it(base, tmp_path):
    """Resume from step 2 while `latest` names step 4, die (SIGKILL) while the new step-4 shard is
    half written: `latest` and `best` still name the old step-4 checkpoint, byte for byte, and it
    verifies (a resume=auto run would start from it). Rerunning the same command resumes from step 2
    again, finishes, and saves the new step 4 under a name that was free (step00000004.1)."""
    root = _copy(base, tmp_path / "run")
    before = _digest(root / "step00000004")
    cmd = _launch(
        base["job"],
        tmp_path / "run",
        1,
        *ONE,
        "--set",
        "train.steps=4",
        "--resume",
        str(root / "step00000002"),
        launcher="python",
    )
    killed = _run(_faulty(cmd, base["wrapper"]), FAULT="kill", FAULT_AT="step00000004")
    assert killed.returncode == -9, killed.stdout[-2000:] + killed.stderr[-2000:]
    for pointer in ("latest", "best"):
        assert (root / pointer).read_text().strip() == "step00000004"
    assert (root / "step00000004" / "COMPLETE").is_file() and _digest(root / "step00000004") == before
    from jigsaw_ext.checkpoint import verify
    from weathermixer.train.checkpointing import CheckpointManager

    assert verify(root / "step00000004") == dict(verify(root / "step00000004"), verified=True, problems=[])

    assert CheckpointManager(root).resolve("auto") == (root, "step00000004")

    rerun = _run(cmd)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"resuming from {root / 'step00000002'} (step 2)" in rerun.stdout
    assert (root / "latest").read_text().strip() == "step00000004.1"
    assert verify(root / "step00000004.1")["verified"] and not verify(root / "step00000004.1")["problems"]
    assert not [d for d in root.iterdir() if d.name.endswith(".partial")]


def test_truncated_shard_at_resume_names_the_file_and_an_older_checkpoint(base, tmp_path):
    """The latest tag's optimizer shard cut short: the resume stops naming the file and says which
    older complete checkpoint to resume from; the tools name it too."""
    root = _copy(base, tmp_path / "run")
    shard = root / "step00000004" / DATA
    shard.write_bytes(shard.read_bytes()[:100_000])
    run = _run(_launch(base["job"], tmp_path / "run", 1, *ONE, "--set", "train.steps=6", launcher="python"))
    assert run.returncode != 0 and f"{shard}: truncated: 100000 bytes" in run.stderr, run.stderr[-3000:]
    assert f"--resume {root / 'step00000002'}" in run.stderr and "Traceback" not in run.stderr, run.stderr[-3000:]

    from jigsaw_ext.checkpoint import full_tensors

    with pytest.raises(CheckpointFormatError, match=f"{shard}: truncated: 100000 bytes"):
        list(full_tensors(root / "step00000004", "exp_avg"))


@pytest.fixture(scope="module")
def disk_full(base, tmp_path_factory):
    """2 ranks (domain 2), checkpoints every 2 steps; rank 1's tensor file of the step-4 checkpoint
    fails with ENOSPC (on that rank only)."""
    out = tmp_path_factory.mktemp("disk_full") / "run"
    cmd = _launch(
        base["job"],
        out,
        2,
        "--domain",
        "2",
        "--tp",
        "1",
        "--set",
        "ds.zero_optimization.stage=1",
        "--set",
        "checkpoint.every=2",
        "--set",
        "train.steps=4",
    )
    run = _run(_faulty(cmd, base["wrapper"]), FAULT="enospc", FAULT_AT="step00000004", FAULT_RANK="1")
    return {"cmd": cmd, "root": out / "checkpoints", "run": run}


def test_disk_full_on_one_rank_says_so_and_keeps_the_previous_checkpoint(disk_full):
    """The job stops on every rank (no rank left waiting) saying no space is left, on which file
    system, at which step and file; `latest` still names step 2 and nothing of step 4 is left."""
    run, root = disk_full["run"], disk_full["root"]
    msg = run.stdout + run.stderr
    assert run.returncode == 1 and "no space left on /" in msg, msg[-3000:]
    assert "while writing checkpoint step 4" in msg and "__1_0.distcp" in msg and "on rank 1" in msg, msg[-3000:]
    assert f"previous checkpoint is kept ({root / 'step00000002'}" in msg, msg[-3000:]
    assert (root / "latest").read_text().strip() == "step00000002"
    assert sorted(d.name for d in root.iterdir() if d.is_dir()) == ["step00000002"]
    from jigsaw_ext.checkpoint import verify

    assert verify(root)["problems"] == [] and verify(root)["verified"]


def test_after_disk_full_the_same_command_resumes(disk_full):
    """The same command without the fault resumes from step 2 and finishes."""
    root = disk_full["root"]
    rerun = _run(disk_full["cmd"])
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"resuming from {root / 'step00000002'} (step 2)" in rerun.stdout
    assert (root / "latest").read_text().strip() == "step00000004"


def test_a_really_full_file_system(base, tmp_path):
    """checkpoint.dir on a 3 MiB tmpfs (one checkpoint fits, two do not): the error on the full disk
    is reported as no space left on that file system; the step-2 checkpoint stays complete and
    named, the partial step-4 directory is removed."""
    with small_tmpfs(tmp_path / "small", "3m") as mnt:
        root = mnt / "checkpoints"
        run = _run(
            _launch(
                base["job"],
                tmp_path / "run",
                1,
                *ONE,
                "--set",
                "train.steps=4",
                "--set",
                f"checkpoint.dir={json.dumps(str(root))}",
                launcher="python",
            )
        )
        msg = run.stdout + run.stderr
        assert run.returncode == 1 and f"no space left on {mnt} (" in msg, msg[-3000:]
        assert "while writing checkpoint step 4" in msg and "no pointer moved" in msg, msg[-3000:]
        assert (root / "latest").read_text().strip() == "step00000002"
        assert sorted(d.name for d in root.iterdir() if d.is_dir()) == ["step00000002"]
        from jigsaw_ext.checkpoint import verify

        assert verify(root)["verified"] and verify(root)["problems"] == []
