"""Work is conserved: the matmul FLOPs the planner traces on the ranks of one model group add up to
those of the same step on one rank, for every strategy and mesh.chunk_mb, forward and forward +
backward, on shapes every mesh here divides evenly (uneven shards pad, and padding is extra work).
It needs no FLOP counter to compare with, so it also holds the products torch.utils.flop_counter
itself leaves out (in-place forms such as the `addmm_` that accumulates partial products into a
reduce-scatter buffer), and it finds products a layout computes in vain (an input gradient of data)."""

import pytest
import torch

from jigsaw_ext.mesh import MeshConfig
from jigsaw_ext.plan.trace import fake_mesh, trace_step
from weathermixer.plan import WeatherPlanModel
from weathermixer.selfcheck import default_model_config

# 12 x 12 tokens, token and channel hidden 72, 48 channels: every shard even on the meshes below
OVERRIDES = dict(grid=(24, 24), patch=(2, 2), hidden=48, rollout=2, history=0)
BATCH = 2
STRATEGIES = {
    "gather": dict(strategy={"*": "gather"}),
    "stationary": dict(strategy={"*": "stationary"}),
    "features": dict(strategy={"*": "features"}),
    "gather_chunks": dict(strategy={"*": "gather"}, chunk_mb=0.01),
}
MESHES = [(2, 2), (4, 1), (1, 4)]  # domain x tp
pytestmark = pytest.mark.slow


def _flops(cfg, mesh: MeshConfig, rank: int) -> tuple[int, int]:
    model = WeatherPlanModel(cfg, rollout=cfg.rollout)
    fake = fake_mesh(mesh, rank)
    tr = trace_step(model.build(fake, torch.float32, BATCH), lambda m: model.step(m, fake, BATCH, torch.float32))
    return sum(m.flops for m in tr.matmuls if m.phase == "forward"), tr.matmul_flops


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_flops_of_a_model_group_add_up_to_one_rank(strategy):
    cfg = default_model_config(**OVERRIDES)
    serial = _flops(cfg, MeshConfig(), 0)
    bad = []
    for domain, tp in MESHES:
        mesh = MeshConfig(domain=domain, tp=tp, **STRATEGIES[strategy])
        ranks = [_flops(cfg, mesh, r) for r in range(domain * tp)]
        total = tuple(sum(r[i] for r in ranks) for i in range(2))
        for what, got, want in zip(("forward", "forward+backward"), total, serial, strict=True):
            if abs(got - want) > 1e-9 * want:
                bad.append((f"{domain}x{tp}", what, got, want))
    assert not bad, bad
