"""This process as other processes can recognise it: host, pid, start time, boot id and pid
namespace; whether a recorded process still runs. Shared by runfolder (the RUN.lock holder) and
rankwatch (the rank that died first); imports nothing of the project."""

from __future__ import annotations

import os
import socket
from pathlib import Path


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) from /proc, or None (no such process / no /proc)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the command name may contain spaces and parentheses
    return fields[0], int(fields[19])


def read_text(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def me() -> dict:
    """This process: host, pid, start time (ticks), boot id and pid namespace (None where unknown)."""
    stat = _proc_stat(os.getpid())
    try:
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pidns = None
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "start": stat[1] if stat else None,
        "boot": read_text("/proc/sys/kernel/random/boot_id"),
        "pidns": pidns,
    }


def proc_status(p: dict) -> str:
    """'running', 'gone' (no such process, or a zombie), 'reused' (the pid now belongs to a process
    started at another time) or 'unknown' (another host, boot or pid namespace: not checkable here)."""
    here = me()
    if any(p.get(k) != here[k] for k in ("host", "boot", "pidns")):
        return "unknown"
    stat = _proc_stat(int(p["pid"]))
    if stat is None:
        if here["start"] is not None:  # /proc works here: the process does not exist
            return "gone"
        try:
            os.kill(int(p["pid"]), 0)
        except ProcessLookupError:
            return "gone"
        except PermissionError:
            pass
        return "running"
    if stat[0] in "ZX":
        return "gone"
    return "reused" if p.get("start") is not None and stat[1] != p["start"] else "running"


def describe(p: dict) -> str:
    return f"host {p.get('host')}, pid {p.get('pid')}"
