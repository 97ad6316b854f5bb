import pytest

from jigsaw_ext.testing import run_workers
from tests import workers


@pytest.mark.parametrize("mesh,stage", [((2, 1, 2), 1), ((2, 2, 1), 2)], ids=["2x1x2-zero1", "2x2x1-zero2"])
def test_deepspeed_zero_reduces_over_dp_only(mesh, stage):
    dp, domain, tp = mesh
    res = run_workers(workers.deepspeed_zero_over_dp, dp * domain * tp, dp, domain, tp, stage,
                      timeout=300, preload=["deepspeed", "weathermixer.model"])
    for rank, r in enumerate(res):
        assert r["dp_world"] == dp
        assert r["max_err"] <= 1e-5, f"rank {rank}: {r}"
