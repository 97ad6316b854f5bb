"""Batches moved to the GPU one step ahead on a side CUDA stream (data.device_prefetch).

A pinned batch copied with `.to(cuda, non_blocking=True)` on the compute stream is asynchronous for
the host, but the GPU still runs it in line with the kernels: the step waits for its own input. Here
the copy of batch i + 1 is issued on a side stream as soon as batch i is handed out, so it runs while
batch i computes. Ordering: the compute stream waits for the copy's event before it reads the batch,
and each tensor is marked as used by the compute stream (`record_stream`), so the caching allocator
does not hand its memory to the side stream's next copy while the step still reads it.

The stream calls sit behind a small interface: `CudaCopyStream` on a GPU, `InlineCopy` (a plain
`.to(device)`) elsewhere, so the ordering logic is tested on the CPU with a fake.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from .loader import Sample


def move_sample(sample: Sample, move: Callable[[torch.Tensor], torch.Tensor]) -> Sample:
    return Sample(
        move(sample.fields),
        None if sample.static is None else move(sample.static),
        [move(t) for t in sample.targets],
        sample.times,
    )


def sample_tensors(sample: Sample) -> list[torch.Tensor]:
    return [sample.fields] + ([] if sample.static is None else [sample.static]) + list(sample.targets)


class InlineCopy:
    """No side stream: the copy is issued where the batch is taken (the CPU, or device_prefetch off)."""

    def __init__(self, device: torch.device):
        self.device = device

    def copy(self, sample: Sample):
        return move_sample(sample, lambda t: t.to(self.device, non_blocking=True)), None

    def hand_over(self, sample: Sample, ready) -> None:
        pass


class CudaCopyStream:
    """Copies on a side stream; `hand_over` orders the compute stream after the copy."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device=device)

    def copy(self, sample: Sample):
        # (the copy's device memory comes from the side stream's own pool: no wait on the compute
        # stream is needed before it; record_stream in hand_over covers its use there)
        with torch.cuda.stream(self.stream):
            moved = move_sample(sample, lambda t: t.to(self.device, non_blocking=True))
            ready = torch.cuda.Event()
            ready.record(self.stream)
        return moved, ready

    def hand_over(self, sample: Sample, ready) -> None:
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(ready)
        for t in sample_tensors(sample):
            t.record_stream(compute)


class DevicePrefetcher:
    """Iterates `batches`, each batch already on `device`: with `ahead`, batch i + 1's copy is issued
    when batch i is handed out. `state_dict()` is the loader position after the last batch handed
    out (the one held ahead is not consumed: a checkpoint resumes with it)."""

    def __init__(self, batches: Iterator[Sample], copier, ahead: bool, loader_state: Callable[[], dict]):
        self._batches, self._copier, self._ahead = batches, copier, ahead
        self._loader_state = loader_state
        self._held = None  # (loader state before it was taken, sample on the device, ready event)

    def _take(self):
        state = self._loader_state()
        sample = next(self._batches, None)
        if sample is None:
            return None
        return (state, *self._copier.copy(sample))

    def __iter__(self):
        return self

    def __next__(self) -> Sample:
        held = self._held if self._held is not None else self._take()
        self._held = None
        if held is None:
            raise StopIteration
        _, sample, ready = held
        self._copier.hand_over(sample, ready)
        if self._ahead:
            self._held = self._take()  # its copy runs while this batch computes
        return sample

    def state_dict(self) -> dict:
        return self._held[0] if self._held is not None else self._loader_state()


def device_batches(loader, device: torch.device, enabled: bool | None) -> DevicePrefetcher:
    """The trainer's batch iterator for `loader` (a ShardedSampleLoader) on `device`.
    enabled (data.device_prefetch): None = on with a CUDA device; true without one is an error."""
    cuda = device.type == "cuda"
    if enabled and not cuda:
        raise ValueError(f"data.device_prefetch=true needs a CUDA device (the training device is {device})")
    ahead = cuda if enabled is None else enabled
    copier = CudaCopyStream(device) if ahead else InlineCopy(device)
    return DevicePrefetcher(iter(loader), copier, ahead, loader.state_dict)
