"""jigsaw_ext.plan.calibrate: the rates of this machine measured on a model's own traced operators
(replayed on real tensors), and a profile that prices at them."""

from __future__ import annotations

import pytest
import torch

from jigsaw_ext.plan.calibrate import _real, measured_rates, replay, traced_ops, with_rates
from jigsaw_ext.plan.hardware import load_hardware
from jigsaw_ext.plan.search import Planner
from weathermixer.plan import WeatherPlanModel
from weathermixer.train.config import load_train_job


@pytest.mark.parametrize(
    "size, stride, offset, dtype",
    [((4, 3), (3, 1), 0, torch.float32), ((4, 3), (1, 4), 2, torch.float32), ((5, 6), (0, 1), 0, torch.float32)]
    + [((7,), (1,), 0, torch.int64), ((0, 3), (3, 1), 0, torch.float32)],
    ids=["contiguous", "transposed-offset", "expanded", "integers", "empty"],
)
def test_real_tensor_keeps_size_stride_offset_and_dtype(size, stride, offset, dtype):
    meta = (
        torch.empty_strided(size, stride, dtype=dtype, device="meta")
        if 0 not in size
        else torch.empty(size, device="meta")
    )
    if offset:
        meta = torch.empty(64, dtype=dtype, device="meta").as_strided(size, stride, offset)
    real = _real(meta)
    assert real.device.type == "cpu" and real.shape == meta.shape and real.dtype == meta.dtype
    if real.numel():
        assert real.stride() == meta.stride() and real.storage_offset() == meta.storage_offset()
        assert torch.isfinite(real.float()).all()
    if not dtype.is_floating_point:
        assert (real == 0).all()  # any index into anything is valid


@pytest.fixture(scope="module")
def planner():
    job, _ = load_train_job("quickstart_cpu")
    return Planner(WeatherPlanModel(job.model, rollout=1), load_hardware("cpu-gloo-2core"), "fp32")


def test_replay_runs_every_priced_operator_of_the_model(planner):
    ops = traced_ops(planner, micro_batch=2)
    trace = planner.trace(1, 1, (), 2)
    assert sum(op.flops for op in ops) == trace.matmul_flops > 0
    assert sum(op.bytes for op in ops) == sum(trace.other_bytes.values()) > 0
    r = replay(ops, reps=1, warmup=0)
    assert r["skipped"]["ops"] == 0, r["skipped"]
    assert r["matmul_flops"] == trace.matmul_flops and r["elementwise_bytes"] == sum(trace.other_bytes.values())
    assert r["matmul_s"] > 0 and r["elementwise_s"] > 0


def test_a_skipped_operator_is_counted_apart(planner):
    ops = traced_ops(planner, micro_batch=2)
    broken = type(ops[0])(torch.ops.aten.mm.default, (torch.empty(2, 3, device="meta"),) * 2, {}, "forward", 12, 0)
    r = replay([*ops[:3], broken], reps=1, warmup=0)
    assert r["skipped"]["ops"] == 1 and r["skipped"]["flops"] == 12 and r["skipped"]["names"] == ["aten.mm.default"]


def test_measured_rates_are_positive_and_restore_the_thread_count(planner):
    threads = torch.get_num_threads()
    rates = measured_rates(planner, micro_batch=2, reps=1)
    assert rates["gemm_GFLOPs"] > 0 and rates["elementwise_GBps"] > 0 and rates["operators"] > 10
    assert torch.get_num_threads() == threads


def test_a_profile_with_rates_prices_at_them():
    hw = with_rates(load_hardware("h100-sxm-8pernode"), {"gemm_GFLOPs": 50.0, "elementwise_GBps": 4.0})
    assert hw.matmul_seconds(64, 32, 16, "float32") == pytest.approx(2 * 64 * 32 * 16 / 50e9, rel=1e-12)
    assert hw.memory_GBps * hw.elementwise_efficiency == pytest.approx(4.0)
    assert hw.peak("bf16") == load_hardware("h100-sxm-8pernode").peak("bf16")  # other modes untouched
