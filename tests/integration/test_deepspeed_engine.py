import pytest

from jigsaw_ext.testing import run_workers
from tests import workers

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize(
    "mesh,stage,clip,strategy",
    [
        ((2, 1, 2), 1, 0.0, None),
        ((2, 2, 1), 2, 0.0, None),
        ((1, 2, 2), 0, 0.05, None),
        ((2, 1, 2), 1, 0.05, None),
        ((2, 1, 2), 2, 0.05, "stationary"),
        ((2, 2, 1), 3, 0.0, "stationary"),
        ((2, 1, 2), 3, 0.0, "gather"),
        ((2, 1, 2), 3, 0.05, "features"),
    ],
    ids=[
        "2x1x2-zero1",
        "2x2x1-zero2",
        "1x2x2-zero0-clip",
        "2x1x2-zero1-clip",
        "2x1x2-zero2-clip-stationary",
        "2x2x1-zero3-stationary",
        "2x1x2-zero3-gather",
        "2x1x2-zero3-clip-features",
    ],
)
def test_deepspeed_zero_reduces_over_dp_only(mesh, stage, clip, strategy):
    """ZeRO over dp only; with clipping, DeepSpeed's norm over the model group counts every
    logical element once (the global norm the serial twin clips with, LayerNorm affines stored whole
    included). Every way the mixing MLPs meet their data (strategy None: auto), ZeRO-3 included (its
    partitioned parameters are used only inside their own modules' forward)."""
    dp, domain, tp = mesh
    res = run_workers(
        workers.deepspeed_zero_over_dp,
        dp * domain * tp,
        dp,
        domain,
        tp,
        stage,
        clip,
        strategy,
        timeout=300,
        preload=["deepspeed", "weathermixer.model"],
    )
    for rank, r in enumerate(res):
        assert r["dp_world"] == dp
        assert r["max_err"] <= 1e-5, f"rank {rank}: {r}"
