"""Training and evaluation batches from tokenized MDS shard folders, local or `s3://bucket/prefix`.

Training goes through MosaicML Streaming (`StreamingDataset` + `StreamingDataLoader`): a deterministic order
per seed, a mixture of weighted streams, a disjoint share of every epoch per data-parallel rank, a node-local
cache, and a resumable state.

Rank layout. Readers are described by their explicit data-parallel coordinates (dp_rank, dp_size), never by
the global RANK/WORLD_SIZE (see `calm_megatron.data.readers`): every reader with the same dp_rank reads the
same samples, so tensor-parallel peers and the pipeline stages of one replica agree whatever Megatron's rank
order; data-parallel ranks read disjoint shares whose union is the epoch. A pipeline stage that needs no data
passes `reads_data=False` and gets an `IdleTrainLoader`. `build_train_loader` is collective over the default
process group when one exists: every rank must call it (readers and non-readers alike).

Exact resume. `state_dict()` is one global sample position (epoch, sample in epoch) plus a fingerprint of
the data; taken at a step boundary and loaded into a fresh loader it continues batch for batch at the same
data-parallel size, and with no sample repeated or skipped at another size (up to the epoch's last, partial
global micro-batch, which Streaming pads). Keep seed, micro-batch size and data fixed across a resume.

Failures are never silent. Shards are hash-checked (xxh64) as they arrive; downloads retry `download_retry`
times with backoff (a store down for seconds is ridden out); a batch that does not arrive within `timeout_s`
seconds, an epoch that delivers fewer batches than its partition holds, a corrupt shard or a storage error
raises a `DataLoaderError` (see `calm_megatron.data.errors`) naming the shard or the endpoint; its `resumable`
attribute says whether to exit with the requeue code.

Evaluation (`iter_eval_batches`) reads the shards directly: no shuffle, no shared memory, and exact per-block
accounting: data-parallel rank r takes blocks r, r + dp, r + 2dp, ..., so every held-out block is read once.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
import weakref
from typing import Any, Iterator, List, Optional, Sequence

import numpy as np
import torch

from calm_megatron.data import readers, storage
from calm_megatron.data.errors import (DataCorruptionError, DataLoaderError, DataNotFoundError,  # noqa: F401
                                       DataStorageError, DataTimeoutError)
from calm_megatron.data.shard_read import (check_streams_agree, data_fingerprint, iter_blocks, num_blocks,
                                           read_shard_index, split_paths)
from calm_megatron.data.streaming_compat import import_streaming
from calm_megatron.data.streams import (CacheDir, StreamSpec, first_error, make_stream, parse_streams,
                                        refresh_index, release_stale_shared_memory)

STATE_KEY = "calm_data"  # our entry in the loader state: the fingerprint of the data it was taken over
# Samples Streaming prepares ahead of the one being read. Its default (8 x batch) makes the sample loop wait on
# its helper thread's 7 ms naps every few samples: 2.5x fewer samples/s with small blocks.
DEFAULT_PREDOWNLOAD = 512


class _DropReportedFailures(logging.Filter):
    """Streaming re-raises a download thread's exception inside a future's callback, which concurrent.futures
    logs as a traceback; ours are recorded and raised in the main thread with a clear message instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], DataLoaderError))


if not any(isinstance(f, _DropReportedFailures) for f in logging.getLogger("concurrent.futures").filters):
    logging.getLogger("concurrent.futures").addFilter(_DropReportedFailures())


def collate_tokens(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack read-only uint32 token arrays into a fresh int64 tensor [B, T]."""
    return {"tokens": torch.from_numpy(np.stack([s["tokens"] for s in samples]).astype(np.int64))}


def expected_batches(epoch_size: int, num_canonical_nodes: int, dp_size: int, batch_size: int,
                     sample_in_epoch: int = 0) -> int:
    """Full batches each data-parallel rank gets from an epoch resumed at `sample_in_epoch` (Streaming's
    `get_partitions_orig` over one physical node: canonical nodes padded to equal length, the rest interleaved
    over the ranks and padded to a multiple of dp_size, partial batches dropped)."""
    ncn = max(1, num_canonical_nodes)
    remaining = ncn * math.ceil(epoch_size / ncn) - sample_in_epoch
    return 0 if remaining <= 0 else math.ceil(remaining / dp_size) // batch_size


class _Watchdog:
    """Ends a wait for a batch after `timeout_s` seconds by signalling Streaming's failure event, which stops its
    sample loop (in-process loading only; DataLoader workers have the DataLoader's own timeout)."""

    def __init__(self, timeout_s: float, fire: "weakref.WeakMethod"):
        self.timeout_s, self._fire = timeout_s, fire
        self._deadline: Optional[float] = None
        self.fired = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="calm-data-watchdog", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(min(0.25, self.timeout_s / 4)):
            fire = self._fire()
            if fire is None:  # the loader is gone
                return
            deadline = self._deadline
            if deadline is not None and time.monotonic() > deadline and not self.fired:
                self.fired = True
                fire()
            del fire

    def arm(self) -> None:
        self._deadline = time.monotonic() + self.timeout_s

    def disarm(self) -> None:
        self._deadline = None

    def close(self) -> None:
        self._stop.set()


class TrainLoader:
    """Endless iterator of `{"tokens": LongTensor[B, T]}` over one or several streams, epoch after epoch.

    Every epoch (also a resumed, partial one) must deliver exactly the batches its partition holds; anything
    less raises DataLoaderError instead of silently training on less data. Call `close()` when done (it also
    runs at exit); a loader is not reusable after it raised.
    """

    def __init__(self, path: str, batch_size: int, seed: int, dp_rank: int, dp_size: int, replication: int = 1,
                 shuffle: bool = True, download_retry: int = 8, timeout_s: float = 120, num_workers: int = 0,
                 num_canonical_nodes: Optional[int] = None, weights: Sequence[float] = (),
                 cache_dir: Optional[str] = None, cache_limit: Optional[str] = None,
                 predownload: Optional[int] = None, layout: Optional[readers.ReaderLayout] = None):
        self._closed, self._watchdog = False, None
        if replication < 1:
            raise ValueError(f"replication={replication} must be >= 1")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s={timeout_s} must be > 0")
        self.specs: List[StreamSpec] = parse_streams(path, weights)
        self.path = ",".join(s.path for s in self.specs)
        self.layout = layout or readers.discover(dp_rank, dp_size, reads=True)
        self.batch_size, self.dp_size, self.timeout_s = batch_size, dp_size, float(timeout_s)
        self.num_workers = num_workers
        # One request may take at most half the batch timeout, so a hung store is noticed in time.
        self.policy = storage.RetryPolicy(attempts=max(1, download_retry),
                                          timeout_s=max(1.0, min(float(timeout_s) / 2, 60.0)))
        self.indexes = [read_shard_index(s.path) for s in self.specs]
        check_streams_agree([s.path for s in self.specs], self.indexes)
        self.index = self.indexes[0]
        self.seq_len = self.index["seq_len"]
        self.fingerprint = hashlib.sha256(json.dumps(
            [[data_fingerprint(s.path), s.weight] for s in self.specs]).encode()).hexdigest()[:16]
        self.cache = CacheDir(cache_dir, self.layout.host, self.layout.token)
        try:
            self._build(seed, shuffle, num_canonical_nodes or 1, cache_limit, predownload)
        except BaseException:
            self.close()
            raise
        self.batches_per_epoch = len(self.loader)
        if self.batches_per_epoch == 0:
            self.close()
            raise ValueError(f"{self.path}: {self.dataset.epoch_size} samples per epoch are fewer than one batch of "
                             f"{batch_size} per data-parallel rank (dp_size={dp_size})")
        self.epoch = 0
        self._resume_from: Optional[dict] = None
        if num_workers == 0:
            self._watchdog = _Watchdog(self.timeout_s, weakref.WeakMethod(self._stop_streaming))

    # ------------------------------------------------------------ building

    def _build(self, seed: int, shuffle: bool, ncn: int, cache_limit: Optional[str],
               predownload: Optional[int]) -> None:
        streaming = import_streaming()
        layout = self.layout
        locals_ = [self.cache.stream_dir(s) for s in self.specs]
        if layout.is_leader:  # one process per host prepares the cache while the others wait
            self.cache.lock()
            release_stale_shared_memory(locals_)
            for spec, local in zip(self.specs, locals_):
                refresh_index(spec, local, self.policy)
        layout.barrier()
        streams = [make_stream(spec, local, self.policy, self.cache.error_log)
                   for spec, local in zip(self.specs, locals_)]
        predownload = predownload or max(8 * self.batch_size, DEFAULT_PREDOWNLOAD)
        try:
            with readers.streaming_scope(layout):
                self.dataset = streaming.StreamingDataset(
                    streams=streams, batch_size=self.batch_size, shuffle=shuffle, shuffle_seed=seed,
                    num_canonical_nodes=ncn, predownload=predownload, cache_limit=cache_limit or None,
                    download_retry=self.policy.attempts, download_timeout=self.policy.timeout_s)
        except ValueError as err:
            if "Reused local directory" in str(err):
                raise ValueError(f"data cache folders {locals_} are in use by another loader on this host: give "
                                 "each job its own data.cache_dir (or close the previous loader)") from None
            raise
        # The sample world: all readers with one dp_rank read the same samples (see readers.py).
        self.dataset._parallel_rank_world = readers.sample_world(layout)
        self.dataset.length = math.ceil(self.dataset.epoch_size / layout.dp_size)
        self.loader = streaming.StreamingDataLoader(
            self.dataset, batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=collate_tokens,
            drop_last=True, timeout=self.timeout_s if self.num_workers > 0 else 0, persistent_workers=False,
            # Each new iterator draws a base seed; a private generator keeps that draw out of the
            # global torch RNG, so a resumed run's dropout/noise streams equal the uninterrupted run's.
            generator=torch.Generator().manual_seed(seed))

    # ------------------------------------------------------------ iterating

    def _stop_streaming(self) -> None:
        """Give up on this epoch: stop Streaming's sample loop and its downloads' pending retries."""
        for stream in getattr(self.dataset, "streams", []):
            if hasattr(stream, "cancel"):
                stream.cancel.set()
        event = getattr(self.dataset, "_event", None)
        if event is not None:
            event.set()

    def _failure(self, context: str, cause: Optional[BaseException] = None) -> DataLoaderError:
        """The error to raise: the first failure a download thread or worker recorded, else one built here."""
        recorded = first_error(self.cache.error_log)
        timed_out = self._watchdog is not None and self._watchdog.fired
        if isinstance(cause, RuntimeError) and "timed out" in str(cause):
            timed_out = True
        if timed_out:
            suffix = f"; first storage error: {recorded}" if recorded else ""
            return DataTimeoutError(f"{storage.describe(self.path)}: no batch within data.timeout_s="
                                    f"{self.timeout_s:g} s ({context}){suffix}")
        if recorded is not None:
            return recorded
        detail = f": {type(cause).__name__}: {cause}" if cause is not None else ""
        return DataStorageError(f"{storage.describe(self.path)}: {context}{detail}")

    def _next(self, it):
        if self._watchdog is not None:
            self._watchdog.arm()
        try:
            return next(it)
        finally:
            if self._watchdog is not None:
                self._watchdog.disarm()

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self._closed:
            raise RuntimeError("TrainLoader is closed")
        while True:
            resume, self._resume_from = self._resume_from, None
            start = resume["sample_in_epoch"] if resume and resume.get("epoch") == self.epoch else 0
            count = 0
            it = iter(self.loader)
            while True:
                try:
                    batch = self._next(it)
                except StopIteration:
                    break
                except DataLoaderError:
                    raise
                except Exception as err:  # DataLoader timeout, a worker's error, Streaming's thread failure
                    raise self._failure(f"reading epoch {self.epoch} failed after {count} batches", err) from err
                count += 1
                yield batch
            ncn = (resume or {}).get("num_canonical_nodes") or self.dataset.num_canonical_nodes or 1
            expected = expected_batches(self.dataset.epoch_size, ncn, self.dp_size, self.batch_size, start)
            failed = getattr(self.dataset, "_event", None)
            if count != expected or (failed is not None and failed.is_set()) or (
                    self._watchdog is not None and self._watchdog.fired):
                raise self._failure(f"epoch {self.epoch} ended after {count} of {expected} batches")
            self.epoch += 1

    # ------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """The resumable position (global: the same on every reader) at the current step boundary."""
        yielded = self.loader.num_samples_yielded * self.dp_size
        state = self.dataset.state_dict(yielded, False)
        state[STATE_KEY] = self.fingerprint
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state` at the next iteration. Refuses a state taken over other data."""
        theirs = state.get(STATE_KEY)
        if theirs is not None and theirs != self.fingerprint:
            raise ValueError(f"the loader state was taken over other data (fingerprint {theirs}) than "
                             f"{self.path} (fingerprint {self.fingerprint}): the sample position does not carry over")
        self.loader.load_state_dict(state)
        self.loader.num_samples_yielded = 0  # counted from the loaded position on
        self.epoch = max(0, int(state.get("epoch", 0)))
        self._resume_from = dict(state)

    # ------------------------------------------------------------ teardown

    def close(self) -> None:
        """Stop Streaming's threads and workers and release the cache (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if getattr(self, "_watchdog", None) is not None:
            self._watchdog.close()
        iterator = getattr(self.loader, "_iterator", None) if hasattr(self, "loader") else None
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        dataset = getattr(self, "dataset", None)
        if dataset is not None:
            if hasattr(dataset, "_iterator"):
                dataset._iterator.non_blocking_exit()
            if hasattr(dataset, "_event"):
                dataset._event.set()
            if hasattr(dataset, "_locals_shm"):
                try:
                    dataset._locals_shm.buf[:4] = np.int32(0).tobytes()
                except (ValueError, TypeError):
                    pass
        cache = getattr(self, "cache", None)
        if cache is not None:
            cache.unlock()
            cache.remove_error_log()
            if self.layout.node_readers <= 1:
                cache.remove_if_private()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter teardown
            pass


class IdleTrainLoader:
    """The loader of a rank that reads no data (a middle pipeline stage): it keeps the state it is given so
    that any rank can save it, and refuses to be iterated."""

    reads_data = False

    def __init__(self, path: str):
        self.path = path
        self._state: Optional[dict] = None

    def __iter__(self):
        raise RuntimeError(f"this rank was built with reads_data=False and reads no data from {self.path}")

    def state_dict(self) -> Optional[dict]:
        return self._state

    def load_state_dict(self, state: dict) -> None:
        self._state = dict(state)

    def close(self) -> None:
        pass


def build_train_loader(path, batch_size, seed, dp_rank, dp_size, replication=1, shuffle=True,
                       download_retry=8, timeout_s=120, num_workers=0, weights=(), cache_dir=None,
                       cache_limit=None, reads_data=True, **kwargs):
    """An endless, deterministic (per seed) stream of `{"tokens": LongTensor[batch_size, seq_len]}` batches,
    this data-parallel rank's share of every epoch, from one shard folder or a comma-separated mixture of
    them (local or s3://) with relative `weights`.

    Collective when torch.distributed is initialised: every rank calls it; ranks with `reads_data=False`
    (pipeline stages that take no input) get an `IdleTrainLoader`. `replication` is accepted for
    compatibility and not needed: all readers with the same dp_rank read the same samples. `cache_dir`:
    node-local cache (default: a private temporary folder per build). `kwargs` (num_canonical_nodes,
    predownload) go to `TrainLoader`.
    """
    layout = readers.discover(dp_rank, dp_size, reads=reads_data)
    if not reads_data:
        return IdleTrainLoader(path)
    return TrainLoader(path, batch_size, seed, dp_rank, dp_size, replication=replication, shuffle=shuffle,
                       download_retry=download_retry, timeout_s=timeout_s, num_workers=num_workers, weights=weights,
                       cache_dir=cache_dir or None, cache_limit=cache_limit or None, layout=layout, **kwargs)


# ---------------------------------------------------------------- evaluation

def eval_block_ids(total: int, dp_rank: int, dp_size: int) -> range:
    """Blocks of `total` that data-parallel rank `dp_rank` evaluates: dp_rank, dp_rank + dp_size, ..."""
    return range(dp_rank, total, dp_size)


def num_eval_batches(path, batch_size, dp_rank, dp_size, max_batches=None) -> int:
    """How many batches `iter_eval_batches` yields on this rank (ranks can differ by one)."""
    blocks = len(eval_block_ids(num_blocks(path), dp_rank, dp_size))
    batches = -(-blocks // batch_size)
    return batches if max_batches is None else min(batches, max_batches)


def iter_eval_batches(path, batch_size, dp_rank, dp_size, max_batches=None,
                      cache_dir=None) -> Iterator[dict[str, torch.Tensor]]:
    """Deterministic held-out batches `{"tokens": LongTensor[b, T]}` (b <= batch_size on the last batch).

    Rank r reads blocks r, r + dp_size, ...; over all ranks each block is read exactly once. With
    `max_batches` (per rank) the ranks together read exactly the first max_batches * batch_size * dp_size
    blocks. Shards are hash-verified as they are read; an s3:// folder's shards are downloaded into
    `cache_dir` (default: a private temporary folder of this process).
    """
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} not in [0, dp_size={dp_size})")
    if len(split_paths(path)) != 1:
        raise ValueError(f"{path}: evaluation reads one shard folder, not a list")
    read_shard_index(path)
    total = num_blocks(path)
    if max_batches is not None:
        total = min(total, max_batches * batch_size * dp_size)
    pending: list[np.ndarray] = []
    for _, block in iter_blocks(path, start=dp_rank, step=dp_size, stop=total, cache_dir=cache_dir):
        pending.append(block)
        if len(pending) == batch_size:
            yield collate_tokens([{"tokens": b} for b in pending])
            pending = []
    if pending:
        yield collate_tokens([{"tokens": b} for b in pending])
