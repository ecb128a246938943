"""Reading and checking shard folders, local or `s3://bucket/prefix`: calm_index.json, MDS's index.json, hash
verification, and direct block reads (evaluation).

A shard folder holds MDS shards (column `tokens`, `ndarray:uint32`, zstd, xxh64 hashes), MDS's `index.json`,
and our `calm_index.json` describing how the blocks were made; `check_shard_index` compares it with a run.
Several folders may be given as one comma-separated string (a mixture of streams): each is checked.

Remote folders are read through `calm_megatron.data.storage` (retries, clear errors); their shard files are
downloaded into a cache folder and hash-verified before use.
"""
from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, List, Optional

import numpy as np

from calm_megatron.data import storage
from calm_megatron.data.errors import DataCorruptionError, DataNotFoundError
from calm_megatron.data.tokenizer import Tokenizer, tokenizer_fingerprint
from calm_megatron.hashing import file_digest

FORMAT_VERSION = 1
INDEX_NAME = "calm_index.json"
MDS_INDEX_NAME = "index.json"
COLUMNS = {"tokens": "ndarray:uint32"}
COMPRESSION = "zstd"
HASH = "xxh64"
PACKINGS = ("ae", "lm")
STAGE_PACKING = {"ae": "ae", "calm": "lm", "ar": "lm"}


class ShardCorruptError(DataCorruptionError, ValueError):
    """A shard file is missing, has the wrong size or the wrong xxh64 (a ValueError, as checks raise)."""


def split_paths(paths) -> List[str]:
    """The shard folders of a comma-separated list (a single folder is a list of one)."""
    items = [p.strip() for p in str(paths).split(",")] if paths else []
    if not items or not all(items):
        raise ValueError(f"{paths!r}: expected one shard folder or a comma-separated list of them")
    for item in items:
        storage.check_supported(item)
    return items


# ---------------------------------------------------------------- index files

def read_shard_index(path) -> dict:
    """calm_index.json of a shard folder (local or s3://); ValueError naming the folder when it is missing or
    unreadable, DataStorageError when the store cannot be reached."""
    path = str(path)
    storage.check_supported(path)
    if storage.is_remote(path):
        try:
            data = storage.read_bytes(storage.join(path, INDEX_NAME))
        except DataNotFoundError:
            raise ValueError(f"{storage.describe(path)} has no {INDEX_NAME} (write shards with "
                             "tools/prepare_data.py)") from None
        where = storage.join(path, INDEX_NAME)
    else:
        folder = Path(path)
        if not folder.is_dir():
            raise ValueError(f"shard folder {path} does not exist")
        index_path = folder / INDEX_NAME
        if not index_path.is_file():
            raise ValueError(f"{path} has no {INDEX_NAME} (write shards with tools/prepare_data.py)")
        data, where = index_path.read_bytes(), str(index_path)
    try:
        return json.loads(data)
    except ValueError as err:
        raise ValueError(f"{where} is not valid JSON: {err}") from None


def read_mds_index(path) -> dict:
    """MDS's index.json of a shard folder (local or s3://)."""
    path = str(path)
    if storage.is_remote(path):
        try:
            return json.loads(storage.read_bytes(storage.join(path, MDS_INDEX_NAME)))
        except DataNotFoundError:
            raise ValueError(f"{storage.describe(path)} has no MDS {MDS_INDEX_NAME}") from None
    index_path = Path(path) / MDS_INDEX_NAME
    if not index_path.is_file():
        raise ValueError(f"{path} has no MDS {MDS_INDEX_NAME}")
    return json.loads(index_path.read_text())


def data_fingerprint(path) -> str:
    """16 hex characters identifying the content of a shard folder (its MDS index: shard names, sizes, hashes),
    the same wherever the folder is stored."""
    index = read_mds_index(path)
    return hashlib.sha256(json.dumps(index["shards"], sort_keys=True).encode()).hexdigest()[:16]


def check_shard_index(path, stage, chunk_size, vocab_size, seq_len, tokenizer=None) -> dict:
    """Check that the shards in `path` fit a run; returns calm_index.json. Raises a one-line ValueError naming
    the folder and both values on any disagreement.

    stage "ae" needs packing "ae" written with the same K; stages "calm"/"ar" need packing "lm" whose
    seq_len is a multiple of K (LM blocks do not depend on K). vocab_size and seq_len must be equal, and
    when `tokenizer` (a path or a Tokenizer) is given its fingerprint must match the one the shards used.
    `path` may be a comma-separated list of folders (local or s3://): each is checked, and the index of the
    first is returned with `num_samples` summed over all of them.
    """
    if stage not in STAGE_PACKING:
        raise ValueError(f"stage {stage!r} not in {sorted(STAGE_PACKING)}")
    paths = split_paths(path)
    indexes = [_check_one(p, stage, chunk_size, vocab_size, seq_len, tokenizer) for p in paths]
    if len(indexes) == 1:
        return indexes[0]
    return dict(indexes[0], num_samples=sum(i["num_samples"] for i in indexes),
                num_tokens=sum(i.get("num_tokens", 0) for i in indexes), streams=paths)


def _check_one(path, stage, chunk_size, vocab_size, seq_len, tokenizer) -> dict:
    index = read_shard_index(path)
    want_packing = STAGE_PACKING[stage]

    def differ(what: str, theirs, ours) -> ValueError:
        return ValueError(f"{path}: shards were written with {what}={theirs} but the run uses {what}={ours}")

    if index.get("packing") != want_packing:
        raise differ("packing", index.get("packing"), f"{want_packing} (stage {stage})")
    if want_packing == "ae" and index.get("chunk_size") != chunk_size:
        raise differ("chunk_size", index.get("chunk_size"), chunk_size)
    if index.get("vocab_size") != vocab_size:
        raise differ("vocab_size", index.get("vocab_size"), vocab_size)
    if index.get("seq_len") != seq_len:
        raise differ("seq_len", index.get("seq_len"), seq_len)
    if want_packing == "lm" and seq_len % chunk_size:
        raise ValueError(f"{path}: LM blocks of seq_len={seq_len} do not split into chunks of K={chunk_size}")
    if tokenizer is not None:
        ours = tokenizer.fingerprint if isinstance(tokenizer, Tokenizer) else tokenizer_fingerprint(tokenizer)
        if index.get("tokenizer_fingerprint") != ours:
            raise ValueError(f"{path}: shards were tokenized with {index.get('tokenizer')} (fingerprint "
                             f"{index.get('tokenizer_fingerprint')}) but the run's tokenizer {tokenizer} has "
                             f"fingerprint {ours}")
    if not index.get("num_samples"):
        raise ValueError(f"{path}: the shard folder holds zero samples")
    return index


def check_streams_agree(paths: List[str], indexes: List[dict]) -> None:
    """The streams of one mixture must be made the same way (packing, block length, K, tokenizer)."""
    keys = ("packing", "seq_len", "chunk_size", "vocab_size", "tokenizer_fingerprint")
    for path, index in zip(paths[1:], indexes[1:]):
        for key in keys:
            if key == "chunk_size" and indexes[0].get("packing") != "ae":
                continue
            if index.get(key) != indexes[0].get(key):
                raise ValueError(f"data streams disagree: {paths[0]} has {key}={indexes[0].get(key)} but {path} "
                                 f"has {key}={index.get(key)}")


# ---------------------------------------------------------------- shard files, local or cached from s3

_default_caches: List[str] = []


def _remove_default_caches() -> None:
    for folder in _default_caches:
        shutil.rmtree(folder, ignore_errors=True)


atexit.register(_remove_default_caches)


def shard_folder(path, cache_dir: Optional[str] = None) -> "ShardFolder":
    """The ShardFolder of `path` (one per path and cache folder in this process, so downloads are reused)."""
    key = (str(path), cache_dir or "", os.getpid())
    if key not in _folders:
        _folders[key] = ShardFolder(path, cache_dir)
    return _folders[key]


_folders: dict = {}


class ShardFolder:
    """The files of one shard folder: local paths as they are, remote objects downloaded into `cache_dir`
    (default: a private temporary folder of this process, removed at exit)."""

    def __init__(self, path, cache_dir: Optional[str] = None):
        self.path = str(path)
        self.remote = storage.is_remote(self.path)
        self.cache: Optional[Path] = None
        if self.remote:
            key = hashlib.blake2s(self.path.encode(), digest_size=8).hexdigest()
            if cache_dir:
                self.cache = Path(cache_dir) / "folders" / key
            else:
                root = tempfile.mkdtemp(prefix="calm_megatron_folders_")
                _default_caches.append(root)
                self.cache = Path(root) / key
            self.cache.mkdir(parents=True, exist_ok=True)

    def name(self, basename: str) -> str:
        """Where a file of this folder lives (local path or URL), for messages."""
        return storage.join(self.path, basename)

    def local_file(self, basename: str, refresh: bool = False) -> Path:
        """A local path holding the file (downloaded on first use when the folder is remote)."""
        if not self.remote:
            return Path(self.path) / basename
        local = self.cache / basename
        if refresh or not local.is_file():
            storage.download(self.name(basename), str(local))
        return local

    def has(self, basename: str) -> bool:
        return (Path(self.path) / basename).is_file() if not self.remote else True


def _file_problem(local: Path, info: dict) -> Optional[str]:
    expected = info["hashes"][HASH]
    if not local.is_file():
        return "is missing"
    if local.stat().st_size != info["bytes"]:
        return f"has {local.stat().st_size} bytes, its index says {info['bytes']}"
    if file_digest(local) != expected:
        return f"is corrupt: {HASH} mismatch with {MDS_INDEX_NAME}"
    return None


def _verified_file(folder: ShardFolder, info: dict) -> Path:
    """The local, verified copy of one shard file; a cached remote copy that fails is fetched once more."""
    if (info.get("hashes") or {}).get(HASH) is None:
        raise ShardCorruptError(f"shard file {folder.name(info['basename'])} was written without an {HASH} hash "
                                "and cannot be verified")
    local = folder.local_file(info["basename"])
    problem = _file_problem(local, info)
    if problem and folder.remote:
        local = folder.local_file(info["basename"], refresh=True)
        problem = _file_problem(local, info)
    if problem:
        raise ShardCorruptError(f"shard file {folder.name(info['basename'])} {problem}")
    return local


def verify_shards(path, cache_dir: Optional[str] = None) -> int:
    """Recompute the xxh64 of every shard file listed in MDS's index.json; returns how many files were checked.

    Local folders: checks the compressed file and, where Streaming has already decompressed it beside, the
    raw file too. Remote folders: downloads and checks every compressed file. Raises ShardCorruptError (a
    ValueError) naming the shard file on a missing file, a size or a hash mismatch.
    """
    folder = shard_folder(path, cache_dir)
    checked = 0
    for shard in read_mds_index(path)["shards"]:
        present = [info for info in (shard.get("zip_data"), shard["raw_data"]) if info and folder.has(info["basename"])]
        if folder.remote:
            present = [shard.get("zip_data") or shard["raw_data"]]
        if not present:
            main = shard.get("zip_data") or shard["raw_data"]
            raise ShardCorruptError(f"shard file {folder.name(main['basename'])} is missing")
        for info in present:
            _verified_file(folder, info)
            checked += 1
    return checked


def _shard_raw_bytes(folder: ShardFolder, shard: dict) -> bytes:
    """The raw MDS bytes of one shard, verified: the raw file when present, else the decompressed zip file."""
    raw, zipped = shard["raw_data"], shard.get("zip_data")
    if not zipped or (not folder.remote and folder.has(raw["basename"])):
        return _verified_file(folder, raw).read_bytes()
    if not folder.has(zipped["basename"]):
        raise ShardCorruptError(f"shard file {folder.name(zipped['basename'])} is missing")
    from streaming.base.compression import decompress
    return decompress(COMPRESSION, _verified_file(folder, zipped).read_bytes())


def num_blocks(path) -> int:
    """Number of samples (blocks) in a shard folder, from MDS's index.json."""
    return sum(shard["samples"] for shard in read_mds_index(path)["shards"])


def iter_blocks(path, start: int = 0, step: int = 1, stop: Optional[int] = None,
                cache_dir: Optional[str] = None) -> Iterator[tuple[int, np.ndarray]]:
    """(block index, uint32 tokens) for blocks start, start+step, ... < stop, in order, reading the MDS shards
    directly (no shared memory, no Streaming cache). Every shard is hash-verified before use; shards of a
    remote folder are downloaded into `cache_dir` (default: a private temporary folder)."""
    from calm_megatron.data.streaming_compat import import_streaming
    import_streaming()
    from streaming.base.format import reader_from_json

    folder = shard_folder(path, cache_dir)
    shards = read_mds_index(path)["shards"]
    total = sum(shard["samples"] for shard in shards)
    stop = total if stop is None else stop
    first = 0
    for shard in shards:
        last = first + shard["samples"]
        wanted = range(max(start, first + (start - first) % step), min(last, stop), step)
        if len(wanted):
            reader = reader_from_json(str(path), None, shard)
            data = _shard_raw_bytes(folder, shard)
            offsets = np.frombuffer(data, np.uint32, count=shard["samples"] + 1, offset=4)
            for block_id in wanted:
                i = block_id - first
                yield block_id, reader.decode_sample(data[offsets[i]:offsets[i + 1]])["tokens"]
        first = last
