"""All-gather and reduce-scatter on gloo (CPU) groups as a ring of point-to-point sends, used by
jigsaw_ext.collectives in place of gloo's own collectives (which it keeps for NCCL groups and under
torch.compile). Each collective is a generator of exchanges: each step sends one chunk to the next
rank and receives one from the previous (n - 1 steps on n ranks); RingWork is its Work handle.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# point-to-point ops of the gloo ring below, kept in a dict on purpose: jigsaw_ext.commstats patches
# module attributes that are torch.distributed functions, and the ring's sends are counted once, as
# the collective they make up, not again as sends
_P2P = {"send": dist.isend, "recv": dist.irecv}


class RingWork:
    """The Work handle of a ring collective: `steps` yields the handles of one exchange at a time
    (the first is issued now, so it overlaps whatever the caller computes before waiting)."""

    def __init__(self, steps):
        self._steps = steps
        self._pending = next(steps, None)

    def wait(self, timeout=None) -> bool:
        while self._pending is not None:
            for w in self._pending:
                w.wait()
            self._pending = next(self._steps, None)
        return True


def _ring_neighbours(group) -> tuple[int, int, int, int]:
    n, r = dist.get_world_size(group), dist.get_rank(group)
    to_global = (lambda i: i) if group is None else (lambda i: dist.get_global_rank(group, i))  # noqa: E731
    return n, r, to_global((r + 1) % n), to_global((r - 1) % n)


def _exchange(send: torch.Tensor, recv: torch.Tensor, to: int, source: int, group) -> list:
    return [_P2P["send"](send, to, group), _P2P["recv"](recv, source, group)]


def ring_all_gather_steps(output: torch.Tensor, input: torch.Tensor, group):
    n, r, nxt, prv = _ring_neighbours(group)
    out = output.view(n, -1)
    out[r].copy_(input.view(-1))
    for s in range(n - 1):  # pass on the chunk received last step (first: this rank's own)
        yield _exchange(input.view(-1) if s == 0 else out[(r - s) % n], out[(r - s - 1) % n], nxt, prv, group)


def ring_reduce_scatter_steps(output: torch.Tensor, input: torch.Tensor, group):
    """input: contiguous, or any view whose first dimension holds the n chunks (a rank-major view of
    a transposed buffer): only the chunk sent first is made contiguous, every other one is read in
    place by the additions, so no whole transposing copy precedes the collective."""
    n, r, nxt, prv = _ring_neighbours(group)
    chunks = input.view(n, -1) if input.is_contiguous() else input
    output = output.view(chunks.shape[1:])
    bufs = [chunks.new_empty(chunks.shape[1:]) for _ in range(min(n - 1, 2))]
    send = chunks[(r - 1) % n].contiguous()
    for s in range(n - 1):  # receive the running sum of chunk c, add this rank's term, pass it on
        c, recv = (r - s - 2) % n, bufs[s % 2]
        yield _exchange(send, recv, nxt, prv, group)
        if s == n - 2:  # c == r: the sum over every rank
            torch.add(recv, chunks[c], out=output)
        else:
            send = recv.add_(chunks[c])


def use_ring(group) -> bool:
    """Gloo (the CPU backend) groups gather and reduce-scatter over a ring of point-to-point sends:
    gloo's own reduce-scatter reduces the whole buffer and its all-gather copies through staging
    buffers (benchmarks/bench_collectives.py: on 2 and 3 ranks x 1-8 MB the ring takes 0.3-0.65x
    gloo's wall time). NCCL keeps its collectives; under torch.compile the functional ones are
    traced into the graph."""
    return not torch.compiler.is_compiling() and dist.get_backend(group) == "gloo" and dist.get_world_size(group) > 1
