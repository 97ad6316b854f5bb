"""bf16 training saves and resumes on every ZeRO stage, through train.py: a run resumed from its step-2
checkpoint continues the loss curve of the uninterrupted run exactly.

ZeRO-0 with bf16 goes through DeepSpeed's FP16 optimizer wrapper (fp32 masters beside the bf16
parameters), ZeRO-1/2 through its ZeRO optimizer's fragment mapping, ZeRO-3 through its partitions; stage 3
runs on two data-parallel ranks so its partitions are real halves."""

import pytest

from tests.integration.test_training_runs import STEPS, _losses, _max_rel, _train, small_job

pytestmark = pytest.mark.distributed

BF16 = 'ds.bf16={"enabled": true}'


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    return small_job(tmp_path_factory.mktemp("bf16"), rollout=2, resume="never")


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_bf16_resume_matches_the_uninterrupted_run(job, tmp_path, stage):
    """One run of STEPS steps saving every 2, then a second run (another folder) resumed from its
    step-2 tag: steps 3..STEPS equal the first run's losses; the resumed run says it resumed."""
    mesh, nproc, launcher = ((2, 1, 1), 2, "torchrun") if stage == 3 else ((1, 1, 1), 1, "python")
    common = [BF16, f"ds.zero_optimization.stage={stage}", "checkpoint.every=2", f"checkpoint.keep_last={STEPS}"]
    if stage == 3:
        common.append("ds.train_micro_batch_size_per_gpu=4")
    straight, run = _train(job, tmp_path / "straight", mesh, *common, nproc=nproc, launcher=launcher)
    assert "bfloat16" in run.stdout and len(straight) == STEPS
    tag = tmp_path / "straight" / "checkpoints" / "step00000002"
    assert (tag / "COMPLETE").is_file(), run.stdout[-2000:]
    resumed, run = _train(
        job, tmp_path / "resumed", mesh, *common, f"checkpoint.resume={tag}", nproc=nproc, launcher=launcher
    )
    assert "resuming from" in run.stdout and "(step 2)" in run.stdout, run.stdout[-2000:]
    assert sorted(resumed) == list(range(3, STEPS + 1))
    assert _max_rel(resumed, {s: straight[s] for s in resumed}) <= 1e-6
    assert _losses(tmp_path / "resumed") == resumed


def test_fused_fp16_optimizer_masters_and_moments_are_found():
    """DeepSpeed's FP16_Optimizer (ZeRO-0 bf16 with its FusedAdam, the GPU path) keeps every parameter's
    fp32 master and moments in one flat tensor per group: each parameter's block is read and set at
    its own offset, and setting the master also sets the bf16 parameter."""
    from types import SimpleNamespace

    import torch
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer

    from jigsaw_ext.checkpoint.engine_state import create_moments, fp32_blocks, set_fp32_block, state_fragment

    g = torch.Generator().manual_seed(0)
    params = [
        torch.nn.Parameter(torch.randn(3, 4, generator=g).bfloat16()),
        torch.nn.Parameter(torch.randn(5, generator=g).bfloat16()),
    ]
    wrapper = FP16_Optimizer(torch.optim.AdamW(params, lr=1e-3), low_precision_dtype=torch.bfloat16)
    engine = SimpleNamespace(optimizer=wrapper)
    create_moments(engine)
    flat = wrapper.fp32_groups_flat[0]
    state = wrapper.optimizer.state[flat]
    offset = 0
    for p in params:
        f = state_fragment(engine, p)
        assert f.dp_replicated and (f.start, f.numel) == (0, p.numel())
        assert f.views["param"].data_ptr() == flat[offset:].data_ptr()
        assert f.views["exp_avg"].data_ptr() == state["exp_avg"][offset:].data_ptr()
        blocks = {k: torch.randn(p.shape, generator=g) for k in ("param", "exp_avg", "exp_avg_sq")}
        for kind, block in blocks.items():
            set_fp32_block(engine, p, kind, block)
        got = fp32_blocks(engine, p)
        for kind, block in blocks.items():
            assert torch.equal(got[kind], block), kind
        assert torch.equal(p.detach(), blocks["param"].bfloat16())
        offset += p.numel()
