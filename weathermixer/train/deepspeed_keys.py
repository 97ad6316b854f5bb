"""The keys DeepSpeed reads from its config, so that a misspelt key is an error before any process
talks instead of a setting DeepSpeed silently ignores (`zero_optimizaton.stage=1` would train at ZeRO-0).

    check_deepspeed_keys(ds)    # ConfigError naming each unknown key and the nearest allowed names

Where the knowledge comes from (DeepSpeed 0.19.8; nothing here is a copy that could go stale unnoticed):
  * top-level keys: recorded by running DeepSpeed's own reader (DeepSpeedConfig._initialize_params and
    its batch/sanity checks) on a dict that notes every key asked for, plus EXTRA_TOP_LEVEL (keys read
    elsewhere: deepspeed.initialize, this project's own section);
  * sections with a pydantic model (DeepSpeedConfigModel, extra="forbid": zero_optimization and its
    offload_* / zenflow sub-sections, fp16, bf16, the monitors, compile, comms_logger, hybrid_engine,
    tensor_parallel, timers.throughput): the model's field names and aliases, nested models recursed;
  * sections read through constants (flops_profiler, activation_checkpointing, optimizer, scheduler):
    the module's string constants of that section;
  * every other section DeepSpeedConfig's reader looks into key by key (data_types, checkpoint, aio,
    autotuning, data_efficiency with its nested sections, torch_autocast, ...): recorded by running the
    reader with that section as a recording dict, once empty (the keys it always asks for) and once
    with the job's own values (keys asked only when another is set; nested sections). A section the
    reader takes whole (iterates, copies) is DeepSpeed's to check;
  * optimizer.params: the constructor arguments of the optimizers DeepSpeed builds for Adam/AdamW
    (torch.optim.AdamW/Adam, FusedAdam, DeepSpeedCPUAdam) and the keys DeepSpeed takes out before.
Removed features DeepSpeed itself rejects (elasticity, amp, ...) are reported with DeepSpeed's message.
Values that DeepSpeed would only reject after the engine is built are checked here too
(deepspeed_value_errors: gradient_clipping, the optimizer's arguments through torch's own checks);
the rest is checked by DeepSpeed's models in deepspeed.initialize.
"""

from __future__ import annotations

import difflib
import functools
import typing

from ..config import ConfigError

# top-level keys read outside DeepSpeedConfig's reader (cannot be recorded by running it)
EXTRA_TOP_LEVEL = {
    "sequence_parallel_size": "deepspeed.initialize / DeepSpeedConfig.__init__ (mesh of a sequence-parallel run)",
    "data_parallel_size": "deepspeed.initialize (mesh of a sequence-parallel run)",
    "weathermixer": "this project's section (taken out before DeepSpeed sees the config)",
}


class _Recorder(dict):
    """A dict that notes every key looked up (get, [], in, `in d.keys()`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.asked: set[str] = set()
        self.opened = False  # iterated or copied: every key may be read

    def get(self, key, *default):
        self.asked.add(key)
        return super().get(key, *default)

    def __getitem__(self, key):
        self.asked.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.asked.add(key)
        return super().__contains__(key)

    def items(self):
        self.opened = True
        return super().items()

    def values(self):
        self.opened = True
        return super().values()

    def __iter__(self):
        self.opened = True
        return super().__iter__()

    def copy(self):
        self.opened = True
        return dict(self)

    def keys(self):
        outer = self

        class _Keys(set):
            def __contains__(self, key):
                outer.asked.add(key)
                return super().__contains__(key)

        return _Keys(super().keys())


@functools.cache
def recorded_top_level_keys() -> frozenset[str]:
    """The top-level keys DeepSpeedConfig's reader looks up, recorded by running it on a minimal config."""
    from deepspeed.runtime.config import DeepSpeedConfig

    rec = _Recorder(train_micro_batch_size_per_gpu=1)
    cfg = object.__new__(DeepSpeedConfig)  # no __init__: it would ask the process group for the world
    cfg._param_dict, cfg.world_size, cfg.global_rank = rec, 1, 0
    cfg._initialize_params(rec)
    cfg._configure_train_batch_size()
    cfg._do_sanity_check()
    return frozenset(k for k in rec.asked if isinstance(k, str))


def _run_reader(section: str, value) -> bool:
    """Run DeepSpeedConfig's reader on {section: value} (recording dicts note what it asks); False if
    it raised (a value it rejects)."""
    from deepspeed.runtime.config import DeepSpeedConfig

    rec = _Recorder({"train_micro_batch_size_per_gpu": 1, section: value})
    cfg = object.__new__(DeepSpeedConfig)
    cfg._param_dict, cfg.world_size, cfg.global_rank = rec, 1, 0
    try:
        cfg._initialize_params(rec)
        cfg._configure_train_batch_size()
        cfg._do_sanity_check()
    except Exception:  # noqa: BLE001 - DeepSpeed reports its own value errors at initialize
        return False
    return True


@functools.cache
def recorded_sections() -> dict[str, frozenset[str]]:
    """Top-level sections (without a pydantic model) that DeepSpeedConfig's reader looks into key by
    key -> the keys it asks for when the section is empty."""
    out = {}
    for key in sorted(recorded_top_level_keys() - set(section_schemas())):
        probe = _Recorder()
        if _run_reader(key, probe) and probe.asked and not probe.opened:
            out[key] = frozenset(k for k in probe.asked if isinstance(k, str))
    return out


def _wrap(value):
    return _Recorder({k: _wrap(v) for k, v in value.items()}) if isinstance(value, dict) else value


def _recorded_walk(node: dict, rec, always: frozenset, path: str, errors: list[str]) -> None:
    """Unknown keys of a recorded section: keys the reader did not ask for (with the job's values) and
    does not always ask for; nested dicts the reader looked into are walked the same way."""
    if rec is not None and rec.opened:
        return
    allowed = always | (rec.asked if rec is not None else frozenset())
    if not allowed:
        return  # not looked into key by key
    for key, value in node.items():
        where = f"{path}.{key}"
        if key not in allowed:
            errors.append(
                f"  {where}: unknown DeepSpeed key (DeepSpeed would ignore it); {_nearest(str(key), allowed)}"
            )
        elif isinstance(value, dict) and isinstance(rec, _Recorder):
            _recorded_walk(value, rec.get(key), frozenset(), where, errors)


def _recorded_section_errors(ds: dict, errors: list[str]) -> None:
    for key, always in recorded_sections().items():
        node = ds.get(key)
        if isinstance(node, dict):
            rec = _wrap(node)
            _recorded_walk(node, rec if _run_reader(key, rec) else None, always, key, errors)


def _constant_keys(module, prefix: str, section: str) -> frozenset[str]:
    """String constants NAME = "key" of a DeepSpeed constants module whose NAME starts with prefix."""
    return frozenset(
        v
        for k, v in vars(module).items()
        if k.startswith(prefix) and isinstance(v, str) and not k.endswith(("_DEFAULT", "_FORMAT")) and v != section
    )


@functools.cache
def section_schemas() -> dict[str, object]:
    """Dotted section path -> a DeepSpeedConfigModel class or a frozenset of allowed keys."""
    from deepspeed.comm.config import CommsLoggerConfig
    from deepspeed.compile.config import CompileConfig
    from deepspeed.monitor.config import DeepSpeedMonitorConfig
    from deepspeed.profiling import constants as prof
    from deepspeed.runtime import constants as rt
    from deepspeed.runtime import precision_config as prec
    from deepspeed.runtime.activation_checkpointing import config as act
    from deepspeed.runtime.config import HybridEngineConfig
    from deepspeed.runtime.tensor_parallel.config import TPTrainingConfig
    from deepspeed.runtime.zero import config as zero
    from deepspeed.utils import config as timers

    out: dict[str, object] = {
        zero.ZERO_OPTIMIZATION: zero.DeepSpeedZeroConfig,
        prec.FP16: prec.DeepSpeedFP16Config,
        prec.BFLOAT16: prec.DeepSpeedBF16Config,
        prec.BFLOAT16_OLD: prec.DeepSpeedBF16Config,
        "compile": CompileConfig,
        "comms_logger": CommsLoggerConfig,
        "hybrid_engine": HybridEngineConfig,
        "tensor_parallel": TPTrainingConfig,
        timers.TIMERS: frozenset({timers.TIMERS_THROUGHPUT}),
        f"{timers.TIMERS}.{timers.TIMERS_THROUGHPUT}": timers.DeepSpeedThroughputTimerConfig,
        prof.FLOPS_PROFILER: _constant_keys(prof, "FLOPS_PROFILER_", prof.FLOPS_PROFILER),
        act.ACT_CHKPT: _constant_keys(act, "ACT_CHKPT_", act.ACT_CHKPT),
        rt.OPTIMIZER: frozenset({rt.TYPE, rt.OPTIMIZER_PARAMS, rt.LEGACY_FUSION}),
        rt.SCHEDULER: frozenset({rt.TYPE, rt.SCHEDULER_PARAMS}),
    }
    for name, field in DeepSpeedMonitorConfig.model_fields.items():  # tensorboard, wandb, csv_monitor, comet
        out[name] = field.annotation
    return out


def top_level_keys() -> frozenset[str]:
    return (
        recorded_top_level_keys() | frozenset(EXTRA_TOP_LEVEL) | frozenset(p.split(".")[0] for p in section_schemas())
    )


def _model_keys(model) -> dict[str, object]:
    """Accepted key -> the nested model class of that field (or None) of a pydantic model."""
    from pydantic import BaseModel

    out = {}
    for name, field in model.model_fields.items():
        ann = field.annotation
        args = typing.get_args(ann) or (ann,)  # Optional[X] -> (X, NoneType)
        sub = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), None)
        for key in (name, field.alias, field.validation_alias):
            if isinstance(key, str):
                out[key] = sub
    return out


def _nearest(key: str, allowed) -> str:
    near = difflib.get_close_matches(key, sorted(allowed), n=3, cutoff=0.6)
    if near:
        return "did you mean " + " or ".join(near) + "?"
    return f"allowed keys here: {', '.join(sorted(allowed))}"


def _walk(node: dict, schema, path: str, errors: list[str]) -> None:
    if isinstance(schema, frozenset):
        allowed, subs = schema, {}
    else:
        if schema.model_config.get("extra") != "forbid":
            return  # DeepSpeed accepts any key here
        subs = _model_keys(schema)
        allowed = frozenset(subs)
    for key, value in node.items():
        where = f"{path}.{key}"
        if key not in allowed:
            errors.append(f"  {where}: unknown DeepSpeed key; {_nearest(str(key), allowed)}")
        elif subs.get(key) is not None and isinstance(value, dict):
            _walk(value, subs[key], where, errors)


def deepspeed_key_errors(ds: dict) -> list[str]:
    """One line per unknown (or removed) key of the DeepSpeed part of a job file."""
    from deepspeed.runtime.config import _REMOVED_TOP_LEVEL_CONFIG_KEYS, _REMOVED_ZERO_CONFIG_KEYS

    errors: list[str] = []
    top = top_level_keys()
    for key in ds:
        if key in _REMOVED_TOP_LEVEL_CONFIG_KEYS:
            errors.append(f"  {key}: {_REMOVED_TOP_LEVEL_CONFIG_KEYS[key]}")
        elif key not in top:
            errors.append(f"  {key}: unknown DeepSpeed key (DeepSpeed would ignore it); {_nearest(str(key), top)}")
    zero = ds.get("zero_optimization")
    for key in zero if isinstance(zero, dict) else {}:
        if key in _REMOVED_ZERO_CONFIG_KEYS:
            errors.append(f"  zero_optimization.{key}: {_REMOVED_ZERO_CONFIG_KEYS[key]}")
    for path, schema in section_schemas().items():
        node = ds
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            _walk(
                {k: v for k, v in node.items() if not (path == "zero_optimization" and k in _REMOVED_ZERO_CONFIG_KEYS)},
                schema,
                path,
                errors,
            )
    _recorded_section_errors(ds, errors)
    errors += optimizer_param_errors(ds)
    return errors


# what DeepSpeed's _configure_basic_optimizer / get_optimizer_configuration take out of optimizer.params
# before handing the rest to the Adam class it builds
DEEPSPEED_ADAM_KEYS = frozenset({"adam_w_mode", "torch_adam", "fp32_optimizer_states", "foreach"})


@functools.cache
def adam_param_keys() -> frozenset[str]:
    """optimizer.params keys accepted for Adam/AdamW: the constructor arguments of every class DeepSpeed
    may build for them, and the keys DeepSpeed takes out itself."""
    import inspect

    import torch
    from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam

    keys = set(DEEPSPEED_ADAM_KEYS)
    for cls in (torch.optim.AdamW, torch.optim.Adam, FusedAdam, DeepSpeedCPUAdam):
        keys |= {
            n
            for n, p in inspect.signature(cls.__init__).parameters.items()
            if n not in ("self", "params", "model_params") and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        }
    return frozenset(keys)


def optimizer_param_errors(ds: dict) -> list[str]:
    """Unknown optimizer.params keys of Adam/AdamW (DeepSpeed would fail on them after the engine is
    built, or pass them to the optimizer that ignores none of them)."""
    opt = ds.get("optimizer")
    if not isinstance(opt, dict) or str(opt.get("type", "AdamW")).lower() not in ("adam", "adamw"):
        return []
    params = opt.get("params")
    allowed = adam_param_keys()
    return [
        f"  optimizer.params.{k}: not an argument of DeepSpeed's {opt.get('type', 'AdamW')} optimizer; "
        f"{_nearest(str(k), allowed)}"
        for k in (params if isinstance(params, dict) else {})
        if k not in allowed
    ]


def deepspeed_value_errors(ds: dict) -> list[str]:
    """Values DeepSpeed would reject only after the engine is built: gradient_clipping (a number >= 0)
    and Adam's arguments (torch's own constructor checks, on a one-element parameter)."""
    import inspect

    import torch

    errors = []
    clip = ds.get("gradient_clipping")
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip < 0):
        errors.append(f"  gradient_clipping: {clip!r}; a number >= 0 (0: no clipping)")
    opt = ds.get("optimizer")
    params = opt.get("params") if isinstance(opt, dict) else None
    if isinstance(params, dict) and not optimizer_param_errors(ds):
        cls = torch.optim.Adam if str(opt.get("type", "AdamW")).lower() == "adam" else torch.optim.AdamW
        kwargs = {
            k: v
            for k, v in params.items()
            if k not in DEEPSPEED_ADAM_KEYS and k in inspect.signature(cls.__init__).parameters and k != "fused"
        }
        try:
            cls([torch.zeros(1, requires_grad=True)], **kwargs)
        except (TypeError, ValueError, RuntimeError) as err:
            names = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
            errors.append(f"  optimizer.params: {type(err).__name__}: {err} (torch.optim.{cls.__name__} with {names})")
    return errors


def check_deepspeed_keys(ds: dict, source: str = "the job file's DeepSpeed keys and --set ds.*") -> None:
    """ConfigError listing every unknown key of `ds` (every section DeepSpeed reads), else every value
    DeepSpeed would reject only after the engine is built."""
    errors = deepspeed_key_errors(ds)
    errors = errors or deepspeed_value_errors(ds)
    if errors:
        raise ConfigError(f"invalid DeepSpeed configuration ({source}):\n" + "\n".join(errors))
