"""Sharded reads on virtual meshes: blocks tile the full sample, each rank fetches only its chunks;
sampler agreement/disjointness/resume; prefetch; fake data; history and time features."""

import itertools

import numpy as np
import pytest
import torch

from jigsaw_ext.mesh import Mesh, MeshConfig
from weathermixer.config import ChannelsConfig, ModelConfig
from weathermixer.data import DataConfig, GriddedDataset, ShardedSampleLoader
from weathermixer.data.synth import write_synthetic
from weathermixer.data.testing import CountingStore
from weathermixer.grid import Geometry

CH = ChannelsConfig(
    surface=["2m_temperature", "mean_sea_level_pressure"],
    atmospheric=["geopotential", "temperature"],
    levels=[500, 850],
    static=["land_sea_mask", "orography", "cos_latitude", "sin_hour_of_day"],
)
MODEL = ModelConfig(grid=(32, 64), channels=CH, rollout=2)
MESHES = [(1, 1), (2, 1), (1, 2), (2, 2), (4, 1)]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("era5") / "synth.zarr"
    # latitude chunks of 8 rows, one level per chunk, one time per chunk; levels 500 700 850
    write_synthetic(
        str(path),
        (32, 64),
        "2020-01-01",
        "2020-01-06",
        6.0,
        ["2m_temperature", "mean_sea_level_pressure", "geopotential", "temperature"],
        [500, 700, 850],
        lat_chunk=8,
    )
    return str(path)


def _loader(store, dom, tp, rank, dp=1, **kw):
    cfg = DataConfig(
        path=store if isinstance(store, str) else "mem", prefetch=kw.pop("prefetch", 0), **kw.pop("cfg", {})
    )
    mesh = Mesh.virtual(MeshConfig(dp=dp, domain=dom, tp=tp), rank)
    return ShardedSampleLoader(cfg, MODEL, mesh, store=None if isinstance(store, str) else store, **kw)


def test_blocks_of_all_ranks_tile_the_full_sample(store):
    ids = [3, 7]
    full = _loader(store, 1, 1, 0).load_batch(ids)
    assert full.fields.shape == (2, 6, 32, 64) and full.static.shape == (2, 4, 32, 64) and len(full.targets) == 2
    for dom, tp in MESHES[1:]:
        f, s = torch.full_like(full.fields, float("nan")), torch.full_like(full.static, float("nan"))
        t = [torch.full_like(x, float("nan")) for x in full.targets]
        for rank in range(dom * tp):
            ld = _loader(store, dom, tp, rank)
            b = ld.load_batch(ids)
            geo = Geometry(MODEL, ld.mesh)
            fs = geo.grid_layout(6, 2).local_slices(ld.mesh.coords)
            f[fs] = b.fields
            s[geo.grid_layout(4, 2).local_slices(ld.mesh.coords)] = b.static
            for k in range(2):
                t[k][fs] = b.targets[k]
            np.testing.assert_array_equal(ld.lat, full_lat := _loader(store, 1, 1, 0).lat)
        assert torch.equal(f, full.fields) and torch.equal(s, full.static), (dom, tp)
        assert all(torch.equal(a, e) for a, e in zip(t, full.targets, strict=True))
    assert full_lat[0] == 90 and full_lat[-1] == -90


@pytest.mark.parametrize("keep", [False, True], ids=["per_batch", "kept"])
def test_each_rank_fetches_only_chunks_of_its_rows_and_channels(store, keep, monkeypatch):
    """2x2 domain x tp (and 4x1): the chunks a rank reads are exactly those overlapping its latitude
    rows (store rows are flipped: ascending on disk) and its variables/levels; at the times of the
    batch's samples, or (a data set whose block fits in KEEP_BYTES) at every time a sample of the split
    reads, all read at the first batch."""
    import weathermixer.data.loader as loader_mod

    monkeypatch.setattr(loader_mod, "KEEP_BYTES", loader_mod.KEEP_BYTES if keep else 0)
    data = GriddedDataset(DataConfig(path=store), CH, MODEL.grid)
    level_index = {500: 0, 700: 1, 850: 2}
    ids, seen = [5], {}
    for dom, tp in [(2, 2), (4, 1)]:
        for rank in range(dom * tp):
            cs = CountingStore.local(store)
            ld = _loader(cs, dom, tp, rank)
            cs.reset()
            ld.load_batch(ids)
            got = cs.chunk_keys()
            srows = data.store_rows(ld.rows)
            lat_chunks = range(srows.start // 8, (srows.stop - 1) // 8 + 1)
            t0 = int(ld.starts[ids[0]])
            times = range(int(ld.starts[0]), int(ld.starts[-1]) + 3) if keep else [t0, t0 + 1, t0 + 2]
            expect = set()
            for name in ld.field_names:
                var, lev = (name, None) if name in CH.surface else name.rsplit("_", 1)
                for t, c in itertools.product(times, lat_chunks):
                    expect.add(f"{var}/c/{t}/{c}/0" if lev is None else f"{var}/c/{t}/{level_index[int(lev)]}/{c}/0")
            assert got == expect, (dom, tp, rank, sorted(got ^ expect))
            assert not any(
                k.startswith(("geopotential/", "temperature/")) and k.split("/")[3] == "1" for k in got
            )  # 700 hPa (keys: var/c/time/level/lat/lon)
            assert len(lat_chunks) == 4 // dom  # 32 rows = 4 chunks of 8; each rank reads 4/dom of them
            seen[(dom, tp, rank)] = got
    # tp ranks of one domain rank read disjoint chunk sets; domain ranks of one tp rank too
    assert not seen[(2, 2, 0)] & seen[(2, 2, 1)] and not seen[(2, 2, 0)] & seen[(2, 2, 2)]


def test_static_read_once_only_own_block(store):
    cs = CountingStore.local(store)
    _loader(cs, 2, 2, 3)  # domain 1, tp 1: static channels [cos_latitude, sin_hour_of_day] -> nothing stored
    assert not cs.chunk_keys("land_sea_mask") and not cs.chunk_keys("geopotential_at_surface")
    cs = CountingStore.local(store)
    _loader(cs, 2, 2, 2)  # domain 1, tp 0: land_sea_mask, orography; model rows 16..31 = store rows 0..15
    assert cs.chunk_keys("land_sea_mask") == {"land_sea_mask/c/0/0", "land_sea_mask/c/1/0"}


def test_sampler_groups_agree_replicas_disjoint_and_resume_exact(store):
    loaders = [_loader(store, 2, 1, r, dp=2, batch=2, seed=3, prefetch=2) for r in range(4)]
    epoch = len(loaders[0])
    assert epoch == len(loaders[0].starts) // 4
    times = [[b.times for b in itertools.islice(iter(ld), epoch + 3)] for ld in loaders]
    assert times[0] == times[1] and times[2] == times[3]  # same model group (dp coord)
    first = set(itertools.chain(*times[0][:epoch])), set(itertools.chain(*times[2][:epoch]))
    assert not first[0] & first[1] and len(first[0]) == 2 * epoch  # disjoint replicas, no repeats in an epoch
    assert times[0][epoch] != times[0][0]  # epoch 1 reshuffled
    # resume: after 3 consumed batches (with prefetch running ahead) the state restores the exact position
    ld = _loader(store, 2, 1, 0, dp=2, batch=2, seed=3, prefetch=2)
    it = iter(ld)
    [next(it) for _ in range(3)]
    state = ld.state_dict()
    expect = [next(it).times for _ in range(epoch)]  # crosses the epoch boundary
    ld2 = _loader(store, 2, 1, 0, dp=2, batch=2, seed=3, prefetch=2)
    ld2.load_state_dict(state)
    assert [b.times for b in itertools.islice(iter(ld2), epoch)] == expect == times[0][3 : 3 + epoch]
    with pytest.raises(ValueError, match="seed=3 but this loader has seed=4"):
        _loader(store, 2, 1, 0, dp=2, batch=2, seed=4).load_state_dict(state)


def test_val_split_is_one_ordered_pass(store):
    cfg = {"splits": {"train": ["2020-01-01", "2020-01-04"], "val": ["2020-01-04T06", "2020-01-05T12"]}}
    val = _loader(store, 1, 1, 0, split="val", batch=2, cfg=cfg, prefetch=1)
    got = [t for b in val for t in b.times]
    assert [str(t) for t in got[:2]] == ["2020-01-04 06:00:00", "2020-01-04 12:00:00"] and len(got) == 6
    train = _loader(store, 1, 1, 0, split="train", batch=2, cfg=cfg)
    assert max(train.data.times[train.starts]) <= np.datetime64("2020-01-04")


def test_history_time_features_and_prefetch_errors(store):
    ld = _loader(store, 1, 2, 1, batch=2, cfg={"history": 2})
    b = ld.load_batch([0, 4])
    assert b.fields.shape == (2, 3, 3, 32, 64)
    t0 = int(ld.starts[0])
    assert t0 == 2
    ref = ld.data.read_fields(0, ld.rows, ld.chans)
    np.testing.assert_array_equal(b.fields[0, 0].numpy(), ref)  # t - 2 dt
    np.testing.assert_array_equal(b.fields[0, 2].numpy(), ld.data.read_fields(2, ld.rows, ld.chans))
    hour = b.times[1].hour
    assert ld.static_names == ["cos_latitude", "sin_hour_of_day"]
    np.testing.assert_allclose(b.static[1, 1].numpy(), np.sin(2 * np.pi * hour / 24), atol=1e-6)
    # an error in the prefetch thread reaches the consumer
    ld = _loader(store, 1, 1, 0, prefetch=2, cfg={"stats": None})
    ld.starts = ld.starts.copy()
    ld.starts[:] = 10**6
    with pytest.raises(IndexError):
        next(iter(ld))


def test_fake_data_no_io(tmp_path):
    cfg = DataConfig(fake=True, prefetch=2)
    mesh = Mesh.virtual(MeshConfig(domain=2, tp=2), 1)
    ld = ShardedSampleLoader(cfg, MODEL, mesh, batch=3)
    it = iter(ld)
    a, b = next(it), next(it)
    assert a.fields is b.fields and a.fields.shape == (3, 3, 16, 64) and a.static.shape == (3, 2, 16, 64)
    assert len(a.targets) == 2 and ld.lat[0] == 90 and ld.state_dict()["sampler"]["step"] == 2


def test_leaving_a_finite_iteration_early_never_blocks(store):
    """A finite (validation) pass left early while the prefetch thread is done loading and waits to
    hand over its end-of-epoch marker: closing the iteration must return (it used to wait forever
    on a full queue nobody read, hanging the rank and the job's next collective)."""
    import threading
    import time

    ld = _loader(store, 1, 1, 0, prefetch=1, batch=8, shuffle=False, infinite=False)
    assert len(ld) == 2  # batch 0 taken, batch 1 fills the queue, the end marker has nowhere to go

    def leave_early():
        for _ in ld:
            time.sleep(0.5)  # the producer loads the rest and blocks on the full queue
            break

    for _ in range(2):  # twice: the second pass starts from a loader whose first pass was abandoned
        ld.sampler.epoch, ld.sampler.step = 0, 0
        t = threading.Thread(target=leave_early, daemon=True)
        t.start()
        t.join(10)
        assert not t.is_alive(), "leaving the iteration early hung"


def test_small_data_set_kept_in_memory_once_read(store, monkeypatch):
    """A data set whose block fits in KEEP_BYTES is read from the store once, whole, at the first batch
    (every time step a sample of the split reads); the samples are the same as without keeping (a fresh
    loader with the limit at 0 reads every batch anew)."""
    import weathermixer.data.loader as loader_mod

    cs = CountingStore.local(store)
    ld = _loader(cs, 1, 1, 0, shuffle=False)
    assert ld._keep is not None
    first = ld.load_batch([0, 1])
    read = cs.chunk_keys()
    assert {int(k.split("/c/")[1].split("/")[0]) for k in read} == set(range(int(ld.starts[-1]) + 3))
    cs.reset()
    again = ld.load_batch([1, 0])  # the same times: nothing read
    assert not cs.chunk_keys()
    torch.testing.assert_close(again.fields, first.fields[[1, 0]])
    ld.load_batch([len(ld.starts) - 1])  # the last sample: read at the first batch as well
    assert not cs.chunk_keys()
    monkeypatch.setattr(loader_mod, "KEEP_BYTES", 0)
    fresh = _loader(cs, 1, 1, 0, shuffle=False)
    assert fresh._keep is None
    cs.reset()
    again = fresh.load_batch([1, 0])
    assert cs.chunk_keys()
    torch.testing.assert_close(again.fields, first.fields[[1, 0]])
    torch.testing.assert_close(again.targets[1], first.targets[1][[1, 0]])


def test_pin_memory_in_the_prefetch_thread(store, monkeypatch):
    """data.pin_memory: every tensor of a served batch was page-locked, in the prefetch thread (not the
    consumer's), with values unchanged; true without CUDA is an error naming the key. Pinning itself
    needs CUDA, so here Tensor.pin_memory is replaced by a copy that records the thread it ran in."""
    import threading

    import weathermixer.data.loader as loader_mod

    with pytest.raises(loader_mod.DataError, match="data.pin_memory=true needs a CUDA device"):
        _loader(store, 1, 1, 0, cfg={"pin_memory": True})
    assert not _loader(store, 1, 1, 0).pin  # null: on only where CUDA is available
    ref = next(iter(_loader(store, 1, 1, 0, batch=2, shuffle=False)))
    pinned, threads = set(), set()

    def fake_pin(t):
        threads.add(threading.current_thread().name)
        out = t.clone()
        pinned.add(out.data_ptr())
        return out

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    ld = _loader(store, 1, 1, 0, batch=2, shuffle=False, prefetch=2)
    assert ld.pin
    got = next(iter(ld))
    served = [got.fields, got.static, *got.targets]
    assert all(t.data_ptr() in pinned for t in served) and threads == {"data-prefetch"}
    for a, b in zip(served, [ref.fields, ref.static, *ref.targets], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: page-locked memory")
def test_pin_memory_on_cuda(store):
    got = next(iter(_loader(store, 1, 1, 0, batch=2, prefetch=1)))
    assert got.fields.is_pinned() and got.static.is_pinned() and all(t.is_pinned() for t in got.targets)


def test_pin_memory_fake_data_pinned_once(monkeypatch):
    """data.fake serves the same tensors every step: with pinning they are pinned once, not per step."""
    calls = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: calls.append(1) or t.clone())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    ld = ShardedSampleLoader(DataConfig(fake=True, prefetch=2), MODEL, Mesh.single(), batch=2)
    it = iter(ld)
    a, b = next(it), next(it)
    assert a.fields is b.fields and len(calls) == 2 + MODEL.rollout  # fields, static, one per target
