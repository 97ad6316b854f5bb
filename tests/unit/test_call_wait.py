"""The planner's CPU node with its cores full: every collective call (the model's and ZeRO's) costs the
profile's measured wait, `cores` with as many ranks as cores, and with twice as many `replicas` where the
cores run several model groups, `one_group` where they run one, linear in ranks / cores between and
beyond; nothing with fewer ranks than cores or on a GPU profile. Ranks sharing the cores stretch their
work (computation, the collectives' copies, the training loop's own cost), not a message's latency."""

from __future__ import annotations

import pytest

from jigsaw_ext.plan.cost import Candidate, call_wait_seconds, collective_seconds, estimate
from jigsaw_ext.plan.hardware import load_hardware
from jigsaw_ext.plan.trace import Collective, StepTrace

CPU = load_hardware("cpu-gloo-2core")
CORES, REPLICAS, ONE_GROUP = (CPU.call_wait_s[k] for k in ("cores", "replicas", "one_group"))


def _trace(model_calls: int) -> StepTrace:
    one = Collective("all_gather", "domain", 2, 1, 1000, 2000, "forward", "activation")
    alone = Collective("all_gather", "tp", 1, 1, 0, 0, "forward", "activation")  # a group of one: no call
    return StepTrace(collectives=[one] * model_calls + [alone], param_count=1000, param_numels=[1000], param_bytes=4000)


def _cand(dp, domain, tp, accumulation=1, zero=0):
    return Candidate(dp, domain, tp, zero, (), 2, accumulation, "float32")


def test_figures_are_measured_and_positive():
    assert CORES > 0 and REPLICAS > 0 and ONE_GROUP > 0 and CPU.trainer_step_s > 0
    assert (
        CPU.sources["call_wait_s"].startswith("measured here") and "bench_oversubscribed" in CPU.sources["call_wait_s"]
    )
    assert CPU.sources["trainer_step_s"].startswith("measured here")


@pytest.mark.parametrize(
    "cand, expected",
    [
        (_cand(1, 1, 1), 0.0),  # one rank on two cores
        (_cand(1, 2, 1), CORES * 3),  # 2 ranks on 2 cores
        (_cand(2, 1, 1), CORES * (3 + 1)),  # 2 ranks: the model calls and ZeRO-0's all-reduce
        # 2x2x1: two model groups on the node; 3 model calls + ZeRO-0's gradient all-reduce
        (_cand(2, 2, 1), REPLICAS * (3 + 1)),
        (_cand(2, 2, 1, accumulation=2), REPLICAS * (2 * 3 + 1)),
        (_cand(1, 2, 2), ONE_GROUP * 3),  # one model group of 4
        (_cand(4, 1, 1), ONE_GROUP * (3 + 1)),  # no model group: the all-reduce couples all ranks
        (_cand(1, 4, 2), (CORES + 3 * (ONE_GROUP - CORES)) * 3),  # 8 ranks on 2 cores: ranks / cores = 4
        (_cand(1, 3, 1), (CORES + 0.5 * (ONE_GROUP - CORES)) * 3),  # 3 ranks: halfway
        (_cand(2, 2, 1, zero=1), REPLICAS * (3 + 2)),  # ZeRO-1: all-reduce and the parameters' all-gather
    ],
    ids=["1x1x1", "1x2x1", "2x1x1", "2x2x1", "2x2x1-acc2", "1x2x2", "4x1x1", "1x4x2", "1x3x1", "2x2x1-zero1"],
)
def test_calls_times_the_measured_figure(cand, expected):
    assert call_wait_seconds(CPU, cand, _trace(3)) == pytest.approx(expected, rel=1e-12)


def test_in_the_step_time_on_cpu_and_nowhere_on_a_gpu():
    trace, cand = _trace(3), _cand(2, 2, 1)
    bare = CPU.model_copy(update={"call_wait_s": {}})
    with_it, without = (estimate(hw, cand, trace, 1.0).seconds["intra_comm"] for hw in (CPU, bare))
    assert with_it - without == pytest.approx(REPLICAS * 4, rel=1e-9)
    assert call_wait_seconds(load_hardware("h100-sxm-8pernode"), _cand(2, 2, 2), trace) == 0.0


def test_sharing_cores_stretches_copies_not_latency():
    one, two = (collective_seconds(CPU, "all_gather", 8e6, 2, 1, share=s)[0] for s in (1.0, 2.0))
    latency = CPU.intra.call_s + CPU.intra.alpha_s
    assert two - one == pytest.approx(one - latency, rel=1e-12) and one > latency > 0


@pytest.mark.parametrize("mesh, share", [((1, 1, 1), 1.0), ((1, 2, 1), 1.0), ((2, 2, 1), 2.0), ((1, 4, 2), 4.0)])
def test_the_training_loop_costs_its_measured_time_per_rank_and_core(mesh, share):
    trace = _trace(1)
    est = estimate(CPU, _cand(*mesh, accumulation=3), trace, 1.0)
    assert est.seconds["trainer"] == pytest.approx(3 * share * CPU.trainer_step_s, rel=1e-12)
    assert estimate(load_hardware("h100-sxm-8pernode"), _cand(*mesh), trace, 1.0).seconds["trainer"] == 0.0
