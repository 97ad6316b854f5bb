"""The model on every mesh equals its single-process twin (what `python -m weathermixer.selfcheck`
checks; `python -m jigsaw_ext.selfcheck` runs the same check on a generic block-sharded mixer), and
the check fails when one of the published implementation's defects is put back."""

import re
import subprocess
import sys

import pytest

from jigsaw_ext.selfcheck import FP32_TOL
from jigsaw_ext.testing import run_workers
from tests import workers

pytestmark = pytest.mark.distributed

MESHES = [(1, 1, 1), (1, 2, 1), (1, 1, 2), (2, 1, 1), (1, 2, 2), (2, 2, 2), (1, 4, 2), (1, 2, 4), (1, 3, 1), (1, 1, 3)]


def _errors(dp, domain, tp, **kw):
    mesh = dict(
        dp=dp,
        domain=domain,
        tp=tp,
        replicate_weights_over=kw.pop("replicate", []),
        keep_gathered_weights=kw.pop("keep", False),
        chunk_mb=kw.pop("chunk_mb", None),
        prefetch_weights=kw.pop("prefetch", False),
    )
    return run_workers(
        workers.selfcheck,
        dp * domain * tp,
        mesh,
        kw.pop("dtype", "fp32"),
        kw.pop("overrides", None),
        kw.pop("defect", None),
        kw.pop("strategies", (None,)),
        timeout=300,
        preload=["weathermixer.model"],
    )[0]


@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: "x".join(map(str, m)))
def test_every_mesh_and_strategy_is_the_same_model(mesh):
    """Every way a mixing MLP can meet its data (weights gathered, weights stationary, features
    gathered where that is available: the others there) on every mesh, with their LayerNorms."""
    errors = _errors(*mesh, strategies=("gather", "stationary", "features"))
    for strategy, errs in errors.items():
        assert max(errs.values()) <= FP32_TOL, (strategy, errs)


def test_replicated_weights_tendency_head_and_other_patches():
    """Weights replicated over both axes: 'features' is available to both mixers (its weight
    gradients all-reduced over the storage axis)."""
    errors = _errors(
        1,
        2,
        2,
        replicate=["domain", "tp"],
        strategies=(None, "features"),
        overrides=dict(head="tendency", patch=(1, 6), rollout=1, grid=(24, 24), pad_to_patch=False),
    )
    for strategy, errs in errors.items():
        assert max(errs.values()) <= FP32_TOL, (strategy, errs)


def test_gathered_weights_kept_across_micro_batches_are_the_same_model():
    """mesh.keep_gathered_weights: one gather per optimizer step (the optimizer's in-place update
    invalidates what was kept), every weight gathered (strategy gather), uneven shards."""
    errors = _errors(1, 2, 3, strategies=("gather",), keep=True)["gather"]
    assert max(errors.values()) <= FP32_TOL, errors


@pytest.mark.parametrize("mesh", [(1, 2, 3), (1, 3, 1)], ids=lambda m: "x".join(map(str, m)))
def test_prefetched_weight_gathers_are_the_same_model_and_all_used(mesh):
    """mesh.prefetch_weights: each gathered layer starts the next one's weight gather (latent rollout
    of 2 steps, every lead decoded; activation checkpointing off and on), uneven shards. In one
    forward every prefetch is used by its layer, none is started in backward (the checkpointed
    recompute gathers for itself) and none is left in flight."""
    dp, domain, tp = mesh
    for rank, r in enumerate(
        run_workers(
            workers.prefetch_against_serial,
            dp * domain * tp,
            dict(dp=dp, domain=domain, tp=tp),
            timeout=300,
            preload=["weathermixer.model"],
        )
    ):
        assert r["max_err_checkpoint_False"] <= FP32_TOL and r["max_err_checkpoint_True"] <= FP32_TOL, (rank, r)
        assert r["chained"] > 4 and r["forward"]["started"] > r["chained"], (rank, r)  # blocks run twice
        assert r["forward"]["used"] == r["forward"]["started"], (rank, r)
        assert r["after_backward"] == r["forward"] and r["left"] == 0, (rank, r)


@pytest.mark.parametrize("mesh", [(1, 2, 3), (1, 3, 1), (1, 1, 3), (2, 2, 1)], ids=lambda m: "x".join(map(str, m)))
def test_chunked_weights_and_partial_sums_are_the_same_model(mesh):
    """mesh.chunk_mb so small that every gathered weight, weight gradient and buffer of partial sums
    moves in several (uneven) chunks: weight chunks pipelined, rows reduce-scattered in chunks."""
    errors = _errors(*mesh, strategies=("gather",), chunk_mb=0.002)["gather"]
    assert max(errors.values()) <= FP32_TOL, errors


def test_chunked_partial_sums_with_replicated_weights_are_the_same_model():
    """Replicated weights (their gradients all-reduced once, not per chunk), gathered and features."""
    errors = _errors(1, 2, 3, replicate=["domain"], strategies=("gather", "features"), chunk_mb=0.002)
    for strategy, errs in errors.items():
        assert max(errs.values()) <= FP32_TOL, (strategy, errs)


def test_bf16_autocast_stays_close():
    for strategy, errors in _errors(1, 2, 2, dtype="bf16", strategies=("gather", "stationary", "features")).items():
        assert max(errors.values()) <= 5e-2, (strategy, errors)
        assert errors["loss"] <= 1e-3, (strategy, errors)


@pytest.mark.parametrize("defect", ["per_shard_layernorm", "per_rank_seed"])
def test_published_defects_are_caught(defect):
    errors = _errors(1, 1, 2, defect=defect) if defect == "per_shard_layernorm" else _errors(1, 2, 1, defect=defect)
    assert errors["output"] > 1e-3, errors


@pytest.mark.parametrize("mesh", [(1, 3, 2), (2, 2, 1), (1, 1, 4)], ids=lambda m: "x".join(map(str, m)))
def test_generic_selfcheck_model_knows_no_weather(mesh):
    dp, domain, tp = mesh
    errors = run_workers(workers.generic_selfcheck, dp * domain * tp, dict(dp=dp, domain=domain, tp=tp), timeout=300)[0]
    assert max(errors.values()) <= FP32_TOL, errors


@pytest.mark.parametrize("module", ["weathermixer.selfcheck", "jigsaw_ext.selfcheck"])
def test_cli_prints_verdict_line_and_exit_code(module):
    run = subprocess.run(
        [sys.executable, "-m", module, "--domain", "2", "--tp", "2"], capture_output=True, text=True, timeout=300
    )
    last = run.stdout.strip().splitlines()[-1]
    assert run.returncode == 0 and re.fullmatch(r"selfcheck PASS max_rel_err=\S+", last), run.stdout + run.stderr
    for quantity in ("output", "loss", "input_grad", "param_grad", "params_after_steps"):
        assert quantity in run.stdout
    bad = subprocess.run([sys.executable, "-m", module, "--domain", "40"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "selfcheck FAIL" in bad.stdout and "mesh.domain=40" in bad.stdout
