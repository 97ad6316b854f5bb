"""Which rank died first: a registry of the ranks, a record each rank leaves on its way out, the
diagnosis a surviving rank prints, and the last line the launchers in launchers/ print.

At the start every rank learns every rank's (host, pid, process start time) (runfolder's
all_gather); rank 0 writes them to <log.dir>/ranks/registry.json, and to the file the environment
variable WM_JOB_RECORD names (set by the launchers in launchers/). On its way out every rank writes
<log.dir>/ranks/rankNNNNN.json with its kind of exit: "exit" (returned, with its code), "error" (its
own failure), "peer" (it stops because a peer is gone) or "terminated" (SIGTERM, no peer found
gone). A SIGKILLed rank, or one whose node went down, leaves none.

When a collective fails, or the launcher's SIGTERM arrives (the deepspeed launcher and torchrun stop
every rank once one has exited non-zero), the survivor looks for the cause among its peers: the
earliest "error" record, else a peer on this machine whose pid is gone, and prints
"rank R (host H, pid P) died first; this rank stops".

    python -m weathermixer.train.rankwatch report RECORD EXIT_CODE

turns the registry and the records into the job's last line (launchers/common.sh wm_run_reported).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from jigsaw_ext.files import atomic_write_text

from .process import describe, me, proc_status

_state: dict = {"dir": None, "run_id": None, "rank": None, "ranks": [], "exits": []}
_once = threading.Lock()  # one exit path per process (main's, or the SIGTERM watcher's)
SURVIVOR_KINDS = ("peer", "terminated", "exit")


def on_exit(fn) -> None:
    """Run `fn` (e.g. releasing the run lock) on this process's way out through finish/stop."""
    _state["exits"].append(fn)


def _run_exits() -> None:
    while _state["exits"]:
        try:
            _state["exits"].pop()()
        except Exception as err:  # noqa: BLE001 - the way out must go on
            print(f"warning: {err}", file=sys.stderr, flush=True)


def register(run_dir: Path, ranks: list[dict], rank: int, write: bool) -> None:
    """Every rank: remember the registry. write (rank 0, holding the run lock): registry.json in
    run_dir/ranks (records of earlier runs removed) and the copy WM_JOB_RECORD names."""
    run_id = f"{ranks[0]['host']}-{ranks[0]['pid']}-{ranks[0]['t0']}"
    _state.update(dir=run_dir / "ranks", run_id=run_id, rank=rank, ranks=ranks)
    if not write:
        return
    d = _state["dir"]
    registry = {"run_id": run_id, "run_dir": str(run_dir.resolve()), "ranks": ranks}
    targets = [d / "registry.json"] + ([Path(os.environ["WM_JOB_RECORD"])] if os.environ.get("WM_JOB_RECORD") else [])
    try:  # best effort: the run goes on without it (the other ranks are already past the agreement)
        d.mkdir(parents=True, exist_ok=True)
        for old in d.glob("rank*.json"):
            if _load(old).get("run_id") != run_id:
                old.unlink(missing_ok=True)
        for path in targets:
            atomic_write_text(path, json.dumps(registry, indent=1))
    except OSError as err:
        print(
            f"warning: the rank registry was not written ({err}); a failure will name fewer ranks",
            file=sys.stderr,
            flush=True,
        )


def _load(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
        return obj if isinstance(obj, dict) else {}
    except (OSError, ValueError):
        return {}


def _records(d: Path | None, run_id: str | None) -> dict[int, dict]:
    if d is None or not d.is_dir():
        return {}
    recs = (_load(p) for p in d.glob("rank*.json"))
    return {r["rank"]: r for r in recs if r.get("run_id") == run_id and "rank" in r}


def record(kind: str, code: int, message: str = "", dead: list[int] | None = None) -> None:
    """This rank's way out, for the survivors and the launchers' last line (best effort)."""
    if _state["dir"] is None:
        return
    here = me()
    rec = {
        "run_id": _state["run_id"],
        "rank": _state["rank"],
        "host": here["host"],
        "pid": here["pid"],
        "kind": kind,
        "code": code,
        "message": message[-2000:],
        "dead": dead or [],
        "time": time.time(),
    }
    try:
        _state["dir"].mkdir(parents=True, exist_ok=True)
        atomic_write_text(_state["dir"] / f"rank{_state['rank']:05d}.json", json.dumps(rec, indent=1))
    except OSError as err:
        print(f"warning: could not record this rank's exit in {_state['dir']}: {err}", file=sys.stderr, flush=True)


def _first_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[0][:300]


def find_cause(wait_s: float = 3.0) -> tuple[dict | None, str]:
    """(the peer that failed or died first, a phrase naming it), or (None, what could not be
    checked). Retries for up to wait_s: a killed peer closes its sockets a moment before its pid
    shows as gone."""
    mine, deadline = _state["rank"], time.time() + wait_s
    peers = [p for p in _state["ranks"] if p["rank"] != mine]
    while True:
        recs = _records(_state["dir"], _state["run_id"])
        errors = sorted(
            (r for r in recs.values() if r["kind"] == "error" and r["rank"] != mine), key=lambda r: r["time"]
        )
        if errors:
            e = errors[0]
            return e, f"rank {e['rank']} ({describe(e)}) failed first ({_first_line(e['message'])})"
        status = {p["rank"]: proc_status(p) for p in peers if p["rank"] not in recs}
        gone = [p for p in peers if status.get(p["rank"]) in ("gone", "reused")]
        if gone:
            return gone[0], f"rank {gone[0]['rank']} ({describe(gone[0])}) died first"
        if time.time() >= deadline or not peers:
            break
        time.sleep(0.2)
    far = sorted({p["host"] for p in peers if status.get(p["rank"]) == "unknown"})
    return None, (
        "no peer on this host is gone and none recorded a failure"
        + (f"; ranks on {', '.join(far)} cannot be checked from here" if far else "")
    )


def claim_exit() -> bool:
    """True for the first exit path of this process; a later one must leave the exit to it."""
    return _once.acquire(blocking=False)


def finish(code: int, message: str = "") -> None:
    """A normal way out (main returned `code`): the record, then the exit hooks (the run lock)."""
    record("exit", code, message)
    _run_exits()


def stop(err: BaseException) -> tuple[dict | None, str]:
    """A failing rank's way out: find the cause, record it (peer or error), run the exit hooks.
    Returns find_cause's answer for the message."""
    cause, phrase = find_cause()
    text = f"{type(err).__name__}: {err}"
    if cause is not None:
        record("peer", 1, f"{phrase}; this rank stops ({_first_line(text)})", [cause["rank"]])
    else:
        record("error", 1, text)
    _run_exits()
    return cause, phrase


def watch_sigterm(prog: str, code: int = 143) -> None:
    """SIGTERM (the launcher stops the job) is handled by a thread, so it is acted on even while the
    main thread waits inside a collective: name the peer that died first, record, release the run
    lock, exit `code`. Call from the main thread, before anything else installs a wakeup fd."""
    if _state.get("watching") or threading.current_thread() is not threading.main_thread():
        return
    r, w = os.pipe()
    os.set_blocking(w, False)
    signal.set_wakeup_fd(w)
    signal.signal(signal.SIGTERM, lambda *_: None)  # the thread below acts on it
    _state["watching"] = True

    def watch():
        while signal.SIGTERM not in os.read(r, 64):
            pass
        if not claim_exit():
            return  # the main thread is already on its way out
        cause, phrase = find_cause()
        rank = _state["rank"]
        msg = (
            f"{prog} (rank {'?' if rank is None else rank}): terminated (SIGTERM: the launcher or the batch "
            f"system stops the job); " + (f"{phrase}; this rank stops" if cause else phrase)
        )
        print(msg, file=sys.stderr, flush=True)
        record("peer" if cause else "terminated", code, msg, [cause["rank"]] if cause else [])
        _run_exits()
        os._exit(code)

    threading.Thread(target=watch, name="sigterm-watch", daemon=True).start()


# ------------------------------------------------------------------------------------------------
def _who(ranks: dict[int, dict], r: int) -> str:
    return f"rank {r} ({describe(ranks.get(r, {}))})"


def report(record_path: str | Path, code: int) -> str:
    """The job's last line: which rank failed or died first, from the registry and the records."""
    head = f"weathermixer: the job failed (exit {code})"
    reg = _load(Path(record_path))
    if not reg.get("ranks"):
        return f"{head} before its ranks registered (no {record_path}); the reason is in the messages above"
    ranks = {p["rank"]: p for p in reg["ranks"]}
    recs = _records(Path(reg["run_dir"]) / "ranks", reg["run_id"])
    named = sorted((rec["time"], r) for rec in recs.values() if rec["kind"] == "peer" for r in rec["dead"])
    errors = sorted((rec["time"], rec["rank"]) for rec in recs.values() if rec["kind"] == "error")
    silent = [r for r in sorted(ranks) if r not in recs]
    if named or errors:
        first = (named or errors)[0][1]
        rest = sorted(r for r in recs if r != first)
        if first in recs and recs[first]["kind"] == "error":
            what = f"failed first: {_first_line(recs[first]['message'])}"
        else:
            what = (
                "died first; it left no message (killed by a signal such as SIGKILL or the OOM killer, or "
                "its node went down)"
            )
        return f"{head}: {_who(ranks, first)} {what}" + (f"; ranks {rest} stopped after it" if rest else "")
    if silent:
        return (
            f"{head}: " + ", ".join(_who(ranks, r) for r in silent) + " left no record (killed by a signal "
            "such as SIGKILL or the OOM killer, or their node went down)"
        )
    codes = sorted({rec["code"] for rec in recs.values()})
    return f"{head}: every rank exited by itself (code(s) {codes}); the reason is in the messages above"


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "report":
        sys.exit("usage: python -m weathermixer.train.rankwatch report RECORD EXIT_CODE")
    print(report(sys.argv[2], int(sys.argv[3])), file=sys.stderr, flush=True)
