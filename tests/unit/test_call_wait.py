"""The planner's price for collectives with more ranks than cores (CPU profiles): every call of the
model's collectives and of ZeRO's traffic costs the profile's measured figure, `replicas` where the
cores run several model groups and `one_group` where they run one, scaled by ranks / cores - 1;
nothing with as many ranks as cores or on a GPU profile."""

from __future__ import annotations

import pytest

from jigsaw_ext.plan.cost import Candidate, estimate, oversubscription_seconds
from jigsaw_ext.plan.hardware import load_hardware
from jigsaw_ext.plan.trace import Collective, StepTrace

CPU = load_hardware("cpu-gloo-2core")
REPLICAS, ONE_GROUP = CPU.oversubscribed_call_s["replicas"], CPU.oversubscribed_call_s["one_group"]


def _trace(model_calls: int) -> StepTrace:
    one = Collective("all_gather", "domain", 2, 1, 1000, 2000, "forward", "activation")
    alone = Collective("all_gather", "tp", 1, 1, 0, 0, "forward", "activation")  # a group of one: no call
    return StepTrace(collectives=[one] * model_calls + [alone], param_count=1000, param_numels=[1000], param_bytes=4000)


def _cand(dp, domain, tp, accumulation=1, zero=0):
    return Candidate(dp, domain, tp, zero, (), 2, accumulation, "float32")


def test_figures_are_measured_and_positive():
    assert REPLICAS > 0 and ONE_GROUP > 0
    assert "oversubscribed_call_s" in CPU.sources["oversubscription"]
    assert "collectives with more ranks than cores" not in CPU.unmeasured


@pytest.mark.parametrize(
    "cand, expected",
    [
        (_cand(1, 2, 1), 0.0),  # 2 ranks on 2 cores
        (_cand(2, 1, 1), 0.0),
        # 2x2x1: two model groups on the node; 3 model calls + ZeRO-0's gradient all-reduce
        (_cand(2, 2, 1), REPLICAS * (3 + 1)),
        (_cand(2, 2, 1, accumulation=2), REPLICAS * (2 * 3 + 1)),
        (_cand(1, 2, 2), ONE_GROUP * 3),  # one model group of 4
        (_cand(4, 1, 1), ONE_GROUP * (3 + 1)),  # no model group: the all-reduce couples all ranks
        (_cand(1, 4, 2), 3 * ONE_GROUP * 3),  # 8 ranks on 2 cores: x (8 / 2 - 1)
        (_cand(2, 2, 1, zero=1), REPLICAS * (3 + 2)),  # ZeRO-1: all-reduce and the parameters' all-gather
    ],
    ids=["1x2x1", "2x1x1", "2x2x1", "2x2x1-acc2", "1x2x2", "4x1x1", "1x4x2", "2x2x1-zero1"],
)
def test_calls_times_the_measured_figure(cand, expected):
    assert oversubscription_seconds(CPU, cand, _trace(3)) == pytest.approx(expected, rel=1e-12)


def test_in_the_step_time_on_cpu_and_nowhere_on_a_gpu():
    trace, cand = _trace(3), _cand(2, 2, 1)
    bare = CPU.model_copy(update={"oversubscribed_call_s": {}})
    with_it, without = (estimate(hw, cand, trace, 1.0).seconds["intra_comm"] for hw in (CPU, bare))
    assert with_it - without == pytest.approx(REPLICAS * 4, rel=1e-9)
    assert oversubscription_seconds(load_hardware("h100-sxm-8pernode"), _cand(2, 2, 2), trace) == 0.0
