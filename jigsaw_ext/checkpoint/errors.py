"""The exceptions of the checkpoint package: a leaf every other checkpoint module imports."""

from __future__ import annotations


class CheckpointFormatError(ValueError):
    """A checkpoint that cannot be read as asked: names the file or tensor."""


class RankFailure(CheckpointFormatError):
    """Raised on every rank when a rank failed outside DCP during a collective save or load (DCP
    reports its own failures to every rank; anything else would leave the other ranks waiting in the
    next collective). `failures`: {rank: exception}, as in DCP's CheckpointException, so
    sharded.failing_rank names the lowest failing rank."""

    def __init__(self, what: str, failures: dict):
        self.failures = failures
        r = min(failures)
        super().__init__(f"{what}: rank {r} failed ({type(failures[r]).__name__}: {failures[r]})")


class ChecksumError(CheckpointFormatError):
    """A checkpoint file whose size or digest differs from what its manifest recorded."""


class UnverifiedCheckpointWarning(UserWarning):
    """A per-rank DeepSpeed tag without checksums (DeepSpeed writes none): read unverified."""


class UnsafeMetadataError(CheckpointFormatError):
    """A DCP .metadata file that would build objects outside the allowlist."""
