"""Run a function on N distributed workers: one helper for every multi-process test and tool.

Workers are forked from a forkserver that has already imported the heavy modules, so each launch
costs milliseconds instead of ~5 s of imports. The server is started once per process and keeps the
modules it was started with: a test suite names every heavy module its workers use up front
(`preload_in_workers`, before the first run); a later run's own `preload` adds nothing then. The
parent enforces a timeout, reports which rank failed with its traceback, kills the others (no rank
is left waiting in a collective), and workers end with os._exit after a final barrier (avoids the
gloo/ZeRO-3 teardown race at interpreter exit).
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import pickle
import socket
import time
import traceback

PRELOAD = ["torch", "torch.distributed", "jigsaw_ext.collectives", "jigsaw_ext.mesh"]
_preload: list[str] = list(PRELOAD)  # what the forkserver imports when it starts


class WorkerFailure(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def preload_in_workers(*modules: str) -> None:
    """Have the forkserver import `modules` when it starts (once, at the first run_workers of this
    process) instead of every worker importing them: call it before the first run. A module that
    fails to import there is imported by the worker that needs it."""
    _preload.extend(m for m in modules if m not in _preload)


def _context(preload):
    ctx = mp.get_context("forkserver")
    preload_in_workers(*preload)
    ctx.set_forkserver_preload(list(_preload))
    return ctx


def _worker(fn, rank, world, port, conn, threads, backend, dist_timeout, args, env):
    try:
        os.environ.update(env)
        os.environ.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE=str(world),
        )
        import torch
        import torch.distributed as dist

        from jigsaw_ext.mesh import init_process_group

        if threads:
            torch.set_num_threads(threads)
        init_process_group(timeout_s=dist_timeout, backend=backend)
        result = fn(rank, world, *args)
        dist.barrier()
        conn.send_bytes(pickle.dumps(("ok", result)))
        conn.close()
        os._exit(0)
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        try:
            conn.send_bytes(pickle.dumps(("error", traceback.format_exc())))
            conn.close()
        finally:
            os._exit(1)


def run_workers(
    fn,
    world_size: int,
    *args,
    timeout: float = 300.0,
    threads: int | None = 1,
    backend: str | None = None,
    env: dict | None = None,
    preload=(),
) -> list:
    """Run fn(rank, world_size, *args) on `world_size` freshly initialised ranks; return each
    rank's (picklable) result. Raises WorkerFailure naming the rank on error or timeout."""
    ctx = _context(preload)
    port = _free_port()
    procs, conns = [], []
    for rank in range(world_size):
        recv, send = ctx.Pipe(duplex=False)
        p = ctx.Process(
            target=_worker,
            name=f"rank{rank}",
            daemon=True,
            args=(fn, rank, world_size, port, send, threads, backend, max(timeout, 30.0), args, dict(env or {})),
        )
        p.start()
        send.close()
        procs.append(p)
        conns.append(recv)
    results: dict[int, object] = {}
    deadline = time.monotonic() + timeout
    pending = dict(enumerate(conns))
    try:
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerFailure(
                    f"timeout after {timeout:.0f} s: ranks {sorted(pending)} of {world_size} "
                    f"did not finish (hung in a collective?)"
                )
            ready = mpc.wait(list(pending.values()), timeout=left)
            for conn in ready:
                rank = next(r for r, c in pending.items() if c is conn)
                try:
                    status, payload = pickle.loads(pending[rank].recv_bytes())
                except EOFError:
                    procs[rank].join(5)
                    raise WorkerFailure(
                        f"rank {rank} died without reporting (exit code {procs[rank].exitcode})"
                    ) from None
                if status == "error":
                    raise WorkerFailure(f"rank {rank} of {world_size} failed:\n{payload}")
                results[rank] = payload
                del pending[rank]
    finally:
        for p in procs:
            p.join(timeout=10 if not pending else 0.1)
            if p.is_alive():
                p.kill()
                p.join()
        for c in conns:
            c.close()
    return [results[r] for r in range(world_size)]
