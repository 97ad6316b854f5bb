"""Layout-free checkpoints: a run stopped on one mesh continues on another (`--resume auto`, nothing to
run first) on exactly the loss curve of the run that wrote the checkpoint; the DCP metadata is never
unpickled freely; old-format checkpoints are named with how to convert them; inspect and export.

The run that writes the checkpoint (1x2x2 ZeRO-1, 6 steps, a checkpoint at step 3) is itself the
uninterrupted reference: each target gets a copy of its run folder with `latest` at step 3."""

import json
import os
import pickle
import shutil
import sys
from pathlib import Path

import pytest
import torch

from jigsaw_ext.checkpoint import main as ckpt_main
from tests.integration.test_training_runs import _max_rel, _train, small_job

pytestmark = pytest.mark.distributed

N, STEPS = 3, 6


def _source(tmp: Path, job: Path, name: str, *settings) -> dict:
    losses, run = _train(job, tmp / name, (1, 2, 2), "ds.zero_optimization.stage=1", "checkpoint.every=3", *settings)
    assert sorted(losses) == list(range(1, STEPS + 1)), run.stdout[-2000:]
    root = tmp / name / "checkpoints"
    assert (root / "step00000003" / "COMPLETE").is_file()
    return {"losses": losses, "out": tmp / name}


def _resume_on(src: dict, tmp: Path, job: Path, name: str, mesh, stage: int, *settings):
    """A copy of the source run folder with `latest` at step 3, continued on `mesh` with --resume auto."""
    out = tmp / name
    shutil.copytree(src["out"], out, ignore=shutil.ignore_patterns("step00000006", "metrics.csv", "RUN.lock"))
    (out / "checkpoints" / "latest").write_text("step00000003\n")
    dp = mesh[0]
    losses, run = _train(
        job,
        out,
        mesh,
        f"ds.zero_optimization.stage={stage}",
        f"ds.train_micro_batch_size_per_gpu={8 // dp}",
        "checkpoint.resume=auto",
        *settings,
    )
    assert "(step 3) on mesh" in run.stdout and "written on 1x2x2 ZeRO-1" in run.stdout, run.stdout[-2000:]
    assert sorted(losses) == list(range(N + 1, STEPS + 1)), run.stdout[-2000:]
    return losses


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("layout_free")
    job = small_job(tmp, rollout=2, resume="auto")
    return {"tmp": tmp, "job": job, "fp32": _source(tmp, job, "src")}


def test_elastic_resume_on_other_meshes_and_zero_stages_continues_the_same_curve(runs):
    """1x2x2 ZeRO-1 -> 2x1x2 ZeRO-2, 1x1x1 ZeRO-0 and 2x2x1 ZeRO-3: steps 4-6 equal the run that
    wrote the checkpoint (fp32, <= 1e-5), with the data position converted to the new dp."""
    from jigsaw_ext.checkpoint import full_tensors

    tmp, job, src = runs["tmp"], runs["job"], runs["fp32"]
    tail = {s: src["losses"][s] for s in range(N + 1, STEPS + 1)}
    kinds = ("param", "exp_avg", "exp_avg_sq")
    final = {k: dict(full_tensors(src["out"] / "checkpoints" / "step00000006", k)) for k in kinds}
    for name, mesh, stage in (("2x1x2-z2", (2, 1, 2), 2), ("1x1x1-z0", (1, 1, 1), 0), ("2x2x1-z3", (2, 2, 1), 3)):
        losses = _resume_on(src, tmp, job, name, mesh, stage)
        assert _max_rel(losses, tail) <= 1e-5, (name, losses, tail)
        # what this mesh and ZeRO stage saved at the end is the source run's state at step 6 (measured:
        # <= 7.6e-7 of each tensor's largest value; a block at a wrong offset would differ by O(1))
        for kind in kinds:
            for pname, t in full_tensors(tmp / name / "checkpoints" / "step00000006", kind):
                ref = final[kind][pname]
                err = (t - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30)
                assert err <= 1e-5, (name, kind, pname, err)


def test_bf16_resume_on_another_zero_stage_equals_its_own_uninterrupted_run(runs):
    """bf16: the master weights and moments are fp32, the bf16 parameters are restored as their
    rounding: 1x2x2 ZeRO-1 -> 1x2x2 ZeRO-2 continues its own uninterrupted bf16 curve (<= 1e-5)."""
    tmp, job = runs["tmp"], runs["job"]
    src = _source(tmp, job, "src-bf16", "ds.bf16.enabled=true")
    tail = {s: src["losses"][s] for s in range(N + 1, STEPS + 1)}
    losses = _resume_on(src, tmp, job, "bf16-1x2x2-z2", (1, 2, 2), 2, "ds.bf16.enabled=true")
    assert _max_rel(losses, tail) <= 1e-5, (losses, tail)


def test_inspect_and_export(runs, tmp_path, capsys):
    """inspect names the layout, step, sizes and versions; export writes the full fp32 weights by
    name (one file, or shards with an index) and they are the weights a 1x1x1 model loads."""
    from jigsaw_ext.checkpoint.export import read_export

    tag = runs["fp32"]["out"] / "checkpoints" / "step00000003"
    assert ckpt_main(["inspect", str(tag)]) == 0
    out = capsys.readouterr().out
    assert "(layout-free): written on mesh 1x2x2" in out and "ZeRO-1" in out and "step 3" in out, out
    assert "162,048 parameters" in out and "deepspeed 0.19" in out and "megatron-core" in out, out
    one, many = tmp_path / "w.safetensors", tmp_path / "w"
    assert ckpt_main(["export", str(tag), str(one)]) == 0
    assert ckpt_main(["export", str(tag), str(many), "--max-shard-gb", "0.0002"]) == 0
    capsys.readouterr()
    a, meta = read_export(one)
    b, _ = read_export(many)
    info = json.loads((tag / "job.json").read_text())
    assert meta["step"] == "3" and json.loads(meta["job"])["model"] == info["model"]
    assert sorted(a) == sorted(info["layouts"]) and len(list(many.glob("model-*.safetensors"))) > 1
    for name, t in a.items():
        assert list(t.shape) == info["layouts"][name]["shape"] and t.dtype == torch.float32
        assert torch.equal(t, b[name]), name
    # the weights of a 1x1x1 model loaded from the checkpoint are the exported ones
    from jigsaw_ext.checkpoint import load_into_model
    from jigsaw_ext.mesh import Mesh
    from weathermixer.config import ModelConfig
    from weathermixer.model import WeatherMixer

    model = WeatherMixer(ModelConfig(**info["model"]), Mesh.single())
    load_into_model(model, tag)
    bad = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), a[n])]
    assert not bad, bad[:3]
    assert ckpt_main(["export", str(tag), str(one)]) == 2  # exists: refused
    assert ckpt_main(["reshard", str(tag), str(tmp_path / "r")]) == 2
    assert "resumes on any mesh" in capsys.readouterr().err


class _Boom:
    def __reduce__(self):
        return (os.system, (f"touch {_Boom.marker}",))


def test_a_malicious_dcp_metadata_is_refused(runs, tmp_path):
    """A .metadata whose pickle would call os.system: refused naming the file and the global; the
    command never ran. The real files read through the allowlist."""
    from jigsaw_ext.checkpoint.dcp_metadata import read_metadata
    from jigsaw_ext.checkpoint.errors import UnsafeMetadataError
    from jigsaw_ext.checkpoint.sharded import read_full, stored_keys

    tag = runs["fp32"]["out"] / "checkpoints" / "step00000003"
    good = tag / "state" / "00000"
    assert read_metadata(good).state_dict_metadata and stored_keys(good)
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    _Boom.marker = tmp_path / "ran"
    (bad / ".metadata").write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(UnsafeMetadataError, match=r"bad/\.metadata: refused.*(posix|os)\.system"):
        read_metadata(bad)
    with pytest.raises(UnsafeMetadataError):
        read_full(bad, ["param/embed.weights.0"])
    assert not _Boom.marker.exists()


def test_old_format_checkpoints_are_named_with_how_to_convert(runs, tmp_path):
    """A tag of the DeepSpeed 0.19 per-rank format (job.json without a layout-free state) is refused
    at resume with the conversion command. `consolidate` (the converter's output format) of a
    layout-free tag writes the same tensors (weights and moments) as one directory of safetensors,
    and a run started from it on 2x1x1 ZeRO-3 continues the source's curve."""
    from weathermixer.train.checkpointing import CheckpointError, CheckpointManager

    old = tmp_path / "ck" / "step00000002"
    old.mkdir(parents=True)
    (old / "mp_rank_00_model_states.pt").write_bytes(b"PK")
    (old / "job.json").write_text(json.dumps({"mesh": {"dp": 1, "domain": 1, "tp": 1}, "zero_stage": 1}))
    (old / "COMPLETE").write_text("2\n")
    with pytest.raises(CheckpointError, match="per-rank DeepSpeed format.*jigsaw_ext.checkpoint consolidate"):
        CheckpointManager(tmp_path / "ck").load(None, tmp_path / "ck", "step00000002", {})
    from jigsaw_ext.checkpoint import Consolidated, consolidate, full_tensors

    tag = runs["fp32"]["out"] / "checkpoints" / "step00000003"
    side = tag.parent / "forecast_defaults.json"  # the re-encoding default validation keeps beside the tags
    had = side.read_text() if side.is_file() else None
    side.write_text('{"reencode_every": 3}')
    try:
        c = Consolidated(consolidate(tag, tmp_path / "c", log=None))
    finally:
        side.unlink() if had is None else side.write_text(had)
    from weathermixer.inference.inputs import forecast_defaults

    assert forecast_defaults(c.dir) == (3, str(c.dir / "forecast_defaults.json"))
    assert c.index["step"] == 3 and c.index["optimizer"]["step"] == 3 and c.index["source"]["mesh"]["tp"] == 2
    for kind in ("param", "exp_avg_sq"):
        for name, t in full_tensors(tag, kind):
            assert torch.equal(c.full(name, kind), t), (name, kind)
    assert c.index["trainer_state"]["loader"]["sampler"]["step"] == 3
    src = runs["fp32"]
    losses, run = _train(
        runs["job"],
        tmp_path / "from-cons",
        (2, 1, 1),
        "ds.zero_optimization.stage=3",
        "ds.train_micro_batch_size_per_gpu=4",
        f"checkpoint.resume={c.dir}",
    )
    assert "starting from consolidated checkpoint" in run.stdout, run.stdout[-2000:]
    assert _max_rel(losses, {s: src["losses"][s] for s in range(N + 1, STEPS + 1)}) <= 1e-5, losses


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-x", "-q"]))
