"""Data faults named precisely: a chunk missing from the store, a truncated or corrupt chunk, and the
values data.nonfinite='zero' sets to 0 (warned with counts and locations, aggregated)."""

import os
import warnings

import numpy as np
import pytest
import xarray as xr

from jigsaw_ext.mesh import Mesh
from weathermixer.config import ChannelsConfig, ModelConfig
from weathermixer.data import DataConfig, ShardedSampleLoader
from weathermixer.data.reader import DataError
from weathermixer.data.synth import write_synthetic
from weathermixer.data.testing import CountingStore

CH = ChannelsConfig(
    surface=["2m_temperature"], atmospheric=["geopotential"], levels=[500, 850], static=["land_sea_mask"]
)
MODEL = ModelConfig(grid=(16, 32), channels=CH, rollout=1)
# times: 2020-01-01 00:00 + 6 h steps; index 5 = 2020-01-02T06:00, 7 = 2020-01-02T18:00


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "s.zarr"
    write_synthetic(
        str(path),
        (16, 32),
        "2020-01-01",
        "2020-01-04",
        6.0,
        ["2m_temperature", "geopotential"],
        [500, 850],
        lat_chunk=8,
    )  # chunks: time 1, level 1, latitude 8 rows, longitude all
    return path


def _loader(path, **cfg):
    return ShardedSampleLoader(
        DataConfig(path=str(path), prefetch=0, **cfg), MODEL, Mesh.single(), batch=1, shuffle=False
    )


def _sample_at(ld, t: int) -> int:
    """The sample id whose start time index is t."""
    return int(np.flatnonzero(ld.starts == t)[0])


@pytest.mark.parametrize("keep", [False, True], ids=["per_batch", "kept"])
def test_missing_chunk_named_with_variable_and_time(store, keep, monkeypatch):
    """Per-batch reads fail at the batch that reads the chunk, and other times are fine; a data set
    kept in memory (read whole at the first batch) fails at its first batch, whichever it is."""
    import weathermixer.data.loader as loader_mod

    monkeypatch.setattr(loader_mod, "KEEP_BYTES", loader_mod.KEEP_BYTES if keep else 0)
    os.remove(store / "geopotential" / "c" / "5" / "1" / "0" / "0")  # time 5, level 850, rows 0-7
    ld = _loader(store)
    with pytest.raises(DataError) as err:
        ld.load_batch([_sample_at(ld, 5 if not keep else 1)])
    msg = str(err.value)
    assert str(store) in msg and "chunk 'geopotential/c/5/1/0/0'" in msg and "variable 'geopotential'" in msg
    assert "time 2020-01-02T06:00" in msg and "missing from the store" in msg
    assert "non-finite" not in msg  # not reported as NaN data
    if not keep:
        assert _loader(store).load_batch([_sample_at(ld, 1)]).fields.isfinite().all()  # other times are fine


def test_missing_chunk_through_a_store_object(store):
    os.remove(store / "2m_temperature" / "c" / "7" / "1" / "0")
    cs = CountingStore.local(store)
    ld = ShardedSampleLoader(DataConfig(path="mem", prefetch=0), MODEL, Mesh.single(), store=cs, shuffle=False)
    with pytest.raises(
        DataError,
        match=r"mem: chunk '2m_temperature/c/7/1/0' of variable '2m_temperature' "
        r"\(time 2020-01-02T18:00\) is missing",
    ):
        ld.load_batch([_sample_at(ld, 6)])  # time 7 is the target of the sample starting at 6


@pytest.mark.parametrize("damage", ["truncate", "corrupt"])
def test_undecodable_chunk_named_with_path_variable_chunk_and_time(store, damage):
    chunk = store / "2m_temperature" / "c" / "5" / "0" / "0"
    data = chunk.read_bytes()
    chunk.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00" * 16 + data[16:])
    ld = _loader(store)
    with pytest.raises(DataError) as err:
        ld.load_batch([_sample_at(ld, 5)])
    msg = str(err.value)
    assert msg.startswith(
        f"{store}: cannot decode chunk '2m_temperature/c/5/0/0' of variable '2m_temperature' (time 2020-01-02T06:00)"
    ), msg
    assert "Error" in msg  # the codec's own message is kept


@pytest.fixture
def nan_store(store, tmp_path):
    raw = xr.open_zarr(store, chunks=None, consolidated=False).load()
    raw["geopotential"][5, 0, 0:2, 3:6] = np.nan  # time 5, level 500, store rows 0-1 (ascending: -90, -78)
    raw["geopotential"][6, 0, 0, 4] = np.inf
    bad = tmp_path / "nan.zarr"
    raw.to_zarr(bad, consolidated=False)
    return bad


def _nonfinite_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "data.nonfinite='zero'" in str(w.message)]


def test_nonfinite_zero_warns_with_counts_and_locations(nan_store):
    ld = _loader(nan_store, nonfinite="zero")
    lat, lon = ld.lat, ld.lon
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        sample = ld.load_batch([_sample_at(ld, 5)])  # input t=5 (6 NaN), target t=6 (1 inf)
    first = _nonfinite_warnings(got)
    assert len(first) == 1, first  # one per channel, not one per block
    assert (
        f"sets 6 non-finite value(s) of 'geopotential_500' at time 2020-01-02T06:00, latitude {lat[-2]:g} .. "
        f"{lat[-1]:g}, longitude {lon[3]:g} .. {lon[5]:g} to 0"
    ) in first[0], first[0]
    assert sample.fields.isfinite().all() and sample.targets[0].isfinite().all()
    assert ld.nonfinite.totals == {"geopotential_500": [7, 2]}


def test_nonfinite_zero_summary_every_n_samples(nan_store):
    from weathermixer.data.reader import NonFiniteWarning

    ld = _loader(nan_store, nonfinite="zero", nonfinite_every=3)
    with pytest.warns(NonFiniteWarning):
        ld.load_batch([_sample_at(ld, 5)])
    with warnings.catch_warnings(record=True) as more:
        warnings.simplefilter("always")
        ld.load_batch([_sample_at(ld, 0)])
        assert not _nonfinite_warnings(more)  # a clean sample, 2 of 3: nothing
        ld.load_batch([_sample_at(ld, 6)])  # third sample: the summary
    summary = _nonfinite_warnings(more)
    assert len(summary) == 1 and "in the last 3 samples" in summary[0], summary
    assert "'geopotential_500': 8 value(s) in 3 block(s) from 2020-01-02T06:00" in summary[0], summary
    assert ld.nonfinite.totals == {"geopotential_500": [8, 3]}


@pytest.mark.parametrize("keep", [False, True], ids=["per_batch", "kept"])
def test_clean_reads_ask_the_store_nothing_more(store, keep, monkeypatch):
    """The chunk check costs no store request per read: the chunks fetched are the read's (per batch:
    the batch's 2 times; kept: every time of the split, at the first batch), beside one metadata read
    of each variable's array when the check lists its keys (once per process)."""
    import weathermixer.data.loader as loader_mod

    monkeypatch.setattr(loader_mod, "KEEP_BYTES", loader_mod.KEEP_BYTES if keep else 0)
    cs = CountingStore.local(store)
    ld = ShardedSampleLoader(DataConfig(path="mem", prefetch=0), MODEL, Mesh.single(), store=cs, shuffle=False)
    cs.reset()
    ld.load_batch([0])
    chunks = [k for k in cs.keys if "/c/" in k]
    assert sorted(set(cs.keys) - set(chunks)) == ["2m_temperature/zarr.json", "geopotential/zarr.json"]
    times = int(ld.starts[-1]) + 2 if keep else 2
    assert len(chunks) == len(set(chunks)) == times * (2 + 2 * 2)  # times x (t2m + z500 + z850) x 2 row chunks
    if not keep:
        cs.reset()
        ld.load_batch([1])
        assert cs.keys and all("/c/" in k for k in cs.keys)  # listed once: nothing but the chunks now


def test_missing_chunk_of_a_store_whose_fill_value_is_not_nan(store, tmp_path):
    """A store whose float variables have fill value 0 (as some writers choose) with a chunk gone:
    zarr would serve 0 K at that time; the read names the chunk, the variable and the time, and
    `python -m weathermixer.data stats` (which reads every training time) exits 2 saying so."""
    import json
    import subprocess
    import sys

    from tests.integration.test_training_runs import ENV, ROOT

    meta = store / "2m_temperature" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["fill_value"] = 0.0
    meta.write_text(json.dumps(doc))
    os.remove(store / "2m_temperature" / "c" / "7" / "1" / "0")
    ld = _loader(store)
    with pytest.raises(
        DataError,
        match=r"chunk '2m_temperature/c/7/1/0' of variable '2m_temperature' \(time "
        r"2020-01-02T18:00\) is missing from the store.*fill value \(0\.0 here\)",
    ):
        ld.load_batch([_sample_at(ld, 6)])
    job = tmp_path / "job.json"
    job.write_text(
        json.dumps(
            {
                "weathermixer": {
                    "model": MODEL.model_dump(mode="json"),
                    "data": {"source": "gridded", "path": str(store)},
                }
            }
        )
    )
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "weathermixer.data",
            "stats",
            "--config",
            str(job),
            "--out",
            str(tmp_path / "stats.json"),
        ],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "chunk '2m_temperature/c/7/1/0' of variable '2m_temperature'" in r.stderr, (
        r.stdout[-2000:] + r.stderr[-2000:]
    )
    assert not (tmp_path / "stats.json").exists()


def test_a_data_fault_met_while_training_says_what_to_fix(tmp_path):
    """A chunk lost from the training store after a run started: train.py stops (exit 2) naming the
    chunk and saying to fix the data before rerunning, not just to rerun the same command."""
    import shutil
    import subprocess

    from tests.integration.test_training_runs import ENV, ROOT, _launch, small_job

    job = small_job(tmp_path, rollout=1, resume="auto")
    one = ("--domain", "1", "--tp", "1")
    run = subprocess.run(
        _launch(job, tmp_path / "run", 1, *one, "--set", "train.steps=1", launcher="python"),
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    store = next((tmp_path / "synthetic").glob("*.zarr"))
    shutil.rmtree(store / "2m_temperature" / "c")  # every time of one variable
    run = subprocess.run(
        _launch(job, tmp_path / "run", 1, *one, "--set", "train.steps=3", launcher="python"),
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 2 and "chunk '2m_temperature/c/" in run.stderr, run.stdout[-2000:] + run.stderr[-2000:]
    assert "fix the data named above first" in run.stderr and "Rerun the same command" not in run.stderr
