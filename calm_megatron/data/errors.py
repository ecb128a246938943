"""Errors of the data path. Every failure of the training stream ends as one of these, never as a silent
short epoch or a hang.

`DataLoaderError.resumable` says what the run should do with it:
- True: a storage failure (store unreachable, timed out, an epoch cut short). Exit with the requeue code
  (`calm_megatron.training.preemption.EXIT_REQUEUE`, 75) and resume from the last checkpoint later.
- False: requeueing would fail the same way (a corrupt shard, a missing object, denied credentials): exit
  with an ordinary error.
"""
from __future__ import annotations

from typing import Optional


class DataLoaderError(RuntimeError):
    """The data stream failed; `resumable` tells whether a later restart from a checkpoint can succeed."""

    resumable: bool = True

    def __init__(self, message: str, resumable: Optional[bool] = None):
        super().__init__(message)
        if resumable is not None:
            self.resumable = resumable


class DataStorageError(DataLoaderError):
    """Reading or writing the object store or a shard folder failed (names the object and the endpoint).

    Resumable unless the object is missing or access is denied."""


class DataNotFoundError(DataStorageError):
    """An object or file that should exist does not (a wrong path, or data deleted under a run)."""

    resumable = False


class DataCorruptionError(DataLoaderError):
    """A shard's bytes do not match the xxh64 hash recorded when it was written (names the shard)."""

    resumable = False


class DataTimeoutError(DataStorageError):
    """No batch arrived within `data.timeout_s` seconds."""
