"""data.device_prefetch: batches copied one step ahead (weathermixer.data.device). The ordering and
the loader position are checked on the CPU with a fake copy stream; the CUDA stream path on a GPU."""

import pandas as pd
import pytest
import torch

from weathermixer.data.device import DevicePrefetcher, InlineCopy, device_batches
from weathermixer.data.loader import Sample


def batches(n):
    return [
        Sample(
            torch.full((2, 3), float(i)), torch.zeros(2, 1), [torch.full((2, 3), i + 0.5)], [pd.Timestamp("2020-01-01")]
        )
        for i in range(n)
    ]


class FakeLoader:
    def __init__(self, n):
        self.items, self.taken = batches(n), 0

    def __iter__(self):
        for item in self.items:
            self.taken += 1
            yield item

    def state_dict(self):
        return {"taken": self.taken}


class RecordingCopier(InlineCopy):
    def __init__(self, events):
        super().__init__(torch.device("cpu"))
        self.events = events

    def copy(self, sample):
        self.events.append(("copy", int(sample.fields[0, 0])))
        return super().copy(sample)[0], f"ready{int(sample.fields[0, 0])}"

    def hand_over(self, sample, ready):
        self.events.append(("hand_over", int(sample.fields[0, 0]), ready))


def test_the_next_copy_is_issued_when_a_batch_is_handed_out_and_waited_for_first():
    events, loader = [], FakeLoader(3)
    it = DevicePrefetcher(iter(loader), RecordingCopier(events), True, loader.state_dict)
    first = next(it)
    assert float(first.fields[0, 0]) == 0
    # batch 0 copied, ordered, then batch 1's copy issued before batch 0 computes
    assert events == [("copy", 0), ("hand_over", 0, "ready0"), ("copy", 1)]
    assert it.state_dict() == {"taken": 1}  # batch 1 is held, not consumed: a checkpoint resumes with it
    assert [float(s.fields[0, 0]) for s in it] == [1, 2]
    assert events[-2:] == [("copy", 2), ("hand_over", 2, "ready2")]
    assert it.state_dict() == {"taken": 3}


def test_without_ahead_the_batches_and_loader_position_are_the_loaders():
    loader = FakeLoader(2)
    it = device_batches(loader, torch.device("cpu"), None)  # CPU: the inline copy, nothing ahead
    s = next(it)
    assert torch.equal(s.fields, loader.items[0].fields) and it.state_dict() == {"taken": 1}
    assert torch.equal(s.targets[0], loader.items[0].targets[0]) and s.times == loader.items[0].times


def test_device_prefetch_true_without_cuda_names_the_key():
    with pytest.raises(ValueError, match="data.device_prefetch"):
        device_batches(FakeLoader(1), torch.device("cpu"), True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_side_stream_copies_are_exact_and_on_the_device():
    loader = FakeLoader(4)
    for i, s in enumerate(device_batches(loader, torch.device("cuda"), True)):
        assert s.fields.is_cuda and torch.equal(s.fields.cpu(), loader.items[i].fields)
        assert torch.equal(s.targets[0].cpu(), loader.items[i].targets[0])
