import pytest
import torch

from jigsaw_ext.layout import Layout, Split, even_split


def test_even_split_uneven_and_empty():
    assert even_split(721, 2) == (361, 360)
    assert even_split(3, 4) == (1, 1, 1, 0)
    assert sum(even_split(1440, 7)) == 1440
    with pytest.raises(ValueError):
        even_split(4, 0)


def test_split_offsets():
    s = Split("domain", (3, 2, 2))
    assert [s.offset(i) for i in range(3)] == [0, 3, 5]
    assert s.slice(1) == slice(3, 5) and s.total == 7


def test_layout_shard_covers_tensor_exactly_once():
    full = torch.arange(5 * 7 * 3).reshape(5, 7, 3)
    lay = Layout((5, 7, 3), (Split("tp", even_split(5, 3)), Split("domain", (4, 0, 3)), None))
    seen = torch.zeros_like(full)
    for t in range(3):
        for d in range(3):
            coords = {"tp": t, "domain": d, "dp": 0}
            block = lay.shard(full, coords)
            assert tuple(block.shape) == lay.local_shape(coords)
            seen[lay.local_slices(coords)] += 1
            assert torch.equal(block, full[lay.local_slices(coords)])
    assert torch.all(seen == 1)


def test_layout_rejects_inconsistent_sizes():
    with pytest.raises(ValueError, match="do not add up"):
        Layout((5,), (Split("tp", (2, 2)),))
    lay = Layout((4,), (None,))
    with pytest.raises(ValueError, match="expected a full tensor"):
        lay.shard(torch.zeros(5), {})
