"""Which processes read training data, and MosaicML Streaming's coordination scoped to exactly those.

Streaming derives its world from the environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE; see
`streaming/base/world.py`) and synchronises with `torch.distributed.barrier()` on the default group while it
builds a dataset (`streaming/base/dataset.py`, `streaming/base/shared/prefix.py`). Both assume that every
process of the job reads data and that data ranks are global ranks. Under Megatron's rank order (tp fastest,
then dp, then pp) neither holds: tensor-parallel peers and pipeline stages of one data-parallel replica must
read the same samples, and pipeline stages that take no data should not read at all.

So we give Streaming two explicit worlds instead (and agree on its shared-memory prefix per host, which stock
Streaming leaves to a race between the processes of a node):
- the *sample* world (who reads which samples): one node of `dp_size` ranks, this process being `dp_rank`;
  every reader with the same dp_rank gets the same samples, whatever its tp/pp position. One node also
  keeps the sample order independent of the node count, so a resume at another size continues exactly.
- the *coordination* world (who shares a cache folder and shared memory): the readers on this host, the
  first of them the local leader.
`discover` agrees on both over the default process group (one all_gather, collective: every rank calls it),
and `streaming_scope` applies them while Streaming builds the dataset: the environment variables describe the
coordination world and Streaming's barriers run on the readers' process group.
"""
from __future__ import annotations

import os
import socket
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch.distributed as dist


@dataclass(frozen=True)
class ReaderLayout:
    """This process's place among the data readers."""
    dp_rank: int
    dp_size: int
    reads: bool
    host: str
    node_index: int  # position among this host's readers (0: the local leader); -1 when not reading
    node_readers: int  # readers on this host
    token: str  # the same on every rank of one build: names its default cache folder
    distributed: bool  # a torch.distributed group exists
    group: Any = None  # the readers' process group (None: the default group)

    @property
    def is_leader(self) -> bool:
        return self.node_index == 0

    def barrier(self) -> None:
        """Wait for every reader (no-op in a single process)."""
        if self.distributed and self.reads:
            dist.barrier(group=self.group)


def discover(dp_rank: int, dp_size: int, reads: bool = True) -> ReaderLayout:
    """Agree with every rank on who reads data (collective when torch.distributed is initialised).

    Raises ValueError when the ranks disagree on dp_size, when a data-parallel rank has no reader, or when
    dp_size > 1 without a process group."""
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} not in [0, dp_size={dp_size})")
    host = socket.gethostname()
    if not (dist.is_available() and dist.is_initialized()):
        if dp_size != 1:
            raise ValueError(f"this rank is dp_rank={dp_rank} of dp_size={dp_size} but torch.distributed is not "
                             "initialised: data-parallel readers must form a process group")
        return ReaderLayout(dp_rank, dp_size, reads, host, 0 if reads else -1, 1 if reads else 0,
                            uuid.uuid4().hex[:12], distributed=False)
    world, rank = dist.get_world_size(), dist.get_rank()
    everyone: list = [None] * world
    dist.all_gather_object(everyone, (host, bool(reads), int(dp_rank), int(dp_size), uuid.uuid4().hex[:12]))
    sizes = {entry[3] for entry in everyone}
    if len(sizes) != 1:
        raise ValueError(f"ranks disagree on dp_size: {sorted(sizes)} (rank {rank} says {dp_size})")
    readers = [r for r, entry in enumerate(everyone) if entry[1]]
    missing = sorted(set(range(dp_size)) - {everyone[r][2] for r in readers})
    if missing:
        raise ValueError(f"data-parallel ranks {missing} of dp_size={dp_size} have no rank that reads data "
                         f"(readers: global ranks {readers})")
    group = None
    if len(readers) != world:  # new_group is collective over the default group: every rank calls it
        group = dist.new_group(ranks=readers, backend="gloo")
    on_host = [r for r in readers if everyone[r][0] == host]
    return ReaderLayout(dp_rank, dp_size, bool(reads), host, on_host.index(rank) if reads else -1, len(on_host),
                        everyone[0][4], distributed=True, group=group)


class _ReadersDist:
    """Stands in for `torch.distributed` inside Streaming while it builds a dataset: barriers run on the
    readers' group only (or nowhere, in a single process); everything else is torch.distributed's."""

    def __init__(self, layout: ReaderLayout):
        self._layout = layout

    def is_available(self) -> bool:
        return True

    def is_initialized(self) -> bool:
        return self._layout.distributed

    def barrier(self, *args, **kwargs) -> None:
        self._layout.barrier()

    def __getattr__(self, name: str):
        return getattr(dist, name)


def _agreed_shm_prefix(layout: ReaderLayout):
    """Streaming's `get_shm_prefix`, made safe with other jobs on the host.

    Stock Streaming lets every process of a node pick the first free shared-memory prefix on its own and trusts
    that they agree; another job creating or freeing a prefix in between makes them disagree ("shared memory
    registered does not match local leader"). Here the local leader picks and registers the prefix (retrying
    when another job takes it first) and tells the readers of its host, over the readers' group."""
    from streaming.base.constant import LOCALS, SHM_TO_CLEAN
    from streaming.base.shared import SharedMemory
    from streaming.base.shared.prefix import _check_and_find_retrying, _check_self, _get_path, _pack_locals, \
        _unpack_locals

    def get_shm_prefix(streams_local, streams_remote, world, retry: int = 100):
        _check_self(streams_local)
        prefix_int, shm = -1, None
        if layout.is_leader:
            while shm is None:
                prefix_int = max(_check_and_find_retrying(streams_local, streams_remote, shm_name=name, retry=retry)
                                 for name in SHM_TO_CLEAN)
                data = _pack_locals(streams_local, prefix_int)
                try:
                    shm = SharedMemory(_get_path(prefix_int, LOCALS), True, len(data))
                except FileExistsError:  # another job registered it first: look again
                    continue
                shm.buf[:len(data)] = data
        if layout.distributed:
            gathered: list = [None] * dist.get_world_size(group=layout.group)
            dist.all_gather_object(gathered, (layout.host, prefix_int if layout.is_leader else -1),
                                   group=layout.group)
            prefix_int = max(p for host, p in gathered if host == layout.host)
        if not layout.is_leader:
            shm = SharedMemory(_get_path(prefix_int, LOCALS), False)
            their_locals, their_prefix = _unpack_locals(bytes(shm.buf))
            if their_locals != list(streams_local) or their_prefix != prefix_int:
                raise RuntimeError(f"shared memory prefix {prefix_int} of this host's first data reader holds "
                                   f"{their_locals}, expected {list(streams_local)}")
        return prefix_int, shm

    return get_shm_prefix


def _streaming_modules() -> list:
    import streaming.base.dataset
    import streaming.base.shared.prefix
    import streaming.base.util

    return [streaming.base.dataset, streaming.base.shared.prefix, streaming.base.util]


@contextmanager
def streaming_scope(layout: ReaderLayout) -> Iterator[None]:
    """While Streaming builds a dataset: its env-derived world is this host's readers, its barriers run on the
    readers' group, its shared-memory prefix is chosen by the host's leader. Restores the environment and
    Streaming's modules afterwards."""
    if not layout.reads:
        raise RuntimeError("streaming_scope: this rank does not read data")
    env = {"RANK": str(layout.node_index), "WORLD_SIZE": str(layout.node_readers),
           "LOCAL_RANK": str(layout.node_index), "LOCAL_WORLD_SIZE": str(layout.node_readers)}
    saved_env = {key: os.environ.get(key) for key in env}
    modules = _streaming_modules()
    saved_dist = [module.dist for module in modules]
    dataset_module = modules[0]
    saved_prefix = dataset_module.get_shm_prefix
    proxy = _ReadersDist(layout)
    os.environ.update(env)
    for module in modules:
        module.dist = proxy
    dataset_module.get_shm_prefix = _agreed_shm_prefix(layout)
    try:
        yield
    finally:
        dataset_module.get_shm_prefix = saved_prefix
        for module, original in zip(modules, saved_dist):
            module.dist = original
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def sample_world(layout: ReaderLayout, workers_per_rank: int = 1):
    """Streaming's World for partitioning samples: one node of dp_size ranks, this process dp_rank."""
    from streaming.base.world import World

    return World(num_nodes=1, ranks_per_node=layout.dp_size, workers_per_rank=workers_per_rank,
                 worker=layout.dp_rank * workers_per_rank)
