"""The run folder: nothing lost, nothing silent.

Two runs on one folder (the second stops naming the holder, on every rank, before any setup; a
lock left by a dead run is taken over), an unwritable log.dir / checkpoint.dir found before any
setup with its key named, metrics.csv keeping its complete rows when the disk fills, and the lock
rules (another host, a reused pid, log.break_lock) without processes. The killed-rank naming is
tested with the deepspeed launcher in tests/integration/test_training_runs.py (the killed-rank test)."""

import csv
import errno
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.test_training_runs import ENV, ROOT, _launch, _run, small_job

pytestmark = pytest.mark.distributed

ONE = ("--domain", "1", "--tp", "1")


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    return small_job(tmp_path_factory.mktemp("run_folder"), rollout=1, resume="never")


def test_a_second_run_on_one_folder_stops_on_every_rank_naming_the_holder(job, tmp_path):
    """Run 1 holds the folder; run 2 (2 ranks) stops before any setup naming run 1's pid and host,
    exit 2 on every rank, no hang; run 1's SIGTERM way out releases the lock."""
    out, host = tmp_path / "run", socket.gethostname()
    lock = out / "RUN.lock"
    err = open(tmp_path / "first.err", "w+")
    first = subprocess.Popen(
        _launch(job, out, 1, *ONE, "--set", "train.steps=400", launcher="python"),
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=err,
        text=True,
    )
    try:
        deadline = time.time() + 40
        while not (lock.exists() or (out / "metrics.csv").exists()):
            assert first.poll() is None and time.time() < deadline, "the first run ended or stalled"
            time.sleep(0.1)
        assert lock.exists(), "the first run trains without a RUN.lock in its folder"
        holder = json.loads(lock.read_text())
        assert (holder["pid"], holder["host"]) == (first.pid, host)

        t0 = time.time()
        second = _run(_launch(job, out, 2, "--domain", "2", "--tp", "1"), timeout=120)
        took = time.time() - t0
        text = second.stdout + second.stderr
        assert second.returncode != 0, text[-3000:]
        assert (
            f"(rank 0): log.dir={out} is in use by another run: {lock} is held by pid {first.pid} on host {host}"
            in text
            and "still running" in text
        ), text[-3000:]
        assert "(rank 1): stopping: rank(s) [0] cannot use the run folder" in text, text[-3000:]
        assert text.count("exitcode  : 2") == 2 and "mesh " not in second.stdout and took < 45, (took, text[-3000:])
        assert json.loads(lock.read_text())["pid"] == first.pid  # the holder's lock untouched

        first.send_signal(signal.SIGTERM)  # the holder's way out releases the lock
        assert first.wait(timeout=30) == 143, (tmp_path / "first.err").read_text()[-3000:]
        assert not lock.exists()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
        err.close()


def test_a_lock_left_by_a_dead_run_is_taken_over_with_a_message(job, tmp_path):
    """As a SIGKILLed holder leaves it: same host, the pid gone. Released at the end of the run."""
    from weathermixer.train.process import me

    out = tmp_path / "run"
    gone = subprocess.Popen(["true"])
    gone.wait()
    lock = out / "RUN.lock"
    out.mkdir()
    lock.write_text(
        json.dumps({**me(), "pid": gone.pid, "started": "2026-01-01T00:00:00+00:00", "command": "train.py (killed)"})
    )
    run = _run(_launch(job, out, 1, *ONE, "--set", "train.steps=1", launcher="python"), timeout=120)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert (
        f"taking over {lock} (the run it names (host {socket.gethostname()}, pid {gone.pid}, started "
        f"2026-01-01T00:00:00+00:00) is no longer running)" in run.stderr
    ), run.stderr[-2000:]
    assert not lock.exists() and (out / "metrics.csv").exists()


def test_an_unwritable_output_folder_stops_the_run_before_any_setup_naming_the_key(tmp_path):
    """log.dir, then checkpoint.dir, under a regular file (root ignores permission bits): exit 2
    with the key and the folder named, before the data is prepared (its store is never written)."""
    job = small_job(tmp_path, rollout=1, resume="never")  # data under tmp_path/synthetic, not written yet
    afile = tmp_path / "afile"
    afile.write_text("a file, not a folder\n")
    cases = [
        ("log.dir", afile / "sub", []),
        ("checkpoint.dir", afile / "ck", ["--set", f"checkpoint.dir={afile / 'ck'}"]),
    ]
    for key, folder, settings in cases:
        out = folder if key == "log.dir" else tmp_path / "out"
        t0 = time.time()
        run = _run(_launch(job, out, 1, *ONE, *settings, launcher="python"), timeout=120)
        assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-2000:]
        assert f"(rank 0): {key}={folder}: this run cannot write there" in run.stderr, run.stderr[-2000:]
        assert not (tmp_path / "synthetic").exists(), "the data was prepared before the folder was checked"
        assert "mesh " not in run.stdout and time.time() - t0 < 60


class _FullDisk:
    """A file whose writes stop halfway with ENOSPC (text or binary, whatever the caller opened)."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_metrics_csv_keeps_its_complete_rows_when_the_disk_fills(tmp_path, monkeypatch, capsys):
    from weathermixer.train import runlog

    log = runlog.RunLog(tmp_path)
    rows = {s: {"loss": 1.0 / s, "lr": 1e-3 * s, "samples_per_s": 10.0 + s} for s in range(1, 7)}
    for s in (1, 2, 3):
        log.log(s, "train", rows[s])
    real_open = open
    monkeypatch.setattr(
        runlog,
        "open",
        lambda path, mode="r", *a, **k: (
            _FullDisk(real_open(path, mode, *a, **k))
            if any(c in mode for c in "aw")
            else real_open(path, mode, *a, **k)
        ),
        raising=False,
    )
    log.log(4, "train", rows[4])  # the append fails halfway
    log.log(5, "train", rows[5])  # so does the rewrite that would catch up

    def on_disk():
        with real_open(tmp_path / "metrics.csv", newline="") as f:
            return [{k: float(v) if k != "kind" else v for k, v in r.items()} for r in csv.DictReader(f)]

    expect = [{"step": float(s), "kind": "train", **rows[s]} for s in range(1, 7)]
    assert on_disk() == expect[:3]
    warned = capsys.readouterr().err.strip().splitlines()  # said once, naming the file, the step, the error
    assert len(warned) == 1 and "metrics.csv" in warned[0] and "step 4" in warned[0] and "No space left" in warned[0]
    monkeypatch.setattr(runlog, "open", real_open, raising=False)
    log.log(6, "train", rows[6])  # the disk takes rows again: nothing was lost
    assert on_disk() == expect and "written again, 6 rows" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.tmp"))


def _lock_file(folder: Path, **change) -> dict:
    from weathermixer.train.process import me

    holder = {**me(), "started": "2026-01-01T00:00:00+00:00", "command": "train.py --elsewhere", **change}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "RUN.lock").write_text(json.dumps(holder))
    return holder


def test_lock_rules_other_host_reused_pid_live_holder_and_break_lock(tmp_path):
    from weathermixer.train.process import _proc_stat
    from weathermixer.train.runfolder import RunFolderError, RunLock

    said = []
    folders = {"log.dir": tmp_path / "run", "checkpoint.dir": tmp_path / "ck"}
    # another host: held (its liveness cannot be checked here) unless log.break_lock=true
    _lock_file(tmp_path / "run", host="node-b17", pid=4242)
    with pytest.raises(RunFolderError, match=r"held by pid 4242 on host node-b17 .*another host.*log\.break_lock=true"):
        RunLock(folders, log=lambda *a, **k: said.append(a[0])).acquire()
    assert not (tmp_path / "ck" / "RUN.lock").exists()  # all or none
    lock = RunLock(folders, break_lock=True, log=lambda *a, **k: said.append(a[0]))
    lock.acquire()
    assert "another host" in said[-1] and json.loads((tmp_path / "ck" / "RUN.lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / "run" / "RUN.lock").exists() and not (tmp_path / "ck" / "RUN.lock").exists()
    # this host, a live pid with another start time: the pid was reused, the holder is gone
    _lock_file(tmp_path / "ck", start=1)
    lock = RunLock(folders, log=lambda *a, **k: said.append(a[0]))
    lock.acquire()
    assert "is another process now" in said[-1]
    # this host, the holder alive (the test's parent process): held even with log.break_lock=true
    lock.release()
    _lock_file(tmp_path / "run", pid=os.getppid(), start=_proc_stat(os.getppid())[1])
    with pytest.raises(RunFolderError, match=f"held by pid {os.getppid()} .*still running on this host"):
        RunLock(folders, break_lock=True).acquire()
    # this very process, from an earlier Trainer it did not release: taken back silently
    _lock_file(tmp_path / "run")
    said.clear()
    lock = RunLock(folders, log=lambda *a, **k: said.append(a[0]))
    lock.acquire()
    assert (
        not said and json.loads((tmp_path / "run" / "RUN.lock").read_text())["started"] != "2026-01-01T00:00:00+00:00"
    )
    lock.release()
    # checkpoint.dir inside log.dir: locked too (another run may name it as its checkpoint.dir); one folder once
    assert list(RunLock({"log.dir": tmp_path / "run", "checkpoint.dir": tmp_path / "run" / "ck"}).folders) == [
        "log.dir",
        "checkpoint.dir",
    ]
    assert list(RunLock({"log.dir": tmp_path / "run", "checkpoint.dir": tmp_path / "run" / "."}).folders) == ["log.dir"]


def test_a_run_whose_checkpoint_dir_lies_in_a_running_runs_log_dir_stops(job, tmp_path):
    """Run A trains with its checkpoints in A/checkpoints (inside its log.dir); run B, another
    --output-dir, names A/checkpoints as checkpoint.dir: B stops before any setup (exit 2) naming A's
    lock there, and A's checkpoints are untouched."""
    a, b = tmp_path / "a", tmp_path / "b"
    lock = a / "checkpoints" / "RUN.lock"
    first = subprocess.Popen(
        _launch(job, a, 1, *ONE, "--set", "train.steps=400", launcher="python"),
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 60
        while not (lock.exists() or (a / "metrics.csv").exists()):
            assert first.poll() is None and time.time() < deadline, "the first run ended or stalled"
            time.sleep(0.1)
        assert lock.exists(), "run A trains without a RUN.lock in its checkpoint folder"
        second = _run(
            _launch(job, b, 1, *ONE, "--set", f"checkpoint.dir={a / 'checkpoints'}", launcher="python"), timeout=120
        )
        assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
        assert (
            f"checkpoint.dir={a / 'checkpoints'} is in use by another run: {lock} is held by pid {first.pid}"
            in second.stderr
            and "mesh " not in second.stdout
        ), second.stderr[-2000:]
        assert json.loads(lock.read_text())["pid"] == first.pid
        assert not (b / "RUN.lock").exists()  # all or none
    finally:
        first.kill()
        first.wait()


def test_the_last_line_names_the_rank_that_failed_or_died_first(tmp_path):
    """rankwatch.report (the launchers' last line) from a registry and exit records: a survivor's
    verdict first, else the earliest own failure, else the ranks that left no record (their hosts)."""
    from weathermixer.train import rankwatch

    ranks = [{"rank": r, "host": "gpu07" if r < 2 else "gpu08", "pid": 100 + r} for r in range(4)]
    record = tmp_path / "job_record.json"
    record.write_text(json.dumps({"run_id": "x", "run_dir": str(tmp_path), "ranks": ranks}))
    (tmp_path / "ranks").mkdir()

    def leave(rank, kind, t, message="", dead=(), run_id="x"):
        (tmp_path / "ranks" / f"rank{rank:05d}.json").write_text(
            json.dumps(
                {
                    "run_id": run_id,
                    "rank": rank,
                    "kind": kind,
                    "code": 1,
                    "time": t,
                    "message": message,
                    "dead": list(dead),
                    "host": ranks[rank]["host"],
                    "pid": ranks[rank]["pid"],
                }
            )
        )

    assert "before its ranks registered" in rankwatch.report(tmp_path / "none.json", 1)
    leave(0, "exit", 1.0, run_id="an earlier run")  # another run's record does not count
    line = rankwatch.report(record, 137)
    assert (
        line.startswith(
            "weathermixer: the job failed (exit 137): rank 0 (host gpu07, pid 100), rank 1 (host "
            "gpu07, pid 101), rank 2 (host gpu08, pid 102), rank 3"
        )
        and "left no record" in line
    )
    leave(3, "error", 5.0, "OSError: [Errno 28] No space left on device\nmore")
    leave(0, "terminated", 6.0)
    assert (
        "rank 3 (host gpu08, pid 103) failed first: OSError: [Errno 28] No space left on device;"
        in rankwatch.report(record, 1)
    )
    leave(1, "peer", 4.0, dead=[2])  # a survivor found rank 2 gone before rank 3's error
    line = rankwatch.report(record, 1)
    assert "rank 2 (host gpu08, pid 102) died first; it left no message" in line and "ranks [0, 1, 3]" in line


def test_two_runs_creating_the_same_synthetic_store_at_once_both_train(tmp_path):
    """Two runs (their own --output-dir) started together on one data.path with no store yet: one
    writes the store, the other waits for it and reads it; both finish, the store is written once
    and nothing partial is left. Each log names the store's absolute path."""
    job = small_job(tmp_path, rollout=1, resume="never")  # data under tmp_path/synthetic, not written yet
    runs = [
        subprocess.Popen(
            _launch(job, tmp_path / f"run{i}", 1, *ONE, "--set", "train.steps=1", launcher="python"),
            cwd=ROOT,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [r.communicate(timeout=300) for r in runs]
    for r, (out, err) in zip(runs, outs, strict=True):
        assert r.returncode == 0, out[-2000:] + err[-2000:]
    logs = "".join(out for out, _ in outs)
    store = next((tmp_path / "synthetic").glob("*.zarr"))
    assert logs.count(f"writing the synthetic ERA5-like store {store}") == 1, logs[-3000:]
    assert f"synthetic data: {store} (data.path=" in logs, logs[-3000:]
    assert not [p for p in (tmp_path / "synthetic").iterdir() if ".partial" in p.name]
