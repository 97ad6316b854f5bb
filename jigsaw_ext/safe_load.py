"""Loading checkpoint files without running code.

A torch pickle can call any importable function while it is read (`os.system`, ...). Every file this
project reads is therefore either data only (JSON, safetensors) or a torch file read with
`torch.load(..., weights_only=True)` and the explicit allowlist below, the one place that lists the
classes a checkpoint may contain besides tensors and plain containers:

    DEEPSPEED_GLOBALS   what DeepSpeed 0.19 writes into its shards (checked by saving and loading
                        ZeRO 0/1/2/3 in fp32 and bf16): the loss scaler of the ZeRO and bf16
                        optimizers (LossScaler; DynamicLossScaler with fp16 on GPU), the ZeRO stage
                        enum and the fragment addresses of ZeRO-1/2's optimizer state
    NUMPY_GLOBALS       a numpy array (numpy's RNG state), only for trainer-state files written
                        by torch.save before the JSON format (read-only compatibility)

A refused file raises UnsafeCheckpointError naming the file and the object it would have created.

    safe_torch_load(path, mmap=True)            a DeepSpeed shard
    save_state(base, obj) / load_state(base)    JSON + safetensors for small nested state (dicts,
                                                lists, tuples, numbers, strings, numpy arrays,
                                                torch tensors): base.json and base.safetensors

DeepSpeed's own loads go through the same allowlist once jigsaw_ext.checkpoint.deepspeed_engine's
`install_safe_checkpoint_engine(engine)` wraps its checkpoint engine.
"""

from __future__ import annotations

import errno
import importlib
import json
import os
import pickle
import re
import zipfile
from pathlib import Path

import torch

from .files import atomic_write_text, replace_synced

STATE_FORMAT = "jigsaw-state/1"


class UnsafeCheckpointError(ValueError):
    """A file that would create objects outside the allowlist (code) if it were unpickled."""


def deepspeed_globals() -> list:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def numpy_globals() -> list:
    import numpy as np

    try:
        multiarray = importlib.import_module("numpy._core.multiarray")
    except ImportError:  # numpy < 2
        multiarray = importlib.import_module("numpy.core.multiarray")
    _reconstruct = multiarray._reconstruct
    return [np.ndarray, np.dtype, _reconstruct, *{type(np.dtype(t)) for t in (np.uint32, np.float64, np.int64)}]


def _refused(path, err: Exception) -> UnsafeCheckpointError:
    text = str(err)
    what = re.search(
        r"(Trying to load unsupported GLOBAL [^\n]*|Unsupported global: [^\n]*|"
        r"WeightsUnpickler error: [^\n]*)",
        text,
    )
    detail = what.group(1).strip() if what else text.splitlines()[0]
    return UnsafeCheckpointError(
        f"{path}: refused: it contains code or objects outside the allowlist of tensors, plain containers and "
        f"the DeepSpeed classes in jigsaw_ext.safe_load ({detail}); it was not loaded and nothing in it ran"
    )


def safe_torch_load(path, map_location="cpu", mmap: bool = False, numpy: bool = False):
    """torch.load with weights_only=True and the allowlist; mmap only for zip-format files."""
    path = Path(path)
    allow = deepspeed_globals() + (numpy_globals() if numpy else [])
    mmap = mmap and zipfile.is_zipfile(path)
    try:
        with torch.serialization.safe_globals(allow):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower() or "weightsunpickler" in str(err).lower():
            raise _refused(path, err) from None
        raise


# ------------------------------------------------------------------------------------------------
# small nested state as JSON (+ safetensors for tensors)
def _encode(x, tensors: dict, where: str):
    import numpy as np

    if x is None or isinstance(x, (bool, str)):
        return x
    if isinstance(x, (int, float)):
        return x
    if isinstance(x, np.generic):
        return x.item()
    if torch.is_tensor(x):
        key = f"t{len(tensors)}"
        tensors[key] = x.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(x, np.ndarray):
        return {"__ndarray__": x.tolist(), "dtype": str(x.dtype), "shape": list(x.shape)}
    if isinstance(x, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(x)]}
    if isinstance(x, list):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(x)]
    if isinstance(x, dict):
        if not all(isinstance(k, str) for k in x):
            raise TypeError(f"{where}: only string keys can be saved, got {[k for k in x][:5]}")
        if set(x) & {"__tensor__", "__tuple__", "__ndarray__"}:
            raise TypeError(f"{where}: the keys __tensor__, __tuple__, __ndarray__ are reserved by the state format")
        return {k: _encode(v, tensors, f"{where}.{k}") for k, v in x.items()}
    raise TypeError(
        f"{where}: cannot save {type(x).__name__} as data (allowed: dict, list, tuple, numbers, "
        f"strings, None, numpy arrays, torch tensors)"
    )


def _decode(x, tensors, path):
    import numpy as np

    if isinstance(x, list):
        return [_decode(v, tensors, path) for v in x]
    if not isinstance(x, dict):
        return x
    if set(x) == {"__tensor__"}:
        try:
            return tensors[x["__tensor__"]]
        except KeyError:
            raise UnsafeCheckpointError(
                f"{path}: names tensor {x['__tensor__']!r}, which its .safetensors file does not hold"
            ) from None
    if set(x) == {"__tuple__"}:
        return tuple(_decode(v, tensors, path) for v in x["__tuple__"])
    if set(x) == {"__ndarray__", "dtype", "shape"}:
        return np.asarray(x["__ndarray__"], dtype=np.dtype(x["dtype"])).reshape(x["shape"])
    return {k: _decode(v, tensors, path) for k, v in x.items()}


def save_state(base: str | Path, obj) -> Path:
    """Write base.safetensors (tensors, if any) and then base.json (the rest, and the tensors' keys)."""
    from safetensors.torch import save_file

    base = Path(base)
    tensors: dict = {}
    tree = _encode(obj, tensors, base.name)
    st = base.with_name(base.name + ".safetensors")
    if tensors:
        tmp = st.with_name(st.name + ".tmp")
        save_file(tensors, str(tmp))
        replace_synced(tmp, st)
    return atomic_write_text(
        base.with_name(base.name + ".json"),
        json.dumps({"format": STATE_FORMAT, "tensors": bool(tensors), "state": tree}),
    )


def state_exists(base: str | Path) -> bool:
    base = Path(base)
    return base.with_name(base.name + ".json").is_file()


def load_state(base: str | Path):
    """The object save_state wrote. ValueError naming the file if it is missing or damaged."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    base = Path(base)
    path = base.with_name(base.name + ".json")
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a JSON state file ({type(err).__name__}: {err})") from None
    if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT:
        raise ValueError(f"{path}: not a {STATE_FORMAT} state file")
    tensors = {}
    if doc.get("tensors"):
        st = base.with_name(base.name + ".safetensors")
        try:
            tensors = load_file(str(st))
        except FileNotFoundError:
            raise FileNotFoundError(f"{st}: missing (its tensors are named by {path.name})") from None
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{st}: not a readable safetensors file ({err})") from None
    return _decode(doc["state"], tensors, path)


# ------------------------------------------------------------------------------------------------
def no_space_left(err: BaseException, path) -> bool:
    """Did writing `path` fail because its file system is full? torch.save reports a full disk as a
    RuntimeError without errno ('unexpected pos ...'), so the free space is looked at as well
    (right after the failure, before the partial file is removed)."""
    if getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(err):
        return True
    d = Path(path)
    while not d.exists() and d != d.parent:
        d = d.parent
    try:
        st = os.statvfs(d)
    except OSError:
        return False
    free = (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize
    return free < (16 << 20) or (st.f_files > 0 and st.f_favail == 0)


def write_failure(err: BaseException) -> str:
    """`err` as one line that names the errno: torch.save reports a failed write as a RuntimeError
    without one ("unexpected pos 704 vs 598", "basic_ios::clear: iostream error"), so the cause is
    looked for in the exception chain and in this process's file size limit (EFBIG)."""
    import resource

    text = f"{type(err).__name__}: {err}".splitlines()[0] if str(err) else type(err).__name__
    e: BaseException | None = err
    while e is not None:
        code = getattr(e, "errno", None)
        if isinstance(code, int) and code in errno.errorcode:
            return (
                text
                if errno.errorcode[code] in text or f"[Errno {code}]" in text
                else f"{text} ({errno.errorcode[code]}: {os.strerror(code)})"
            )
        e = e.__cause__ or e.__context__
    if isinstance(err, OSError) or not isinstance(err, RuntimeError):
        return text
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if soft != resource.RLIM_INFINITY:
        return (
            f"{text} (EFBIG: {os.strerror(errno.EFBIG)}: this process may write files of at most {soft} bytes, "
            f"ulimit -f)"
        )
    return (
        f"{text} (torch names no errno: a write failed: a full disk (ENOSPC), a quota (EDQUOT) or a file size "
        f"limit (EFBIG))"
    )


def save_error(path, err: BaseException) -> dict:
    """What a rank tells the others about a failed checkpoint write."""
    return {"path": str(path), "error": write_failure(err), "no_space": no_space_left(err, path)}
