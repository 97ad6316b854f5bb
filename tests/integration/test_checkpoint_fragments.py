"""Fragment-aligned saving of layout-free checkpoints (jigsaw_ext.checkpoint: engine_state.state_fragment,
sharded.fragment_parts / flat_boxes / tight): every rank writes, straight from the engine's storage,
only the part of each block in its own ZeRO partition (rows straddling two partitions as partial-row
boxes), with no dp collective; what is written equals what the full-block accessors write, and it
loads on another mesh and ZeRO stage.

Real DeepSpeed engines of the quickstart model (gloo, one process per rank); every master weight and
moment is set to a deterministic function of its global position first, so the replicas agree and
the expected tensors are known."""

import math
import sys
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from jigsaw_ext.checkpoint.engine_state import Fragment, FragmentMappingError, zero12_fragment
from jigsaw_ext.checkpoint.sharded import flat_boxes, tight

pytestmark = pytest.mark.distributed

KINDS = ("param", "exp_avg", "exp_avg_sq")


def expected(name: str, kind: str, shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(f"{kind}/{name}".encode()))
    t = torch.randn(tuple(shape), generator=g)
    return t.abs() * 1e-3 if kind == "exp_avg_sq" else t


# ------------------------------------------------------------------------------------------------
def test_flat_boxes_cover_a_flat_range_exactly_in_order():
    """Every flat range of every small shape: contiguous boxes, in order, covering it exactly, at most
    2 ndim - 1 of them; a deliberately wrong decomposition would fail the element check."""
    import random

    rnd = random.Random(0)
    for _ in range(4000):
        shape = tuple(rnd.randint(1, 5) for _ in range(rnd.randint(0, 4)))
        n = math.prod(shape)
        a = rnd.randint(0, n)
        b = rnd.randint(a, n)
        full = torch.arange(n).view(shape)
        boxes, pos = flat_boxes(shape, a, b), a
        assert len(boxes) <= max(1, 2 * len(shape) - 1), (shape, a, b, boxes)
        for f, o, z in boxes:
            assert f == pos, (shape, a, b, boxes)
            got = full[tuple(slice(i, i + k) for i, k in zip(o, z, strict=True))].reshape(-1).tolist()
            assert got == list(range(f, f + math.prod(z))), (shape, a, b, boxes)
            pos += math.prod(z)
        assert pos == b, (shape, a, b, boxes)
    assert flat_boxes((3, 4), 5, 11) == [(5, (1, 1), (1, 3)), (8, (2, 0), (1, 3))]


def test_tight_shares_memory_and_owns_exactly_its_bytes():
    t = torch.arange(100, dtype=torch.float32)
    v = tight(t[10:30].view(4, 5))
    assert v.shape == (4, 5) and v.untyped_storage().nbytes() == 80 and v.data_ptr() == t[10:].data_ptr()
    v[0, 0] = -1.0
    assert t[10] == -1.0
    assert tight(t) is t
    with pytest.raises(ValueError):
        tight(t.view(10, 10).t())


def test_the_fragment_mapping_reader_names_the_deepspeed_version_when_it_changed():
    """zero12_fragment: DeepSpeed's mapping read through one function; a missing or changed mapping is
    a FragmentMappingError naming the version (the caller then falls back to the accessors)."""
    import deepspeed

    p = torch.zeros(3, 4)
    with pytest.raises(FragmentMappingError, match=rf"no `_hp_mapping` \(DeepSpeed {deepspeed.__version__}"):
        zero12_fragment(p)
    p._hp_mapping = None
    assert zero12_fragment(p) == Fragment(0, 0)
    flat = torch.arange(20, dtype=torch.float32)
    frags = {None: flat[2:9], "exp_avg": flat[2:9] + 1, "exp_avg_sq": flat[2:9] + 2}
    p._hp_mapping = SimpleNamespace(
        lp_fragment_address=SimpleNamespace(start=5, numel=7), get_hp_fragment=lambda key=None: frags[key]
    )
    f = zero12_fragment(p)
    assert (f.start, f.numel, f.dp_replicated) == (5, 7, False)
    assert f.views["param"].data_ptr() == flat[2:].data_ptr() and torch.equal(f.views["exp_avg"], flat[2:9] + 1)
    p._hp_mapping = SimpleNamespace(
        lp_fragment_address=SimpleNamespace(start=5, numel=7), get_hp_fragment=lambda key=None: frags[key].double()
    )
    with pytest.raises(FragmentMappingError, match=r"expected a contiguous 1-D fp32 view.*0\.19\.8"):
        zero12_fragment(p)
    p._hp_mapping = SimpleNamespace(get_hp_fragment=lambda key=None: frags[key])
    with pytest.raises(FragmentMappingError, match=rf"DeepSpeed {deepspeed.__version__}'s `_hp_mapping` is not"):
        zero12_fragment(p)


# ------------------------------------------------------------------------------------------------
def _engine(mesh_str: str, stage: int):
    import deepspeed
    import deepspeed.ops

    from jigsaw_ext.checkpoint.engine_state import create_moments, set_fp32_block
    from jigsaw_ext.checkpoint.sharded import block_box
    from jigsaw_ext.mesh import MeshConfig, init_mesh
    from weathermixer.config import ModelConfig
    from weathermixer.config.train import TrainConfig
    from weathermixer.model import WeatherMixer
    from weathermixer.train.engine import param_groups, register_list_parameters

    dp, domain, tp = (int(x) for x in mesh_str.split("x"))
    deepspeed.ops.__compatible_ops__ = {"deepspeed_shm_comm": False}
    mesh = init_mesh(MeshConfig(dp=dp, domain=domain, tp=tp))
    torch.manual_seed(1000 + mesh.rank)  # all of it is overwritten below
    # hidden 40: a ZeRO-1/2 partition boundary (dp = 2) falls inside a row of a block (checked below)
    model = WeatherMixer(ModelConfig(grid=(32, 64), patch=(1, 8), hidden=40, blocks=2), mesh)
    if stage == 3:
        register_list_parameters(model)
    ds = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**9,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
    }
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, TrainConfig().param_groups, 1e-3), config=ds, mpu=mesh.mpu()
    )
    create_moments(engine)
    for name, p in model.named_parameters():
        offset, shape = block_box(p.block_layout, mesh.coords)
        for kind in KINDS:
            full = expected(name, kind, p.block_layout.shape)
            set_fp32_block(
                engine, p, kind, full[tuple(slice(o, o + s) for o, s in zip(offset, shape, strict=True))].clone()
            )
    return engine, model, mesh


def _save_worker(rank, world, mesh_str, stage, work):
    import deepspeed.utils

    from jigsaw_ext.checkpoint import engine_state, layout_free
    from jigsaw_ext.checkpoint.layout_free import save_layout_free

    engine, model, mesh = _engine(mesh_str, stage)
    frags = {n: engine_state.state_fragment(engine, p) for n, p in model.named_parameters()}
    straddles = any(
        f is not None and f.numel and len(p.shape) >= 2 and f.start % math.prod(p.shape[1:])
        for (n, f), p in zip(frags.items(), model.parameters(), strict=True)
    )
    # the fragment path reads no full block: DeepSpeed's full-block accessors (a dp collective) must not run
    saved = deepspeed.utils.safe_get_full_fp32_param, deepspeed.utils.safe_get_full_optimizer_state

    def refuse(*_a, **_k):
        raise AssertionError("a full-block accessor ran during a fragment-aligned save")

    deepspeed.utils.safe_get_full_fp32_param = deepspeed.utils.safe_get_full_optimizer_state = refuse
    try:
        desc = save_layout_free(engine, model, f"{work}/frag/state", budget=200_000)
    finally:
        deepspeed.utils.safe_get_full_fp32_param, deepspeed.utils.safe_get_full_optimizer_state = saved
    # DeepSpeed's mapping unavailable: every rank falls back to the accessors, with a warning naming why
    real = layout_free.state_fragment

    def missing(engine_, p):
        f = real(engine_, p)
        if f is not None and not f.dp_replicated and not hasattr(p, "ds_id"):
            raise FragmentMappingError("test: mapping gone (DeepSpeed 9.9)")
        return f

    layout_free.state_fragment = missing
    try:
        with pytest.warns(UserWarning, match="mapping gone.*falling back") if stage in (1, 2) else _nothing():
            full_desc = save_layout_free(engine, model, f"{work}/full/state", budget=200_000)
    finally:
        layout_free.state_fragment = real
    _seal(rank, [f"{work}/frag", f"{work}/full"])
    return {"desc": desc, "full_desc": full_desc, "straddles": straddles}


def _seal(rank, tags):
    """Write each tag's MANIFEST.json as the trainer's CheckpointManager does after a save (a layout-free
    tag is never read without it)."""
    import torch.distributed as dist

    from jigsaw_ext.checkpoint.manifest import describe, list_files, write_manifest

    dist.barrier()
    if rank == 0:
        for tag in tags:
            write_manifest(tag, {rel: describe(Path(tag) / rel) for rel in list_files(tag)})
    dist.barrier()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _load_worker(rank, world, mesh_str, stage, work, desc):
    from jigsaw_ext.checkpoint.engine_state import base_optimizer, fp32_blocks
    from jigsaw_ext.checkpoint.layout_free import load_layout_free
    from jigsaw_ext.checkpoint.sharded import block_box

    engine, model, mesh = _engine(mesh_str, stage)
    with torch.no_grad():  # wipe what _engine set, so that only the load can give it back
        for p in model.parameters():
            (p.ds_tensor if hasattr(p, "ds_id") else p).zero_()
        flats = (
            getattr(engine.optimizer, "single_partition_of_fp32_groups", None)
            or getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
            or []
        )
        for q in flats:
            q.zero_()
        for st in base_optimizer(engine).state.values():
            for k in KINDS[1:]:
                st[k].zero_()
    load_layout_free(engine, model, f"{work}/frag/state", desc)
    bad = []
    for name, p in model.named_parameters():
        offset, shape = block_box(p.block_layout, mesh.coords)
        box = tuple(slice(o, o + s) for o, s in zip(offset, shape, strict=True))
        got = fp32_blocks(engine, p)
        for kind in KINDS:
            if not torch.equal(got[kind], expected(name, kind, p.block_layout.shape)[box]):
                bad.append((name, kind))
        if not hasattr(p, "ds_id") and not torch.equal(p.detach().float(), got["param"]):
            bad.append((name, "module parameter"))
    return bad


@pytest.mark.parametrize(
    "mesh,stage,other,other_stage",
    [("2x1x2", 1, "2x2x1", 3), ("2x2x1", 2, "1x2x2", 0), ("2x2x1", 3, "2x1x2", 1), ("2x1x1", 0, "2x1x2", 2)],
)
def test_fragment_aligned_save_writes_the_state_and_loads_on_another_mesh(tmp_path, mesh, stage, other, other_stage):
    """Saved with fragments (no full-block accessor may run), the checkpoint holds exactly the global
    master weights and moments, as does the accessors' fallback; it loads exactly on another mesh and
    ZeRO stage (module parameters, master weights, moments). Under ZeRO-1/2 with dp = 2 some rank's
    fragment starts inside a row of a block (a row straddles the partitions)."""
    from jigsaw_ext.checkpoint.layout_free import read_weights
    from jigsaw_ext.testing import run_workers

    pre = ["deepspeed", "weathermixer.model", "megatron.core.dist_checkpointing"]
    world = lambda m: math.prod(int(x) for x in m.split("x"))  # noqa: E731
    res = run_workers(_save_worker, world(mesh), mesh, stage, str(tmp_path), timeout=600, preload=pre)
    if stage in (1, 2):
        assert any(r["straddles"] for r in res), "no fragment starts inside a row: the test lost its point"
    desc = res[0]["desc"]
    assert len(desc["batches"]) > 1
    for d, dsc in (("frag", desc), ("full", res[0]["full_desc"])):
        for kind in KINDS:
            for name, t in read_weights(tmp_path / d / "state", dsc, kind=kind):
                ref = expected(name, kind, desc["tensors"][name]["shape"])
                assert torch.equal(t, ref), (d, kind, name, (t - ref).abs().max().item())
    bad = run_workers(_load_worker, world(other), other, other_stage, str(tmp_path), desc, timeout=600, preload=pre)
    assert not any(bad), bad


def _failing_worker(rank, world, work):
    """Rank 1 fails outside DCP: in the save (the trainer's CheckpointManager) and in the load."""
    import time

    from jigsaw_ext.checkpoint import layout_free, sharded
    from jigsaw_ext.checkpoint.errors import RankFailure
    from weathermixer.train.checkpointing import CheckpointError, CheckpointManager

    engine, model, mesh = _engine("2x1x1", 1)
    real_fragment, real_reads = layout_free.state_fragment, sharded.fragment_reads

    def boom(*a, **k):
        raise RuntimeError(f"boom on purpose on rank {rank}")

    out, t0 = {}, time.perf_counter()
    if rank == 1:
        layout_free.state_fragment = boom
    mgr = CheckpointManager(f"{work}/ck")
    try:
        mgr.save(engine, 1, {"step": 1}, {"step": 1}, {"mesh": mesh.sizes})
    except CheckpointError as err:
        out["save"] = str(err)
    layout_free.state_fragment = real_fragment
    desc = layout_free.save_layout_free(engine, model, f"{work}/ok/state")
    if rank == 1:
        sharded.fragment_reads = boom
    try:
        layout_free.load_layout_free(engine, model, f"{work}/ok/state", desc)
    except RankFailure as err:
        out["load"] = str(err)
        out["load_rank"] = sharded.failing_rank(err)[0]
    sharded.fragment_reads = real_reads
    out["seconds"] = time.perf_counter() - t0
    out["partial_left"] = sorted(p.name for p in Path(f"{work}/ck").iterdir())
    return out


def test_a_rank_failing_outside_dcp_stops_every_rank_naming_it(tmp_path):
    """Rank 1 raises before DCP (preparing its parts; planning its reads): every rank raises at once,
    naming rank 1 and its message (no rank waits in a collective until the timeout); the save
    leaves no partial directory and moves no pointer."""
    from jigsaw_ext.testing import run_workers

    res = run_workers(
        _failing_worker,
        2,
        str(tmp_path),
        timeout=300,
        preload=["deepspeed", "weathermixer.model", "megatron.core.dist_checkpointing"],
    )
    for r, out in enumerate(res):
        assert "writing checkpoint step 1 failed" in out.get("save", ""), (r, out)
        assert "on rank 1: RuntimeError: boom on purpose on rank 1" in out["save"], (r, out)
        assert "rank 1 failed (RuntimeError: boom on purpose on rank 1)" in out.get("load", ""), (r, out)
        assert out["load_rank"] == 1 and out["seconds"] < 120, (r, out)
        assert out["partial_left"] == [], (r, out)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-x", "-q"]))
