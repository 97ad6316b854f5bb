import pytest

from jigsaw_ext.testing import run_workers
from tests import workers


@pytest.mark.parametrize("mesh,stage,clip", [((2, 1, 2), 1, 0.0), ((2, 2, 1), 2, 0.0), ((1, 2, 2), 0, 0.05),
                                             ((2, 1, 2), 1, 0.05)],
                         ids=["2x1x2-zero1", "2x2x1-zero2", "1x2x2-zero0-clip", "2x1x2-zero1-clip"])
def test_deepspeed_zero_reduces_over_dp_only(mesh, stage, clip):
    """ZeRO over dp only; with clipping, DeepSpeed's norm over the model group counts every
    logical element once (the global norm the serial twin clips with)."""
    dp, domain, tp = mesh
    res = run_workers(workers.deepspeed_zero_over_dp, dp * domain * tp, dp, domain, tp, stage, clip,
                      timeout=300, preload=["deepspeed", "weathermixer.model"])
    for rank, r in enumerate(res):
        assert r["dp_world"] == dp
        assert r["max_err"] <= 1e-5, f"rank {rank}: {r}"
