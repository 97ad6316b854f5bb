"""Misspelt DeepSpeed keys are errors before any process talks (DeepSpeed itself would ignore a
misspelt top-level key: `zero_optimizaton.stage=1` trained at ZeRO-0 with no word)."""

import json
from pathlib import Path

import pytest

from weathermixer.config import ConfigError
from weathermixer.train.config import load_train_job
from weathermixer.train.job import check_job

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "deepspeed_configs" / "quickstart_cpu.json")
JOB_FILES = sorted((ROOT / "deepspeed_configs").glob("*.json"))


def _check(settings):
    job, ds = load_train_job(CONFIG, None, settings)
    return check_job(job, ds, world=4, cuda=False)


@pytest.mark.parametrize(
    "setting, message",
    [
        ("ds.zero_optimizaton.stage=1", r"zero_optimizaton: unknown DeepSpeed key .*did you mean zero_optimization\?"),
        ("ds.gradient_cliping=1.0", r"gradient_cliping: unknown DeepSpeed key .*did you mean gradient_clipping"),
        ("ds.zero_optimization.stagee=1", r"zero_optimization.stagee: unknown DeepSpeed key; did you mean stage\?"),
        (
            'ds.zero_optimization.offload_optimizer={"devce": "cpu"}',
            r"zero_optimization.offload_optimizer.devce: unknown DeepSpeed key; did you mean device\?",
        ),
        ("ds.bf16.enable=true", r"bf16.enable: unknown DeepSpeed key; did you mean enabled\?"),
        (
            'ds.tensorboard={"enabled": false, "ouput_path": "x"}',
            r"tensorboard.ouput_path: .*did you mean output_path\?",
        ),
        ("ds.optimizer.parms={}", r"optimizer.parms: unknown DeepSpeed key; did you mean params\?"),
        ("ds.flops_profiler.enabeld=true", r"flops_profiler.enabeld: .*did you mean enabled\?"),
        ("ds.elasticity={}", r"elasticity: Elastic training has been removed"),
        (
            'ds.data_types.grad_accum_dtypee="fp32"',
            r"data_types.grad_accum_dtypee: unknown DeepSpeed key .*did you mean grad_accum_dtype",
        ),
        (
            'ds.checkpoint.tag_validaton="Warn"',
            r"checkpoint.tag_validaton: unknown DeepSpeed key .*did you mean tag_valid",
        ),
        ('ds.torch_autocast={"enabled": false, "dtyp": "bf16"}', r"torch_autocast.dtyp: .*did you mean dtype\?"),
        ("ds.optimizer.params.betass=[0.9,0.9]", r"optimizer.params.betass: not an argument .*did you mean betas\?"),
        ("ds.optimizer.params.weight_decayy=0.1", r"optimizer.params.weight_decayy: .*did you mean weight_decay\b"),
        ('ds.gradient_clipping="abc"', r"gradient_clipping: 'abc'; a number >= 0"),
        (
            "ds.optimizer.params.betas=[0.9,1.5]",
            r"optimizer.params: ValueError: Invalid beta parameter at index 1: 1.5",
        ),
    ],
)
def test_misspelt_keys_rejected_with_the_nearest_name(setting, message):
    with pytest.raises(ConfigError, match=message):
        _check([setting])


def test_all_unknown_keys_reported_at_once_and_no_near_name_lists_the_allowed():
    from weathermixer.train.deepspeed_keys import deepspeed_key_errors

    errors = deepspeed_key_errors(
        {"zero_optimization": {"stage": 1, "stagee": 2}, "xyzzy": 1, "tensorboard": {"qqq": 1}}
    )
    assert len(errors) == 3
    assert any("xyzzy: unknown DeepSpeed key" in e and "allowed keys here: " in e for e in errors)
    assert any(
        "tensorboard.qqq: unknown DeepSpeed key; allowed keys here: enabled, job_name, output_path" in e for e in errors
    )


def test_keys_the_trainer_adds_pass(tmp_path):
    from weathermixer.train.deepspeed_keys import check_deepspeed_keys

    out = _check(
        [
            "log.tensorboard=true",
            f"log.dir={tmp_path}",
            'ds.csv_monitor={"enabled": true}',
            'ds.wandb={"enabled": false}',
            "ds.zero_optimization.stage=1",
            "ds.bf16.enabled=true",
        ]
    )
    assert {"steps_per_print", "train_batch_size", "tensorboard", "csv_monitor"} <= set(out)
    assert out["optimizer"]["params"]["torch_adam"] and "lr" in out["optimizer"]["params"]
    check_deepspeed_keys(out)  # the completed config (what reshard stores and re-checks) passes too


@pytest.mark.parametrize("path", JOB_FILES, ids=lambda p: p.name)
def test_every_shipped_job_file_passes(path):
    from weathermixer.train.deepspeed_keys import deepspeed_key_errors, top_level_keys

    ds = json.loads(path.read_text())
    assert set(ds) <= top_level_keys(), set(ds) - top_level_keys()
    assert deepspeed_key_errors(ds) == []


def test_top_level_keys_derived_from_deepspeed_and_the_explicit_list_is_needed():
    from weathermixer.train.deepspeed_keys import EXTRA_TOP_LEVEL, recorded_top_level_keys, top_level_keys

    rec = recorded_top_level_keys()
    # read in different ways by DeepSpeed's reader: get(), [], `in`, `in d.keys()`
    assert {
        "train_batch_size",
        "zero_optimization",
        "fp16",
        "bf16",
        "gradient_clipping",
        "steps_per_print",
        "optimizer",
        "scheduler",
        "flops_profiler",
        "activation_checkpointing",
        "tensorboard",
    } <= rec
    assert not set(EXTRA_TOP_LEVEL) & rec  # the explicit list holds only keys the recording cannot see
    assert "zero_optimizaton" not in top_level_keys() and "stage" not in top_level_keys()


def test_sections_read_key_by_key_are_recorded_from_deepspeed():
    """The sections DeepSpeed's reader looks into key by key, and their keys, come from running it."""
    from weathermixer.train.deepspeed_keys import adam_param_keys, recorded_sections

    rec = recorded_sections()
    assert {"data_types", "checkpoint", "aio", "torch_autocast"} <= set(rec)
    assert {"grad_accum_dtype", "param_dtype"} <= rec["data_types"] and "tag_validation" in rec["checkpoint"]
    assert {"betas", "eps", "weight_decay", "torch_adam", "amsgrad", "bias_correction"} <= adam_param_keys()
