"""The streams of a training mixture and their node-local cache folders.

A stream is a shard folder (local or s3://) with an optional relative weight. Streaming always "downloads"
it (copies local folders, fetches s3 objects) into a cache folder on this host, so the data folder itself is
never written to, and local and s3 data take the same code path.

`CalmStream` is Streaming's `Stream` with our storage layer underneath: bounded retries that ride out a store
that is down for seconds, hash validation with one fresh download before a shard is declared corrupt, and
every failure recorded (type, resumability, message naming the shard and endpoint) in an error log that the
main process reads, since Streaming's download threads and DataLoader workers cannot raise into it.
"""
from __future__ import annotations

import atexit
import fcntl
import glob
import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

from calm_megatron.data import storage
from calm_megatron.data.errors import (DataCorruptionError, DataLoaderError, DataNotFoundError, DataStorageError,
                                       DataTimeoutError)
from calm_megatron.data.shard_read import HASH, MDS_INDEX_NAME, split_paths
from calm_megatron.data.streaming_compat import import_streaming

SHM_DIR = "/dev/shm"


@dataclass(frozen=True)
class StreamSpec:
    """One shard folder of the training mixture and its relative weight (None: its natural size)."""
    path: str
    weight: Optional[float] = None


def parse_streams(train: str, weights: Sequence[float] = ()) -> List[StreamSpec]:
    """`data.train` (one folder or a comma-separated list) and `data.train_weights` -> streams.

    Weights are relative proportions of each epoch (normalised; a stream is up- or down-sampled to match);
    none given: each stream contributes all its samples once per epoch."""
    paths = split_paths(train)
    if len(set(paths)) != len(paths):
        raise ValueError(f"data.train lists a shard folder twice: {paths}")
    weights = list(weights or [])
    if weights and len(weights) != len(paths):
        raise ValueError(f"data.train_weights has {len(weights)} values but data.train names {len(paths)} shard "
                         f"folders ({paths})")
    if any(not w > 0 for w in weights):
        raise ValueError(f"data.train_weights={weights}: every weight must be > 0")
    return [StreamSpec(p, float(w) if weights else None) for p, w in zip(paths, weights or [None] * len(paths))]


# ---------------------------------------------------------------- the error log

def record_error(log_path: str, err: BaseException) -> None:
    """Append one failure to the error log (safe from threads and processes: one O_APPEND write per line)."""
    line = json.dumps({"type": type(err).__name__, "resumable": getattr(err, "resumable", True),
                       "message": str(err)}) + "\n"
    try:
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
    except OSError:  # the loader was closed and its cache removed: nobody is listening any more
        pass


_ERROR_TYPES = {cls.__name__: cls for cls in (DataCorruptionError, DataNotFoundError, DataStorageError,
                                             DataTimeoutError, DataLoaderError)}


def first_error(log_path: str) -> Optional[DataLoaderError]:
    """The first failure recorded in the error log, rebuilt as its DataLoaderError class (None if none)."""
    try:
        with open(log_path) as f:
            line = f.readline()
    except FileNotFoundError:
        return None
    if not line.strip():
        return None
    entry = json.loads(line)
    cls = _ERROR_TYPES.get(entry["type"], DataStorageError)
    return cls(entry["message"], resumable=entry["resumable"])


# ---------------------------------------------------------------- Streaming's Stream on our storage layer

_MAX_MAPPED_SHARDS = 64  # per process; least recently opened maps are closed beyond it


def _mapped_reader_class():
    """MDSReader reading samples from a memory map of its shard file, opened once (stock Streaming opens, seeks
    and reads the file for every sample: about half the time of a small-block epoch). A missing file still
    raises FileNotFoundError (Streaming's cue to download it); eviction closes the map."""
    import mmap
    from collections import OrderedDict

    import numpy as np
    from streaming.base.format.mds.reader import MDSReader

    class MappedMDSReader(MDSReader):
        _open: "OrderedDict[int, MappedMDSReader]" = OrderedDict()
        _lock = threading.Lock()

        def _map(self):
            mapped = self.__dict__.get("_calm_map")
            if mapped is None:
                filename = os.path.join(self.dirname, self.split, self.raw_data.basename)
                with open(filename, "rb") as f:
                    mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                with self._lock:
                    self._calm_map = mapped
                    self._open[id(self)] = self
                    while len(self._open) > _MAX_MAPPED_SHARDS:
                        self._open.popitem(last=False)[1]._unmap()
            return mapped

        def _unmap(self) -> None:
            self.__dict__.pop("_calm_map", None)  # closed by garbage collection once no slice refers to it
            self._open.pop(id(self), None)

        def get_sample_data(self, idx: int) -> bytes:
            mapped = self._map()
            begin, end = np.frombuffer(mapped, np.uint32, count=2, offset=(1 + idx) * 4)
            data = mapped[begin:end]
            if not data:
                raise IndexError(f"Relative sample index {idx} is not present in the {self.raw_data.basename} file.")
            return data

        def evict(self) -> int:
            with self._lock:
                self._unmap()
            return super().evict()

        def __getstate__(self) -> dict:
            state = dict(self.__dict__)
            state.pop("_calm_map", None)
            return state

    return MappedMDSReader


def _stream_class():
    """CalmStream (built once; registered in this module so that pickle finds it, e.g. for spawned workers)."""
    if "CalmStream" in globals():
        return globals()["CalmStream"]
    import_streaming()
    from streaming.base.format.mds.reader import MDSReader
    from streaming.base.stream import Stream

    mapped_reader = _mapped_reader_class()

    class CalmStream(Stream):
        """A Stream that downloads through `calm_megatron.data.storage` and reports failures clearly."""

        def __init__(self, *, remote: str, local: str, policy: storage.RetryPolicy, error_log: str,
                     proportion: Optional[float] = None):
            super().__init__(remote=remote, local=local, proportion=proportion, download_retry=policy.attempts,
                             download_timeout=policy.timeout_s, validate_hash=HASH, keep_zip=False)
            self.policy, self.error_log = policy, error_log
            self.cancel = threading.Event()  # set when the loader gives up: pending retries stop

        def __getstate__(self) -> dict:  # DataLoader workers started with spawn get a fresh event
            state = dict(self.__dict__)
            state.pop("cancel", None)
            return state

        def __setstate__(self, state: dict) -> None:
            self.__dict__.update(state)
            self.cancel = threading.Event()

        def _download_file(self, from_basename: str, to_basename: Optional[str] = None) -> str:
            local = os.path.join(self.local, self.split, to_basename or from_basename)
            storage.download(storage.join(self.remote, from_basename), local, self.policy, self.cancel)
            return local

        def get_shards(self, world, allow_unsafe_types: bool) -> list:
            shards = super().get_shards(world, allow_unsafe_types)
            for shard in shards:
                if type(shard) is MDSReader:
                    shard.__class__ = mapped_reader
            return shards

        def _names(self, shard) -> str:
            files = [(zip_info or raw_info).basename for raw_info, zip_info in shard.file_pairs]
            return ", ".join(storage.join(self.remote, name) for name in files)

        def _drop_local_zips(self, shard) -> None:
            for raw_info, zip_info in shard.file_pairs:
                for info in (zip_info, raw_info):
                    if info is not None:
                        path = os.path.join(self.local, self.split, info.basename)
                        if os.path.exists(path):
                            os.remove(path)

        def prepare_shard(self, shard) -> int:
            try:
                try:
                    return super().prepare_shard(shard)
                except ValueError as err:
                    if "Checksum failure" not in str(err):
                        raise
                    self._drop_local_zips(shard)  # a damaged copy? fetch it once more before giving up
                    try:
                        return super().prepare_shard(shard)
                    except ValueError as again:
                        if "Checksum failure" not in str(again):
                            raise
                        raise DataCorruptionError(
                            f"shard {self._names(shard)} is corrupt: its {HASH} does not match the one recorded in "
                            f"{storage.join(self.remote, MDS_INDEX_NAME)} (fetched twice); rewrite the shards with "
                            "tools/prepare_data.py") from None
            except DataLoaderError as err:
                record_error(self.error_log, err)
                raise
            except Exception as err:  # noqa: BLE001 - anything else Streaming raises while preparing a shard
                wrapped = DataStorageError(f"preparing shard {self._names(shard)} failed: {type(err).__name__}: "
                                           f"{err}")
                record_error(self.error_log, wrapped)
                raise wrapped from err

    for cls in (CalmStream, mapped_reader):
        cls.__qualname__, cls.__module__ = cls.__name__, __name__
        globals()[cls.__name__] = cls
    return CalmStream


def make_stream(spec: StreamSpec, local: str, policy: storage.RetryPolicy, error_log: str):
    remote = spec.path if storage.is_remote(spec.path) else os.path.abspath(spec.path)
    return _stream_class()(remote=remote, local=local, policy=policy, error_log=error_log, proportion=spec.weight)


# ---------------------------------------------------------------- cache folders on this host

class CacheDir:
    """The node-local cache of one loader: `<root>/<host>/<stream key>/` per stream, an error log, and a lock.

    An explicit root (data.cache_dir) is reused across runs and restarts; the first reader on each host locks
    it, so two jobs on one host cannot share it by mistake. Without one, a fresh folder under the system
    temporary directory is made per build and removed at close."""

    def __init__(self, root: Optional[str], host: str, token: str):
        self.explicit = bool(root)
        base = Path(root) if root else Path(tempfile.gettempdir()) / "calm_megatron_cache" / token
        self.base = base
        self.root = base / host
        self.error_log = str(self.root / f".errors.{token}.jsonl")
        self._lock_fd: Optional[int] = None

    def stream_dir(self, spec: StreamSpec) -> str:
        key = hashlib.blake2s(spec.path.encode(), digest_size=8).hexdigest()
        name = os.path.basename(spec.path.rstrip("/")) or "data"
        return str(self.root / f"{name}-{key}")

    def lock(self) -> None:
        """Hold this host's lock on the cache (the local leader, for the loader's lifetime). A private cache is
        removed at exit at the latest."""
        if not self.explicit:
            self.sweep_stale(self.base.parent, self.root.name)
            atexit.register(self.remove_if_private)
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ValueError(f"data cache folder {self.root} is in use by another loader on this host (another "
                             "job, or an unclosed loader in this process): give each job its own data.cache_dir")
        self._lock_fd = fd

    @staticmethod
    def sweep_stale(parent: Path, host: str, min_age_s: float = 600.0) -> int:
        """Remove private caches of this host left by loaders that died without cleaning up (a SIGKILL): older
        than `min_age_s` and not locked by a live leader. Returns how many were removed."""
        removed = 0
        for folder in parent.glob(f"*/{host}"):
            try:
                if time.time() - folder.stat().st_mtime < min_age_s:
                    continue
                fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live loader holds it
            finally:
                os.close(fd)  # also releases the lock we may have taken
            shutil.rmtree(folder, ignore_errors=True)
            try:
                folder.parent.rmdir()
            except OSError:
                pass
            removed += 1
        return removed

    def unlock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def remove_if_private(self) -> None:
        if not self.explicit:
            shutil.rmtree(self.base, ignore_errors=True)

    def remove_error_log(self) -> None:
        try:
            os.remove(self.error_log)
        except FileNotFoundError:
            pass


def refresh_index(spec: StreamSpec, local: str, policy: storage.RetryPolicy) -> None:
    """Put the stream's current MDS index.json into its cache folder, emptying the folder first when the cached
    copy differs (the data was rewritten: cached shards would be stale)."""
    fresh = storage.read_bytes(storage.join(spec.path, MDS_INDEX_NAME), policy)
    cached = Path(local) / MDS_INDEX_NAME
    if cached.is_file() and cached.read_bytes() != fresh:
        shutil.rmtree(local)
    Path(local).mkdir(parents=True, exist_ok=True)
    for leftover in glob.glob(os.path.join(local, "*.tmp")):
        os.remove(leftover)
    tmp = cached.with_suffix(f".{os.getpid()}.part")
    tmp.write_bytes(fresh)
    os.replace(tmp, cached)


def release_stale_shared_memory(locals_: List[str]) -> int:
    """Unlink Streaming's shared memory left by a dead loader over the same cache folders (a crashed run).

    Only called by the holder of the cache lock, so no live loader can be using these folders. Unlike
    Streaming's `clean_stale_shared_memory()` it leaves every other dataset on the host alone. Returns how
    many shared-memory blocks were removed."""
    if not os.path.isdir(SHM_DIR):
        return 0
    ours = {os.path.abspath(p) for p in locals_}
    removed = 0
    for path in glob.glob(os.path.join(SHM_DIR, "[0-9][0-9][0-9][0-9][0-9][0-9]_locals")):
        try:
            data = Path(path).read_bytes()
            size = int.from_bytes(data[:4], "little")
            theirs = data[4:size].decode("utf-8", "replace").split("\0")[:-1]
        except OSError:
            continue
        if not ours.intersection(theirs):
            continue
        prefix = os.path.basename(path).split("_", 1)[0]
        for block in glob.glob(os.path.join(SHM_DIR, f"{prefix}_*")):
            try:
                os.remove(block)
                removed += 1
            except OSError:
                pass
    return removed
