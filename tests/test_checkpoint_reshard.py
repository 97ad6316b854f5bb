"""Checkpoints that outlive their layout: consolidate, reshard to other meshes and ZeRO stages,
resume there on the same loss curve; bit-identical round trips; bad checkpoints named."""
import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jigsaw_ext.checkpoint import CheckpointFormatError, Consolidated, consolidate, inspect, main as ckpt_main
from tests.test_training_runs import ENV, ROOT, STEPS, _max_rel, _run, _train, small_job

N = 3


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Uninterrupted 1x1x1 reference (6 steps) and the first N steps on 1x2x2 with ZeRO-1."""
    tmp = tmp_path_factory.mktemp("reshard")
    job = small_job(tmp, rollout=2, resume="auto")
    ref, _ = _train(job, tmp / "ref", (1, 1, 1), "checkpoint.resume=never", launcher="python")
    first, _ = _train(job, tmp / "src", (1, 2, 2), "ds.zero_optimization.stage=1", f"train.stop_after={N}")
    assert sorted(first) == list(range(1, N + 1)) and _max_rel(first, {s: ref[s] for s in first}) <= 1e-5
    return {"tmp": tmp, "job": job, "ref": ref, "src": tmp / "src" / "checkpoints"}


def _tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def _data_position(path) -> dict:
    st = Consolidated(path).index["trainer_state"]["loader"]["sampler"]
    return {"epoch": st["epoch"], "samples": st["step"] * st["batch"] * st["dp"], "seed": st["seed"], "n": st["n"]}


def _same_tensors(a: Consolidated, b: Consolidated) -> list:
    assert list(a.index["tensors"]) == list(b.index["tensors"])
    return [(n, k) for n in a.index["tensors"] for k in ("param", "exp_avg", "exp_avg_sq")
            if not torch.equal(a.full(n, k), b.full(n, k))]


def test_reshard_resume_on_other_meshes_matches_the_uninterrupted_run(runs):
    """1x2x2 ZeRO-1 after 3 steps -> reshard to 2x1x2 ZeRO-2 and to 1x1x1 ZeRO-0 -> 3 more steps on
    each: the losses equal the uninterrupted 1x1x1 run. A consolidated checkpoint also starts a
    2x1x1 ZeRO-3 run directly. Round trips consolidate -> reshard -> consolidate are bit-identical,
    and the source checkpoint is never modified."""
    tmp, job, ref, src = runs["tmp"], runs["job"], runs["ref"], runs["src"]
    before = _tree_digest(src)
    cons = consolidate(src, tmp / "cons", log=None)
    info = inspect(cons)
    assert info["mesh"]["domain"] == 2 and info["zero_stage"] == 1 and info["step"] == N
    assert info["parameters"] == 162_048
    tail = {s: ref[s] for s in range(N + 1, STEPS + 1)}
    targets = {"2x1x2-zero2": ((2, 1, 2), 2, True), "1x1x1-zero0": ((1, 1, 1), 0, True),
               "1x1x2-zero3": ((1, 1, 2), 3, False)}  # the last: round trip only
    for name, ((dp, domain, tp), stage, train) in targets.items():
        out = tmp / f"resharded-{name}"
        rc = ckpt_main(["reshard", str(src), str(out), "--dp", str(dp), "--domain", str(domain), "--tp", str(tp),
                        "--zero-stage", str(stage)])
        assert rc == 0 and (out / "latest").read_text().strip() == f"step{N:08d}"
        again = consolidate(out, tmp / f"cons-{name}", log=None)
        assert _same_tensors(Consolidated(cons), Consolidated(again)) == []
        for key in ("step", "optimizer", "lr_scheduler", "engine", "best"):
            assert Consolidated(cons).index[key] == Consolidated(again).index[key], key
        assert _data_position(cons) == _data_position(again)  # samples consumed, whatever the mesh
        if not train:
            continue
        losses, run = _train(job, tmp / f"run-{name}", (dp, domain, tp), f"ds.zero_optimization.stage={stage}",
                             f"ds.train_micro_batch_size_per_gpu={8 // dp}", f"checkpoint.resume={out}")
        assert f"resuming from {out}" in run.stdout
        assert _max_rel({s: losses[s] for s in tail}, tail) <= 1e-5, name
    # a consolidated checkpoint as the start of a run on another mesh and ZeRO stage
    losses, run = _train(job, tmp / "run-cons-z3", (2, 1, 1), "ds.zero_optimization.stage=3",
                         "ds.train_micro_batch_size_per_gpu=4", f"checkpoint.resume={cons}")
    assert "starting from consolidated checkpoint" in run.stdout
    assert _max_rel({s: losses[s] for s in tail}, tail) <= 1e-5
    assert _tree_digest(src) == before


def test_init_from_and_bad_checkpoints_are_named(runs, tmp_path):
    job, src = runs["job"], runs["src"]
    tag = src / f"step{N:08d}"
    # weights only (fine-tuning) on another mesh: step 1 of the new run starts from the trained weights
    losses, run = _train(job, tmp_path / "ft", (1, 1, 2), "checkpoint.resume=never", f"checkpoint.init_from={src}",
                         "train.steps=2")
    assert "fine-tuning" in run.stdout and sorted(losses) == [1, 2]
    assert losses[1] < runs["ref"][1] * 0.99  # trained weights, not the initial ones

    # a damaged copy: truncated shard, missing shard; the source stays untouched
    bad = tmp_path / "bad"
    import shutil
    shutil.copytree(tag, bad)
    victim = next(bad.glob("zero_pp_rank_0_mp_rank_01_optim_states.pt"))
    victim.write_bytes(victim.read_bytes()[:1000])
    with pytest.raises(CheckpointFormatError, match="mp_rank_01_optim_states.pt: truncated: 1000 bytes"):
        consolidate(bad, tmp_path / "out1", log=None)
    victim.unlink()
    with pytest.raises(CheckpointFormatError, match="mp_rank_01_optim_states.pt: missing shard"):
        consolidate(bad, tmp_path / "out2", log=None)
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists()
    (bad / "COMPLETE").unlink()
    with pytest.raises(CheckpointFormatError, match="no COMPLETE marker"):
        consolidate(bad, tmp_path / "out3", log=None)
    # a target mesh that cannot split the model (32 latitude rows of patches over 64 domain ranks)
    r = subprocess.run([sys.executable, "-m", "jigsaw_ext.checkpoint", "reshard", str(tag), str(tmp_path / "r"),
                        "--domain", "64"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "cannot split the model" in r.stderr, r.stderr[-1500:]
    # a checkpoint of another model config: resume and init_from name the differing key
    one = ["--domain", "1", "--tp", "1"]
    run = _run([sys.executable, "train.py", *one, "--deepspeed_config", str(job), "--output-dir", str(tmp_path / "o"),
                "--set", "model.hidden=48", "--resume", str(consolidate(src, tmp_path / "cons", log=None)),
                "--steps", "4"])
    assert run.returncode == 2 and "model.hidden" in run.stderr and "Traceback" not in run.stderr, run.stderr[-1500:]
    run = _run([sys.executable, "train.py", *one, "--deepspeed_config", str(job), "--output-dir", str(tmp_path / "o2"),
                "--set", "model.hidden=48", "--init-from", str(tag), "--resume", "never"])
    assert run.returncode != 0 and "embed" in run.stderr and "another model config" in run.stderr, run.stderr[-1500:]
    # a DeepSpeed checkpoint resumed on another mesh: told how to convert it
    run = _run([sys.executable, "train.py", *one, "--deepspeed_config", str(job), "--output-dir", str(tmp_path / "o3"),
                "--resume", str(tag)])
    assert run.returncode != 0 and "jigsaw_ext.checkpoint reshard" in run.stderr, run.stderr[-1500:]
    # inspect prints the summary
    r = subprocess.run([sys.executable, "-m", "jigsaw_ext.checkpoint", "inspect", str(tag)], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "1x2x2" in r.stdout and "ZeRO-1" in r.stdout and "162,048 parameters" in r.stdout
    assert "blocks.0.token_mixing.fc1.weights.0" in r.stdout
