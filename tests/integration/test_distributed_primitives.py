import time

import pytest

from jigsaw_ext.testing import WorkerFailure, run_workers
from tests import workers

pytestmark = pytest.mark.distributed

TOL = 1e-5


def test_harness_returns_results_in_rank_order():
    assert run_workers(workers.ok, 3, timeout=60) == [0, 10, 20]


def test_harness_names_failing_rank_with_traceback_and_does_not_hang():
    t0 = time.monotonic()
    with pytest.raises(WorkerFailure, match=r"rank 1 of 2 failed:(.|\n)*deliberate failure on this rank"):
        run_workers(workers.fail_on_rank_1, 2, timeout=60)
    assert time.monotonic() - t0 < 30


def test_harness_timeout_names_hung_ranks():
    t0 = time.monotonic()
    with pytest.raises(WorkerFailure, match=r"timeout after 8 s: ranks \[0, 1\]"):
        run_workers(workers.hang_on_rank_0, 2, timeout=8)
    assert time.monotonic() - t0 < 25


def test_harness_reports_a_rank_that_dies_silently():
    with pytest.raises(WorkerFailure, match=r"rank 1 died without reporting \(exit code 3\)"):
        run_workers(workers.die_on_rank_1, 2, timeout=60)


@pytest.mark.parametrize("world", [2, 3])
def test_collectives_match_their_closed_forms(world):
    results = run_workers(workers.collectives_against_hand_computed_duals, world, timeout=120)
    for rank, errs in enumerate(results):
        bad = {k: v for k, v in errs.items() if v > TOL}
        assert not bad, f"rank {rank}: {bad}"


@pytest.mark.parametrize("world", [2, 3, 4])  # 4: the reduce-scatter reuses its first buffer
def test_ring_collectives_on_gloo_equal_gloo_and_are_counted_as_collectives(world):
    for rank, checks in enumerate(run_workers(workers.ring_collectives_against_gloo, world, timeout=120)):
        bad = [k for k, ok in checks.items() if not ok]
        assert not bad, f"rank {rank}: {bad}"


def test_mesh_groups_follow_tp_domain_dp_order():
    res = run_workers(workers.mesh_groups, 8, 2, 2, 2, timeout=120)
    assert res[5]["tp"] == [4, 5] and res[5]["domain"] == [5, 7] and res[5]["dp"] == [1, 5]
    assert res[5]["model"] == [4, 5, 6, 7]
    assert res[5]["mpu"] == (4, 1, 2, 1)  # model group size, model rank, dp size, dp rank


@pytest.mark.parametrize(
    "domain,tp,replicate",
    [(2, 1, []), (1, 2, []), (2, 2, []), (3, 1, []), (1, 3, []), (2, 2, ["domain", "tp"])],
    ids=lambda v: str(v),
)
def test_layers_match_serial_twin(domain, tp, replicate):
    results = run_workers(workers.layers_against_serial_twin, domain * tp, domain, tp, replicate, timeout=120)
    for rank, errs in enumerate(results):
        bad = {k: v for k, v in errs.items() if v > TOL}
        assert not bad, f"rank {rank}: {bad}"
