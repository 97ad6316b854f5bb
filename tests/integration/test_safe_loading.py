"""Nothing a user loads can run code, and a checkpoint is all a forecast needs.

A pickle whose unpickling would create a marker file is put in place of every kind of file the
project reads (the DCP metadata and a DCP data file of a layout-free checkpoint, the trainer state, a
consolidated tensor file of formats 1 and 2, the --init-from and the forecast
checkpoint): each is refused with an error naming the file, and no marker ever appears. A forecast from a checkpoint
whose training config and stats file are gone equals the one made with them present."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from jigsaw_ext.checkpoint import CheckpointFormatError, Consolidated, consolidate
from jigsaw_ext.testing import run_workers
from tests.integration.test_training_runs import _launch, _run, small_job
from weathermixer.inference import forecast

pytestmark = pytest.mark.distributed

MODEL = "state/00000/.metadata"  # DCP's metadata pickle of the first batch of tensors
OPTIM = "state/00000/__0_0.distcp"  # rank 0's tensor data (torch.save records read with weights_only)
REFUSED = "outside the allowlist"


class _Evil:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _plant(path: Path, marker: Path) -> Path:
    """A valid torch zip file whose unpickling runs `touch marker`."""
    path.unlink(missing_ok=True)
    torch.save({"module": _Evil(marker), "optimizer_state_dict": _Evil(marker)}, path)
    return marker


def _plant_pickle(path: Path, marker: Path) -> Path:
    """A plain pickle (DCP's metadata format) whose unpickling runs `touch marker`."""
    import pickle

    path.write_bytes(pickle.dumps({"state_dict_metadata": _Evil(marker)}))
    return marker


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """Two steps of the quickstart on 1x1x1 with ZeRO-1 (a layout-free checkpoint), one process."""
    tmp = tmp_path_factory.mktemp("safe")
    job = small_job(tmp, rollout=1, resume="never")
    run = _run(
        _launch(
            job,
            tmp / "run",
            1,
            "--domain",
            "1",
            "--tp",
            "1",
            "--set",
            "ds.zero_optimization.stage=1",
            "--set",
            "train.steps=2",
            launcher="python",
        )
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    root = tmp / "run" / "checkpoints"
    tag = root / (root / "latest").read_text().strip()
    assert (tag / MODEL).is_file() and (tag / OPTIM).is_file() and (tag / "trainer_rank00000.json").is_file()
    return {"tmp": tmp, "job": job, "root": root, "tag": tag, "store": next((tmp / "synthetic").glob("*.zarr"))}


def _reseal(tag: Path) -> Path:
    """Checksums that match the planted file: whoever can plant a file can rewrite MANIFEST.json, so
    the allowlist must hold on its own (and checkpoints without a manifest still exist)."""
    from jigsaw_ext.checkpoint.manifest import describe, list_files, write_manifest

    write_manifest(tag, {rel: describe(tag / rel) for rel in list_files(tag)})
    return tag


def _copy(ckpt, where: Path) -> Path:
    """A checkpoint root holding a copy of the tag (and its latest pointer)."""
    shutil.copytree(ckpt["tag"], where / ckpt["tag"].name)
    (where / "latest").write_text(ckpt["tag"].name + "\n")
    return where / ckpt["tag"].name


def _forecast_argv(checkpoint, out, *extra):
    return [
        "--checkpoint",
        str(checkpoint),
        "--init-times",
        "2020-02-20T00",
        "--lead-hours",
        "12",
        "--out",
        str(out),
        "--quiet",
        *extra,
    ]


def _resume_worker(rank, world, info, attempts):
    """The trainer's engine (the quickstart job of the checkpoint), then each bad checkpoint in turn."""
    from weathermixer.config import parse
    from weathermixer.config.train import TrainJobConfig
    from weathermixer.train.job import check_job
    from weathermixer.train.trainer import Trainer

    job = parse(TrainJobConfig, info["weathermixer"], "test")
    ds = dict(info["deepspeed"])
    ds["optimizer"] = dict(ds["optimizer"], params={k: v for k, v in ds["optimizer"]["params"].items() if k != "lr"})
    t = Trainer(job, check_job(job, ds, world, cuda=False), log=lambda *a, **k: None)
    t._setup_engine()
    expect = {k: v for k, v in t._job_info().items() if k in ("mesh", "model", "zero_stage")}
    out = []
    for kind, path in attempts:
        try:
            if kind == "consolidated":
                t.load_consolidated(path)
            else:
                t.ckpt.load(t.engine, Path(path).parent, Path(path).name, expect)
            out.append("loaded")
        except Exception as err:  # noqa: BLE001 - reported to the test
            out.append(f"{type(err).__name__}: {err}")
    return out


def test_nothing_loaded_runs_code(ckpt, tmp_path, capsys):
    markers = []

    def marker(name):
        markers.append(tmp_path / f"MARKER-{name}")
        return markers[-1]

    # the layout-free tensors: DCP's metadata pickle (refused by the allowlist) and a data file
    # (read by DCP with weights_only=True: never unpickled freely; named as unreadable)
    bad_model = _copy(ckpt, tmp_path / "bad_model")
    _plant_pickle(bad_model / MODEL, marker("model"))
    bad_optim = _copy(ckpt, tmp_path / "bad_optim")
    _plant(bad_optim / OPTIM, marker("optim"))
    _reseal(bad_model), _reseal(bad_optim)
    with pytest.raises(CheckpointFormatError, match=f"{MODEL}: refused.*posix.system.*{REFUSED}"):
        consolidate(bad_model, tmp_path / "cons-bad_model", log=None)
    with pytest.raises(CheckpointFormatError, match="state/00000: unreadable"):
        consolidate(bad_optim, tmp_path / "cons-bad_optim", log=None)
    # the trainer state: an old-style pickle (trainer_rank00000.pt) and a corrupt safetensors file
    bad_state = _copy(ckpt, tmp_path / "bad_state")
    for f in bad_state.glob("trainer_rank00000.*"):
        f.unlink()
    _plant(bad_state / "trainer_rank00000.pt", marker("state"))
    bad_state_st = _copy(ckpt, tmp_path / "bad_state_st")
    st = bad_state_st / "trainer_rank00000.safetensors"
    _plant(st, marker("state-st"))
    _reseal(bad_state), _reseal(bad_state_st)
    with pytest.raises(CheckpointFormatError, match=f"trainer_rank00000.pt: refused.*{REFUSED}"):
        consolidate(bad_state, tmp_path / "cons-state", log=None)
    with pytest.raises(CheckpointFormatError, match="trainer_rank00000.safetensors: not a readable safetensors"):
        consolidate(bad_state_st, tmp_path / "cons-state-st", log=None)

    # consolidated: the current format with a pickle for a safetensors file, and format 1
    good = consolidate(ckpt["tag"], tmp_path / "good", log=None)
    names = list(Consolidated(good).index["tensors"])
    bad_cons = tmp_path / "bad_cons"
    shutil.copytree(good, bad_cons)
    idx = json.loads((bad_cons / "index.json").read_text())
    _plant(bad_cons / idx["tensors"][names[0]]["files"]["param"], marker("cons"))
    from jigsaw_ext.checkpoint.manifest import describe  # resealed: index.json's digest matches the plant

    sealed = json.loads(json.dumps(idx))
    sealed["tensors"][names[0]]["digests"]["param"] = describe(bad_cons / idx["tensors"][names[0]]["files"]["param"])
    (bad_cons / "index.json").write_text(json.dumps(sealed))
    with pytest.raises(CheckpointFormatError, match=r"00000\.param\.safetensors: not a readable safetensors"):
        Consolidated(bad_cons).full(names[0])
    old = tmp_path / "old_cons"  # format 1: torch pickles, the first one planted
    shutil.copytree(good, old)
    for i, (name, entry) in enumerate(idx["tensors"].items()):
        for kind, rel in entry["files"].items():
            entry["files"][kind] = rel.replace(".safetensors", ".pt")
            if i == 0 and kind == "param":
                _plant(old / entry["files"][kind], marker("old-cons"))
            else:
                torch.save(Consolidated(good).full(name, kind), old / entry["files"][kind])
    (old / "index.json").write_text(json.dumps(dict(idx, format="jigsaw-consolidated/1")))
    with pytest.raises(
        CheckpointFormatError, match="jigsaw-consolidated/1.*re-running `python -m jigsaw_ext.checkpoint consolidate"
    ):
        Consolidated(old)

    # python -m weathermixer.forecast --checkpoint: each bad checkpoint is one line naming the file, exit 2
    for path, expected in (
        (bad_model, f"{MODEL}: refused"),
        (bad_cons, "00000.param.safetensors: not a readable"),
        (old, "re-running `python -m jigsaw_ext.checkpoint consolidate"),
    ):
        assert forecast.main(_forecast_argv(path, tmp_path / "fc.zarr")) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and expected in err, err
    # resuming (DeepSpeed's engine through the trainer's checkpoint manager) and a consolidated start
    info = json.loads((ckpt["tag"] / "job.json").read_text())
    attempts = [
        ("ds", str(bad_model)),
        ("ds", str(bad_optim)),
        ("ds", str(bad_state)),
        ("ds", str(bad_state_st)),
        ("consolidated", str(bad_cons)),
        ("consolidated", str(old)),
    ]
    got = run_workers(
        _resume_worker, 1, info, attempts, timeout=240, preload=["deepspeed", "weathermixer.train.trainer"]
    )[0]
    expected = [
        f"{MODEL}: refused",
        "state/00000: reading failed on rank 0",
        "trainer_rank00000.pt: refused",
        "trainer_rank00000.safetensors: not a readable",
        "00000.param.safetensors: not a readable",
        "re-running `python -m jigsaw_ext.checkpoint consolidate",
    ]
    for (_kind, path), text, msg in zip(attempts, expected, got, strict=True):
        assert msg.startswith("CheckpointError") and text in msg, (path, msg)
        assert REFUSED in msg or "refused" not in text, msg
    # --init-from: the whole job stops with the file named
    run = _run(
        _launch(
            ckpt["job"],
            tmp_path / "ft",
            1,
            "--domain",
            "1",
            "--tp",
            "1",
            "--set",
            "train.steps=1",
            "--init-from",
            str(bad_model),
            "--resume",
            "never",
            launcher="python",
        )
    )
    assert run.returncode != 0 and f"{MODEL}: refused" in run.stderr and REFUSED in run.stderr, run.stderr[-2000:]
    assert "Traceback" not in run.stderr, run.stderr[-2000:]

    assert [m.name for m in markers if m.exists()] == []


def test_checkpoints_record_what_a_forecast_needs(ckpt):
    """job.json of a real checkpoint carries statistics, data mapping, versions and the git commit."""
    info = json.loads((ckpt["tag"] / "job.json").read_text())
    stats = json.loads(Path(str(ckpt["store"]) + ".stats.json").read_text())
    assert info["stats"] == stats
    assert info["data"]["path"] == str(ckpt["store"]) and "variables" in info["data"] and "dims" in info["data"]
    versions = info["provenance"]["versions"]
    assert versions["torch"] == torch.__version__ and versions["deepspeed"] and versions["megatron-core"]
    assert versions["jigsaw-weathermixer"]
    commit = info["provenance"]["git_commit"]
    assert commit is None or len(commit) == 40
    cons = consolidate(ckpt["tag"], ckpt["tmp"] / "self-contained", log=None)
    idx = json.loads((cons / "index.json").read_text())
    assert (
        idx["format"] == "jigsaw-consolidated/2"
        and idx["app"]["stats"] == stats
        and idx["app"]["provenance"] == info["provenance"]
    )
    assert all(f.suffix == ".safetensors" for f in (cons / "tensors").iterdir())
    assert not any(p.suffix == ".pt" for p in cons.rglob("*"))


def test_forecast_needs_neither_the_training_config_nor_its_stats_file(ckpt, tmp_path, capsys):
    store, tag = ckpt["store"], ckpt["tag"]
    stats = Path(str(store) + ".stats.json")
    ref = tmp_path / "with-stats.zarr"  # normalised with the stats file itself
    assert forecast.main(_forecast_argv(tag, ref, "--stats", str(stats))) == 0
    cons = consolidate(tag, tmp_path / "cons", log=None)
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    shutil.move(stats, hidden / stats.name)
    shutil.move(ckpt["job"], hidden / "job.json")
    try:
        outs = [tmp_path / "no-stats.zarr", tmp_path / "no-stats-consolidated.zarr"]
        assert forecast.main(_forecast_argv(tag, outs[0])) == 0
        assert forecast.main(_forecast_argv(cons, outs[1])) == 0
        capsys.readouterr()
        a = xr.open_zarr(ref, chunks=None, consolidated=False)
        for out in outs:
            b = xr.open_zarr(out, chunks=None, consolidated=False)
            assert set(a.data_vars) == set(b.data_vars) and b.attrs["normalisation_statistics"] == "checkpoint"
            for v in a.data_vars:
                np.testing.assert_array_equal(a[v].values, b[v].values, err_msg=f"{out.name} {v}")
        # --stats given explicitly still wins over the recorded statistics
        empty = tmp_path / "empty.json"
        empty.write_text(json.dumps({"channels": {}, "static": {}}))
        assert forecast.main(_forecast_argv(tag, tmp_path / "x.zarr", "--stats", str(empty))) == 2
        assert "no channels statistics" in capsys.readouterr().err
    finally:
        shutil.move(hidden / stats.name, stats)
        shutil.move(hidden / "job.json", ckpt["job"])
