"""DeepSpeed's checkpoint engine wrapped so that its loads are checked and safe.

install_safe_checkpoint_engine(engine)      DeepSpeed's load_checkpoint reads through it: each
                                            file is checked against its tag's MANIFEST.json first
                                            (manifest.py), then read with jigsaw_ext.safe_load's
                                            allowlist; inside defer_save_errors() ..
                                            take_save_errors() a failed write is recorded instead
                                            of raised, so every rank finishes DeepSpeed's collectives
"""

from __future__ import annotations

from ..safe_load import UnsafeCheckpointError, safe_torch_load, save_error
from .errors import CheckpointFormatError
from .manifest import verify_file


def _load_checked(path: str, map_location=None):
    """A DeepSpeed shard for DeepSpeed's loader: checked against its manifest, then read safely."""
    verify_file(path)
    try:
        return safe_torch_load(path, map_location=map_location)
    except (UnsafeCheckpointError, CheckpointFormatError):
        raise
    except Exception as err:  # noqa: BLE001 - torch raises several types for damaged files
        raise CheckpointFormatError(f"{path}: unreadable ({type(err).__name__}: {err}); corrupt or truncated") from None


class _SafeEngine:
    """DeepSpeed's configured engine; loads check the manifest, then read with weights_only.
    Between defer_save_errors() and take_save_errors() a failed write is recorded, not raised
    (others would wait in DeepSpeed's collectives) and this rank writes nothing more."""

    def __init__(self, inner):
        self.inner = inner
        self.name = f"Safe({getattr(inner, 'name', type(inner).__name__)})"
        self.save_errors: list[dict] = []
        self.deferring = False

    def load(self, path: str, map_location=None):
        return _load_checked(path, map_location=map_location)

    def create(self, info):
        return self.inner.create(info)

    def defer_save_errors(self) -> None:
        self.save_errors, self.deferring = [], True

    def take_save_errors(self) -> list[dict]:
        errors, self.save_errors, self.deferring = self.save_errors, [], False
        return errors

    def record_save_error(self, path, err: BaseException) -> None:
        """Inside the window: remember the failure; outside it: raise it."""
        if not self.deferring:
            raise err
        self.save_errors.append(save_error(path, err))

    def save(self, state_dict, path: str):
        if self.save_errors:  # this checkpoint already failed on this rank
            return None
        try:
            return self.inner.save(state_dict, path)
        except Exception as err:  # noqa: BLE001 - torch reports a full disk as RuntimeError
            self.record_save_error(path, err)
            return None

    def commit(self, info):
        return self.inner.commit(info)

    def makedirs(self, path, exist_ok=False):
        try:
            return self.inner.makedirs(path, exist_ok=exist_ok)
        except OSError as err:
            self.record_save_error(path, err)
            return None

    def is_data_parallel_writer(self, dp_rank):
        return self.inner.is_data_parallel_writer(dp_rank)

    def is_decoupled(self):
        return self.inner.is_decoupled()

    def set_commit_info(self, info):
        return self.inner.set_commit_info(info)

    def get_commit_info(self):
        return self.inner.get_commit_info()

    def cleanup(self):
        return self.inner.cleanup()

    def preserves_storage_sharing(self):
        return self.inner.preserves_storage_sharing()

    def __getattr__(self, name):  # anything else an engine subclass offers
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


_ENGINE_CLASS = None


def _safe_engine_class():
    """SafeCheckpointEngine: a DeepSpeed CheckpointEngine (imported only once a job installs it) whose
    methods are _SafeEngine's."""
    global _ENGINE_CLASS
    if _ENGINE_CLASS is None:
        from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

        _ENGINE_CLASS = type(
            "SafeCheckpointEngine",
            (_SafeEngine, CheckpointEngine),
            {"__doc__": _SafeEngine.__doc__, "__module__": __name__},
        )
    return _ENGINE_CLASS


def install_safe_checkpoint_engine(engine) -> None:
    """Make engine.load_checkpoint read DeepSpeed's files with weights_only=True and the allowlist
    (DeepSpeed's own engine unpickles them with weights_only=False). Call it right after
    deepspeed.initialize; saving is unchanged. Universal checkpoints are refused: DeepSpeed reads
    them with torch.load(weights_only=False) outside the checkpoint engine."""
    cls = _safe_engine_class()
    if engine.load_universal_checkpoint():
        raise ValueError(
            "checkpoint.load_universal: DeepSpeed reads universal checkpoints by unpickling them "
            "(weights_only=False), which can run code; convert them with `python -m "
            "jigsaw_ext.checkpoint` instead"
        )
    if not isinstance(engine.checkpoint_engine, cls):
        engine.checkpoint_engine = cls(engine.checkpoint_engine)
    copy = getattr(engine, "_copy_recovery_script", None)  # rank 0 copies zero_to_fp32.py beside the tags
    if copy is not None and not getattr(copy, "records_errors", False):

        def copy_recovery_script(save_path, _copy=copy):
            try:
                _copy(save_path)
            except OSError as err:
                engine.checkpoint_engine.record_save_error(save_path, err)

        copy_recovery_script.__dict__["records_errors"] = True
        engine._copy_recovery_script = copy_recovery_script
