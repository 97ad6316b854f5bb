"""mesh.reduce_gradients_once: with gradient accumulation (A = 3 micro-batches per optimizer step),
the model-axis gradient reductions (weight-gradient reduce-scatters / all-reduces, small-parameter
all-reduces) run once per optimizer step, on its last micro-batch, and training through the
DeepSpeed engine still equals an independent serial twin.

The reductions a micro-batch must skip are read off the planner's trace of the same model on the
same mesh (jigsaw_ext.plan.trace classifies every collective by the autograd function issuing it:
'weight_grad', 'small_param_grad'): a deferred micro-batch sends exactly those fewer calls and bytes
than the same micro-batch without the switch, the boundary micro-batch exactly as many."""

from collections import Counter

import pytest
import torch

from jigsaw_ext.mesh import MeshConfig
from jigsaw_ext.plan.trace import fake_mesh, trace_step
from jigsaw_ext.testing import run_workers
from tests import accumulate_workers as W
from weathermixer.plan import WeatherPlanModel

pytestmark = pytest.mark.distributed

KINDS = ("all_gather", "reduce_scatter", "all_reduce")
TOL = 1e-5


def _deferred_reductions(domain, tp, strategy, rank, replicate=()):
    """(calls, bytes) by kind of the model-axis gradient reductions of one micro-batch on `rank`."""
    cfg = W._cfg()
    model = WeatherPlanModel(cfg, rollout=1)
    mesh = fake_mesh(
        MeshConfig(domain=domain, tp=tp, strategy={"*": strategy}, replicate_weights_over=list(replicate)), rank
    )
    tr = trace_step(model.build(mesh, torch.float32, W.MICRO), lambda m: model.step(m, mesh, W.MICRO, torch.float32))
    calls, sent = Counter(), Counter()
    for c in tr.collectives:
        if c.purpose in ("weight_grad", "small_param_grad") and c.group_size > 1:
            calls[c.kind] += 1
            sent[c.kind] += c.sent_bytes
    return calls, sent


def _check_case(res, case, world):
    dp, domain, tp, stage, strategy, *replicate = case
    for rank, r in enumerate(res):
        out = r[case]
        on_steps = len(out["err"]) - 1
        for step, (err, worst) in enumerate(out["err"]):
            assert err <= TOL, f"{case} rank {rank} step {step}: {worst} off by {err:.2e}"
        assert out["global_steps"] == on_steps + 1
        for held in out["deferred_bytes"]:
            assert held[-1] == 0, f"{case} rank {rank}: accumulators left after the step: {held}"
        expected_acc = 4 * out["accumulator_elements"]
        for step in range(on_steps):  # one accumulator per parameter, filled in place, emptied at the end
            assert out["deferred_bytes"][step][: W.GAS - 1] == [expected_acc] * (W.GAS - 1), (case, rank, out)
            assert out["deferred_bytes"][step][W.GAS - 1] == 0
        assert out["deferred_bytes"][on_steps] == [0] * (W.GAS + 1)  # switch off: nothing held
        if dp > 1:
            continue  # DeepSpeed's own dp reductions also follow the deferred gradients: not counted here
        skipped_calls, skipped_bytes = _deferred_reductions(domain, tp, strategy, rank, *replicate)
        assert sum(skipped_calls.values()) > 0 and sum(skipped_bytes.values()) > 0
        # counted: the bytes of every collective (DeepSpeed's dp reductions send none with dp = 1),
        # the calls the layers issue, and with ZeRO-0 every call (no DeepSpeed call before the boundary)
        off_calls, off_bytes = out["calls"][on_steps], out["bytes"][on_steps]
        counted = ("layers", "all") if stage == 0 else ("layers",)
        for step in range(on_steps):
            for i in range(W.GAS):
                calls, sent = out["calls"][step][i], out["bytes"][step][i]
                for kind in KINDS:
                    deferred = i < W.GAS - 1
                    skip_c, skip_b = (skipped_calls[kind], skipped_bytes[kind]) if deferred else (0, 0)
                    for who in counted:
                        assert calls[who].get(kind, 0) == off_calls[i][who].get(kind, 0) - skip_c, (
                            case,
                            rank,
                            step,
                            i,
                            kind,
                            who,
                            calls,
                            off_calls[i],
                            dict(skipped_calls),
                        )
                    assert sent.get(kind, 0) == off_bytes[i].get(kind, 0) - skip_b, (
                        case,
                        rank,
                        step,
                        i,
                        kind,
                        sent,
                        off_bytes[i],
                        dict(skipped_bytes),
                    )


def _check_safety(res):
    for r in res:
        s = r["safety"]
        assert s["held_mid_step"] > 0, s
        assert s["held_after_exception"] == 0, s
        assert s["grad_err"] <= TOL, s
        assert s["unreduced_raises"], s
        assert s["held_after_no_grad"] == 0, s


def _run(world, cases, safety=None):
    return run_workers(
        W.accumulate_cases, world, cases, safety, timeout=300, preload=["deepspeed", "weathermixer.model"]
    )


def test_reductions_once_per_step_on_2x2():
    """1x2x2, ZeRO-0 and ZeRO-2, weights gathered and stationary (and 2x1x2 ZeRO-2: DeepSpeed's dp
    reduction of gradients that arrive only on the last micro-batch; and weights replicated over tp:
    their all-reduces in linear_reduce_scatter deferred too): the parameters equal the serial
    twin's after each of two steps with the switch and one without, and the deferred micro-batches
    skip exactly the model-axis gradient reductions. Plus exception safety and forwards without
    backward (validation)."""
    cases = [
        (1, 2, 2, 0, "gather"),
        (1, 2, 2, 2, "stationary"),
        (1, 2, 2, 2, "gather"),
        (2, 1, 2, 2, "gather"),
        (1, 2, 2, 0, "gather", ("tp",)),
    ]
    res = _run(4, cases, safety=(2, 2, "gather"))
    for case in cases:
        _check_case(res, case, 4)
    _check_safety(res)


@pytest.mark.parametrize(
    "cases",
    [
        [(1, 3, 1, 2, "gather"), (1, 1, 3, 0, "stationary")],
    ],
    ids=["uneven-3"],
)
def test_reductions_once_per_step_on_uneven_meshes(cases):
    """Uneven shards (1x3x1: 25 patch rows... over 3; 1x1x3: features over 3), ZeRO-2 and ZeRO-0."""
    res = _run(3, cases)
    for case in cases:
        _check_case(res, case, 3)


def test_trainer_defers_and_matches_the_serial_twin(tmp_path):
    """train.py's Trainer with mesh.reduce_gradients_once on 2x1x2 ZeRO-2, 3 micro-batches per step,
    a latent rollout of 2 leads (every block used twice per forward), AdamW with global-norm
    clipping: the parameters equal the independent serial twin's, and reductions were deferred."""
    from tests import engine_workers
    from tests.integration.test_engine_path import COMMON
    from tests.integration.test_training_runs import small_job

    job = small_job(tmp_path, rollout=2, resume="never")
    settings = [s for s in COMMON if not s.startswith("ds.gradient_accumulation_steps")] + [
        "ds.gradient_accumulation_steps=3",
        f"log.dir={tmp_path / 'out'}",
        "mesh.dp=2",
        "mesh.domain=1",
        "mesh.tp=2",
        "ds.zero_optimization.stage=2",
        "mesh.reduce_gradients_once=true",
    ]
    twin = engine_workers.serial_twin(str(job), settings, 3)
    res = run_workers(
        W.trainer_with_switch,
        4,
        str(job),
        settings,
        twin["params"],
        timeout=300,
        preload=["deepspeed", "weathermixer.train.trainer"],
    )
    for rank, r in enumerate(res):
        assert r["max_err"] <= TOL, f"rank {rank}: {r['max_err']:.2e} on {r['worst']}"
        assert r["global_steps"] == 3 and r["micro_steps"] == 9, r
        # per step: every deferred use in micro-batches 0 and 1, flushed or plain in micro-batch 2
        assert r["uses"].get("deferred", 0) > 0 and r["uses"]["deferred"] % 6 == 0, r["uses"]
        assert r["uses"]["flushed"] * 2 == r["uses"]["deferred"], r["uses"]
