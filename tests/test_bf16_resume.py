"""bf16 training saves and resumes on every ZeRO stage, through train.py: a run resumed from its step-2
checkpoint continues the loss curve of the uninterrupted run exactly.

ZeRO-0 with bf16 goes through DeepSpeed's FP16 optimizer wrapper (fp32 masters beside the bf16
parameters), ZeRO-1/2 through its ZeRO optimizer's fragment mapping, ZeRO-3 through its partitions; stage 3
runs on two data-parallel ranks so its partitions are real halves."""
import pytest

from tests.test_training_runs import STEPS, _losses, _max_rel, _train, small_job

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
    resumed, run = _train(job, tmp_path / "resumed", mesh, *common, f"checkpoint.resume={tag}", nproc=nproc,
                          launcher=launcher)
    assert "resuming from" in run.stdout and "(step 2)" in run.stdout, run.stdout[-2000:]
    assert sorted(resumed) == list(range(3, STEPS + 1))
    assert _max_rel(resumed, {s: straight[s] for s in resumed}) <= 1e-6
    assert _losses(tmp_path / "resumed") == resumed
