"""Checkpoints that outlive their layout: block-sharded training state written layout-free by every
rank in parallel and loaded on any mesh, plus the tools on top.

The command line (cli.py, `python -m jigsaw_ext.checkpoint --help`) inspects, verifies, exports and
consolidates them.

Layout-free tags (layout_free.py, sharded.py, engine_state.py): `state/NNNNN/` holds, per parameter,
the fp32 master weights and AdamW moments as megatron-core ShardedTensors with global offsets
(torch.distributed.checkpoint files); every rank wrote the parts it owns (replicas share the
writing) and a rank of any other mesh reads the block ITS layout needs. The DCP metadata pickle is
read through an allowlist; tensors with weights_only=True. What the application keeps beside the
tensors (the description, its config, data position, RNG) is JSON and safetensors. The state comes
from DeepSpeed's public accessors (deepspeed.utils.safe_get/set_full_*), never its file format.

Consolidated format ("jigsaw-consolidated/2"), framework-neutral, JSON and safetensors only:
    OUT/index.json                 format, step, DeepSpeed's keys, source mesh and ZeRO stage,
                                   optimizer step and groups (by parameter name), lr-scheduler state,
                                   engine counters, "app": every key the application wrote into
                                   job.json beyond the ones read here, "trainer_state": rank 0's trainer
                                   state without tensors, and per tensor: shape, dtype, layout, files
    OUT/tensors/<i>.<kind>.safetensors
                                   param (fp32 master weights), exp_avg, exp_avg_sq, full logical
                                   shapes; a loader that needs one block reads only that block
A consolidated directory starts a run on any mesh (`--resume OUT`). It is also how a checkpoint of
the DeepSpeed 0.19 per-rank format (mp_rank_*/zero_pp_rank_* files) is converted: deepspeed_files.py
reads DeepSpeed 0.19's files (ZeRO 0-3, fp32 or bf16), memory-mapped and streaming, with
torch.load(weights_only=True) and the allowlist of jigsaw_ext.safe_load. Format 1 (tensors as torch
pickles) is not read: re-run `consolidate` on the original checkpoint.

Checksums (manifest.py): a tag holds MANIFEST.json (size and sha256 of every file the save wrote), a
consolidated checkpoint's index.json the size and sha256 of each tensor file; every reader here
checks a file before loading it and refuses a mismatch naming the file (and the damaged tensor)
(ChecksumError). A checkpoint written before checksums existed is read with an
UnverifiedCheckpointWarning.
"""

from .cli import main
from .common import (
    FORMAT,
    KINDS,
    app_keys,
    is_consolidated,
    is_layout_free,
    read_index,
    resolve,
)
from .consolidated import Consolidated, consolidate, full_tensors, inspect, load_into_model, verify
from .deepspeed_files import DeepSpeedTag, read_trainer_state
from .errors import CheckpointFormatError, ChecksumError, UnverifiedCheckpointWarning
from .export import export
from .job_info import read_job_info
from .layout_free import load_layout_free, save_layout_free

__all__ = [
    "FORMAT",
    "KINDS",
    "CheckpointFormatError",
    "ChecksumError",
    "Consolidated",
    "DeepSpeedTag",
    "UnverifiedCheckpointWarning",
    "app_keys",
    "consolidate",
    "export",
    "full_tensors",
    "inspect",
    "is_consolidated",
    "is_layout_free",
    "load_into_model",
    "load_layout_free",
    "main",
    "read_index",
    "read_job_info",
    "read_trainer_state",
    "resolve",
    "save_layout_free",
    "verify",
]
