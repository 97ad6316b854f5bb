"""Checkpoints that were damaged or edited after they were written are refused by every entry point
(train.py, `python -m jigsaw_ext.checkpoint inspect --verify` / `consolidate` / `inspect`), naming
the file, never read unverified: checksums that were deleted, DCP metadata pointing outside the tag,
pointers leading to another folder, JSON files that are not UTF-8.

One short single-process run (checkpoints at steps 2 and 4) is shared; each test works on a copy."""

import dataclasses
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.test_checkpoint_integrity import DATA, ONE, _copy, _flip, _run, _verify_cli, small_tmpfs
from tests.integration.test_training_runs import ENV, ROOT, _launch, small_job


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("refusals")
    job = small_job(tmp, rollout=1, resume="auto")
    out = tmp / "base"
    run = _run(_launch(job, out, 1, *ONE, "--set", "train.steps=4", launcher="python"))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return {"tmp": tmp, "job": job, "out": out}


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "jigsaw_ext.checkpoint", *map(str, args)],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _resume(base, out: Path, *args):
    return _run(_launch(base["job"], out, 1, *ONE, "--set", "train.steps=6", *args, launcher="python"))


def test_a_tag_whose_manifest_was_deleted_is_refused(base, tmp_path):
    """A flipped byte in the latest tag's tensors and its MANIFEST.json deleted: `inspect --verify`
    exits 1, `consolidate` exits 2 leaving nothing behind, train.py refuses to resume from it and
    names the older tag."""
    root = _copy(base, tmp_path / "run")
    tag = root / "step00000004"
    _flip(tag / DATA)
    (tag / "MANIFEST.json").unlink()
    r = _verify_cli(root)
    assert r.returncode == 1 and f"DAMAGED {tag} (latest, best)" in r.stdout, r.stdout + r.stderr
    assert f"{tag / 'MANIFEST.json'}: missing; a layout-free checkpoint is always written with it" in r.stdout
    c = _cli("consolidate", tag, tmp_path / "cons")
    assert c.returncode == 2 and f"{tag / 'MANIFEST.json'}: missing" in c.stderr, c.stdout + c.stderr
    assert not list(tmp_path.glob("cons*")) and "Traceback" not in c.stderr
    run = _resume(base, tmp_path / "run")
    assert run.returncode == 2 and f"{tag / 'MANIFEST.json'}: missing" in run.stderr, run.stderr[-3000:]
    assert f"--resume {root / 'step00000002'}" in run.stderr and "resuming from" not in run.stdout


def test_a_consolidated_checkpoint_without_digests_is_refused(base, tmp_path):
    """index.json with one tensor's `digests` removed: `inspect --verify` exits 1 naming the tensor,
    train.py --resume refuses it (exit 2) naming index.json."""
    root = _copy(base, tmp_path / "run")
    cons = tmp_path / "cons"
    assert _cli("consolidate", root / "step00000002", cons).returncode == 0
    idx = json.loads((cons / "index.json").read_text())
    name = sorted(idx["tensors"])[1]
    del idx["tensors"][name]["digests"]
    (cons / "index.json").write_text(json.dumps(idx))
    r = _verify_cli(cons)
    assert r.returncode == 1 and f"lists no checksum for tensor {name} (param)" in r.stdout, r.stdout + r.stderr
    run = _resume(base, tmp_path / "new", "--resume", str(cons))
    assert run.returncode == 2 and f"{cons / 'index.json'}: lists no checksum for tensor {name}" in run.stderr, (
        run.stderr[-3000:]
    )


def _point_metadata_at(batch: Path, target: str) -> None:
    """Rewrite the DCP .metadata of `batch` so rank 0's data file is read from `target`, and record
    the new .metadata in the manifest (as a tool that rewrote both would)."""
    from jigsaw_ext.checkpoint.manifest import describe

    md = pickle.loads((batch / ".metadata").read_bytes())
    md.storage_data = {
        k: dataclasses.replace(v, relative_path=target) if v.relative_path == "__0_0.distcp" else v
        for k, v in md.storage_data.items()
    }
    (batch / ".metadata").write_bytes(pickle.dumps(md))
    tag = batch.parent.parent
    doc = json.loads((tag / "MANIFEST.json").read_text())
    doc["files"][(batch / ".metadata").relative_to(tag).as_posix()] = describe(batch / ".metadata")
    (tag / "MANIFEST.json").write_text(json.dumps(doc))


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_dcp_metadata_pointing_outside_the_tag_is_refused(base, tmp_path, where):
    """`.metadata` rewritten to read rank 0's tensors from `../../../outside.distcp` (the checkpoint
    root) or an absolute path (a readable copy lies there): every loader refuses it, `inspect
    --verify` too."""
    root = _copy(base, tmp_path / "run")
    tag = root / "step00000004"
    batch = (tag / DATA).parent
    outside = tmp_path / "outside.distcp"
    outside.write_bytes((tag / DATA).read_bytes())
    (batch / "../../../outside.distcp").resolve().write_bytes(outside.read_bytes())
    _point_metadata_at(batch, "../../../outside.distcp" if where == "parent" else str(outside))
    said = f"{batch / '.metadata'}: refused: tensor "
    r = _verify_cli(root)
    assert r.returncode == 1 and said in r.stdout and "outside the checkpoint directory" in r.stdout, r.stdout
    c = _cli("consolidate", tag, tmp_path / "cons")
    assert c.returncode == 2 and said in c.stderr and not (tmp_path / "cons").exists(), c.stderr
    e = _cli("export", tag, tmp_path / "w.safetensors")
    assert e.returncode == 2 and said in e.stderr, e.stderr
    if where == "parent":
        run = _resume(base, tmp_path / "run")
        assert run.returncode == 2 and said in run.stderr, run.stderr[-3000:]
        assert f"--resume {root / 'step00000002'}" in run.stderr


def test_a_pointer_leading_outside_the_checkpoint_folder_is_refused(base, tmp_path):
    """`latest` naming `../../other/checkpoints/step00000004` (a complete tag of another run) is not
    followed: inspect and train.py name the pointer (exit 2)."""
    root = _copy(base, tmp_path / "run")
    _copy(base, tmp_path / "other")
    (root / "latest").write_text("../../other/checkpoints/step00000004\n")
    r = _cli("inspect", root)
    assert r.returncode == 2 and f"{root / 'latest'}: names '../../other" in r.stderr, r.stdout + r.stderr
    assert _cli("inspect", "--verify", root).returncode == 2
    run = _resume(base, tmp_path / "run")
    assert run.returncode == 2 and f"{root / 'latest'}: names '../../other" in run.stderr, run.stderr[-3000:]


def test_json_files_that_are_not_utf8_are_named(base, tmp_path):
    """index.json of a consolidated checkpoint and job.json of a tag with non-UTF-8 bytes: one line
    naming the file, exit 2, no traceback."""
    root = _copy(base, tmp_path / "run")
    cons = tmp_path / "cons"
    assert _cli("consolidate", root / "step00000002", cons).returncode == 0
    (cons / "index.json").write_bytes(b'{"format": "\xff\xfe"}')
    r = _cli("inspect", cons)
    assert r.returncode == 2 and f"{cons / 'index.json'}: corrupt JSON (UnicodeDecodeError" in r.stderr, r.stderr
    job = root / "step00000002" / "job.json"
    job.write_bytes(job.read_bytes().replace(b'"mesh"', b'"m\xffsh"', 1))
    r = _cli("inspect", root / "step00000002")
    assert r.returncode == 2 and f"{job}: checksum mismatch" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_file_size_limit_is_named_when_a_checkpoint_write_fails(base, tmp_path):
    """ulimit -f of 650 bytes (torch's writer then reports only "iostream error" / "unexpected pos"):
    the checkpoint error names EFBIG and the limit, the partial tag is removed."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (650, 650))

    cmd = _launch(
        base["job"], tmp_path / "run", 1, *ONE, "--set", "train.steps=2", "--set", "log.every=100", launcher="python"
    )
    run = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240, preexec_fn=limit)
    assert run.returncode == 1 and "writing checkpoint step 2 failed" in run.stderr, run.stderr[-3000:]
    assert "EFBIG: File too large" in run.stderr or "[Errno 27] File too large" in run.stderr, run.stderr[-3000:]
    assert not list((tmp_path / "run" / "checkpoints").glob("*.partial"))


def _limited(cmd: list, size: int):
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))

    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240, preexec_fn=limit)


def test_consolidate_and_forecast_that_cannot_write_leave_nothing_and_say_why(base, tmp_path):
    """A file size limit (as a quota or a full disk would) under `consolidate` and `forecast`: one
    line naming the errno, no traceback, no OUT.partial left."""
    root = base["out"] / "checkpoints"
    c = _limited(
        [sys.executable, "-m", "jigsaw_ext.checkpoint", "consolidate", str(root), str(tmp_path / "cons")], 40_000
    )
    assert c.returncode == 2 and "File too large" in c.stderr and "Traceback" not in c.stderr, c.stderr[-3000:]
    assert not list(tmp_path.glob("cons*"))
    f = _limited(
        [
            sys.executable,
            "-m",
            "weathermixer.forecast",
            "--checkpoint",
            str(root),
            "--init-times",
            "2020-02-20T00",
            "--lead-hours",
            "12",
            "--out",
            str(tmp_path / "fc.zarr"),
            "--quiet",
        ],
        3_000,
    )
    assert f.returncode == 1 and "writing " in f.stderr and "File too large" in f.stderr, f.stderr[-3000:]
    assert "Traceback" not in f.stderr and not list(tmp_path.glob("fc.zarr*"))


def test_an_explicit_resume_tag_since_pruned_points_at_latest(base, tmp_path):
    """`--resume ROOT/step00000002` rerun after that tag was pruned (keep_last) by the run it started:
    exit 2 naming the checkpoint root's latest and how to continue from it."""
    import shutil

    root = _copy(base, tmp_path / "run")
    shutil.rmtree(root / "step00000002")  # as checkpoint.keep_last removes it once newer tags exist
    run = _resume(base, tmp_path / "run", "--resume", str(root / "step00000002"))
    assert run.returncode == 2 and "step00000002 is gone from" in run.stderr, run.stderr[-3000:]
    assert (
        f"whose latest is {root / 'step00000004'}: to continue, use --resume {root} (its latest) or --resume "
        f"auto" in run.stderr
    ), run.stderr[-3000:]


def test_a_checkpoint_that_cannot_fit_is_refused_before_writing(base, tmp_path):
    """checkpoint.dir on a 1 MiB tmpfs, a tag of about 1.9 MiB: the save stops before writing a byte,
    naming the estimate and the free space; nothing partial is left."""
    with small_tmpfs(tmp_path / "small", "1m") as mnt:
        root = mnt / "checkpoints"
        run = _run(
            _launch(
                base["job"],
                tmp_path / "run",
                1,
                *ONE,
                "--set",
                "train.steps=2",
                "--set",
                f"checkpoint.dir={json.dumps(str(root))}",
                launcher="python",
            )
        )
        msg = run.stdout + run.stderr
        assert run.returncode == 1 and f"no space left on {mnt} (" in msg, msg[-3000:]
        assert "this checkpoint needs about 1.9 MiB" in msg and "MiB are free; nothing was written" in msg, msg[-3000:]
        assert not [p for p in root.iterdir() if p.is_dir()]  # no tag, no partial folder
