"""Checkpoints that outlive their layout: read a DeepSpeed checkpoint of a DP x DOMAIN x TP run as
full logical tensors, write it layout-free, and load it on any mesh.

    python -m jigsaw_ext.checkpoint inspect CKPT
    python -m jigsaw_ext.checkpoint inspect --verify CKPT      every file against its checksum; exit 1 naming the bad ones
    python -m jigsaw_ext.checkpoint consolidate CKPT OUT
    python -m jigsaw_ext.checkpoint reshard CKPT --dp A --domain B --tp C [--zero-stage S] OUT

CKPT is a checkpoint tag directory written by the trainer (`<run>/checkpoints/step00000100`), a
checkpoint root (its `latest` pointer is followed) or a consolidated directory.

Consolidated format ("jigsaw-consolidated/2"), framework-neutral and safe to share (nothing in it
is a pickle: JSON and safetensors only):
    OUT/index.json                 format, step, DeepSpeed's keys, source mesh and ZeRO stage,
                                   optimizer step and groups (by parameter name), lr-scheduler state,
                                   engine counters, "app": every key the application wrote into
                                   job.json beyond the ones read here (its job configuration,
                                   statistics, provenance), "trainer_state": rank 0's trainer state
                                   without tensors, and per tensor: shape, dtype, layout, files
    OUT/tensors/<i>.<kind>.safetensors
                                   one safetensors file per tensor and kind (its one entry is named
                                   after the kind): param (fp32 master weights), exp_avg, exp_avg_sq
                                   (AdamW moments), full logical shapes; a loader that needs one block
                                   reads only that block (safe_open(...).get_slice)

Checksums (manifest.py): a DeepSpeed tag holds MANIFEST.json (size and sha256 of every file the save
wrote), a consolidated checkpoint's index.json the size and sha256 of each tensor file; every reader
here checks a file before loading it and refuses a mismatch naming the file (ChecksumError). A
checkpoint written before checksums existed is read with an UnverifiedCheckpointWarning.

Reading is streaming: every DeepSpeed file is memory-mapped and each logical tensor is assembled
from the byte ranges that hold it, written, and freed, so peak memory stays near the largest tensor.
The reader knows DeepSpeed 0.19's files for ZeRO 0 (fp32), 1, 2 and 3 (fp32 or bf16 training; the
fp32 master weights are what is read). The source checkpoint is only ever opened for reading. DeepSpeed's files are read with
torch.load(weights_only=True) and the allowlist of jigsaw_ext.safe_load: a shard holding anything
else (code) is refused, naming the file. Format 1 (tensors as torch pickles) is not read: re-run
`consolidate` on the original DeepSpeed checkpoint.
"""
from .common import (FORMAT, KINDS, CheckpointFormatError, app_keys, is_consolidated, read_index, read_job_info,
                     resolve)
from .consolidated import Consolidated, consolidate, full_tensors, inspect, load_into_model, verify
from .deepspeed_files import DeepSpeedTag, read_trainer_state
from .manifest import ChecksumError, UnverifiedCheckpointWarning
from .cli import main

__all__ = ["FORMAT", "KINDS", "CheckpointFormatError", "ChecksumError", "Consolidated", "DeepSpeedTag",
           "UnverifiedCheckpointWarning", "app_keys", "consolidate", "full_tensors", "inspect", "is_consolidated",
           "load_into_model", "main", "read_index", "read_job_info", "read_trainer_state", "resolve", "verify"]
