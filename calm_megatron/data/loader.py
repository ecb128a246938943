"""Training and evaluation batches from tokenized MDS shard folders.

Training goes through MosaicML Streaming (`StreamingDataset` + `StreamingDataLoader`): deterministic
shuffling per seed, a disjoint share of every epoch per data-parallel rank, and a resumable state.

Rank layout. Streaming derives the rank and world size from the environment variables RANK, WORLD_SIZE,
LOCAL_RANK and LOCAL_WORLD_SIZE (torchrun sets them; Slurm launches must export them), counting every process.
`replication=r` makes each group of r *consecutive* global ranks read identical samples. Megatron places
tensor-parallel peers on consecutive ranks, so `replication=tp` gives TP peers the same batch. That only
holds when nothing else shares a data-parallel rank between those groups: `build_train_loader` checks that
`RANK // replication == dp_rank` and `WORLD_SIZE // replication == dp_size` and refuses otherwise (e.g. with
pipeline stages laid out outside data parallelism, pass replication=tp*pp only if the rank order puts pp
inside dp).

Evaluation (`iter_eval_batches`) reads the shards directly: no shuffle, no shared memory, and exact per-block
accounting: data-parallel rank r takes blocks r, r + dp, r + 2dp, ..., so every held-out block is read once.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Iterator, Optional

import numpy as np
import torch

from calm_megatron.data.shards import iter_blocks, num_blocks, read_shard_index, verify_shards
from calm_megatron.data.streaming_compat import import_streaming


class _DropReplicationWarning(logging.Filter):
    """Streaming warns at every epoch that replication needs care when resuming; StreamingDataLoader's
    state_dict (which we use) already divides the sample count by the replication factor."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("The `replication` arg has been set")


def _quiet_streaming_logs() -> None:
    logger = logging.getLogger("streaming.base.dataset")
    if not any(isinstance(f, _DropReplicationWarning) for f in logger.filters):
        logger.addFilter(_DropReplicationWarning())


class DataLoaderError(RuntimeError):
    """The data stream failed (ended early, timed out); the run should exit and resume from a checkpoint."""


def collate_tokens(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack read-only uint32 token arrays into a fresh int64 tensor [B, T]."""
    return {"tokens": torch.from_numpy(np.stack([s["tokens"] for s in samples]).astype(np.int64))}


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def check_rank_layout(dp_rank: int, dp_size: int, replication: int) -> None:
    """Refuse a layout where Streaming's env-derived ranks would not give `dp_rank` its own share."""
    world, rank = _env_int("WORLD_SIZE", 1), _env_int("RANK", 0)
    if replication < 1 or world % replication:
        raise ValueError(f"replication={replication} does not divide WORLD_SIZE={world}")
    if world // replication != dp_size or rank // replication != dp_rank:
        raise ValueError(
            f"Streaming sees RANK={rank} of WORLD_SIZE={world} with replication={replication}, i.e. data rank "
            f"{rank // replication} of {world // replication}, but this rank is dp_rank={dp_rank} of "
            f"dp_size={dp_size}: the replicated ranks must be consecutive (see calm_megatron/data/loader.py)")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if (torch.distributed.get_rank(), torch.distributed.get_world_size()) != (rank, world):
            raise ValueError(f"env RANK={rank}/WORLD_SIZE={world} disagree with torch.distributed "
                             f"({torch.distributed.get_rank()}/{torch.distributed.get_world_size()}); "
                             "export RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE for Streaming")


class TrainLoader:
    """Endless iterator of `{"tokens": LongTensor[B, T]}` over a shard folder, epoch after epoch.

    Every complete epoch must deliver exactly `batches_per_epoch` batches; a shorter one (a storage failure
    that Streaming swallows) raises DataLoaderError instead of silently training on less data.
    """

    def __init__(self, path: str, batch_size: int, seed: int, dp_rank: int, dp_size: int, replication: int = 1,
                 shuffle: bool = True, download_retry: int = 8, timeout_s: float = 120,
                 num_workers: int = 0, num_canonical_nodes: Optional[int] = None):
        check_rank_layout(dp_rank, dp_size, replication)
        streaming = import_streaming()
        from streaming.base.util import clean_stale_shared_memory
        _quiet_streaming_logs()
        self.index = read_shard_index(path)
        clean_stale_shared_memory()
        verify_shards(path)
        self.path, self.batch_size, self.seq_len = path, batch_size, self.index["seq_len"]
        self.dataset = streaming.StreamingDataset(
            local=path, batch_size=batch_size, shuffle=shuffle, shuffle_seed=seed,
            replication=replication if replication > 1 else None, download_retry=download_retry,
            download_timeout=timeout_s, num_canonical_nodes=num_canonical_nodes)
        self.loader = streaming.StreamingDataLoader(
            self.dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_tokens,
            drop_last=True, timeout=timeout_s if num_workers > 0 else 0,
            persistent_workers=False,
            # Each new iterator draws a base seed; a private generator keeps that draw out of the
            # global torch RNG, so a resumed run's dropout/noise streams equal the uninterrupted run's.
            generator=torch.Generator().manual_seed(seed))
        self.batches_per_epoch = len(self.loader)
        if self.batches_per_epoch == 0:
            raise ValueError(f"{path}: {self.index['num_samples']} samples are fewer than one batch of "
                             f"{batch_size} per data-parallel rank (dp_size={dp_size})")
        self.epoch = 0
        self._resumed = False

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            resumed, self._resumed = self._resumed, False
            count = 0
            try:
                for batch in self.loader:
                    count += 1
                    yield batch
            except RuntimeError as err:  # DataLoader timeout or a failed background download
                raise DataLoaderError(f"{self.path}: reading epoch {self.epoch} failed: {err}") from err
            if not resumed and count != self.batches_per_epoch:
                raise DataLoaderError(f"{self.path}: epoch {self.epoch} ended after {count} batches, expected "
                                      f"{self.batches_per_epoch} (shard read failure?)")
            self.epoch += 1

    def state_dict(self) -> dict[str, Any]:
        """Streaming's resumable state (one global sample count); take it at step boundaries."""
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state` at the next iteration (the first, partial epoch is not length-checked)."""
        self.loader.load_state_dict(state)
        self.epoch = state.get("epoch", self.epoch)
        self._resumed = True


def build_train_loader(path, batch_size, seed, dp_rank, dp_size, replication=1, shuffle=True,
                       download_retry=8, timeout_s=120, num_workers=0, **kwargs) -> TrainLoader:
    """An endless, deterministic (per seed) stream of `{"tokens": LongTensor[batch_size, seq_len]}` batches,
    this data-parallel rank's share of every epoch. Verifies the shard hashes first. See `TrainLoader`;
    `kwargs` (e.g. num_canonical_nodes) go to it."""
    return TrainLoader(path, batch_size, seed, dp_rank, dp_size, replication=replication, shuffle=shuffle,
                       download_retry=download_retry, timeout_s=timeout_s, num_workers=num_workers, **kwargs)


def eval_block_ids(total: int, dp_rank: int, dp_size: int) -> range:
    """Blocks of `total` that data-parallel rank `dp_rank` evaluates: dp_rank, dp_rank + dp_size, ..."""
    return range(dp_rank, total, dp_size)


def num_eval_batches(path, batch_size, dp_rank, dp_size, max_batches=None) -> int:
    """How many batches `iter_eval_batches` yields on this rank (ranks can differ by one)."""
    blocks = len(eval_block_ids(num_blocks(path), dp_rank, dp_size))
    batches = -(-blocks // batch_size)
    return batches if max_batches is None else min(batches, max_batches)


def iter_eval_batches(path, batch_size, dp_rank, dp_size, max_batches=None) -> Iterator[dict[str, torch.Tensor]]:
    """Deterministic held-out batches `{"tokens": LongTensor[b, T]}` (b <= batch_size on the last batch).

    Rank r reads blocks r, r + dp_size, ...; over all ranks each block is read exactly once. With
    `max_batches` (per rank) the ranks together read exactly the first max_batches * batch_size * dp_size
    blocks. Shards are hash-verified as they are read.
    """
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} not in [0, dp_size={dp_size})")
    read_shard_index(path)
    total = num_blocks(path)
    if max_batches is not None:
        total = min(total, max_batches * batch_size * dp_size)
    pending: list[np.ndarray] = []
    for _, block in iter_blocks(path, start=dp_rank, step=dp_size, stop=total):
        pending.append(block)
        if len(pending) == batch_size:
            yield collate_tokens([{"tokens": b} for b in pending])
            pending = []
    if pending:
        yield collate_tokens([{"tokens": b} for b in pending])
