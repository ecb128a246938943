"""Tokenized MDS shards: pack documents into fixed-length blocks, write, describe, verify and read them.

Two packing rules (one per training stage):
- "ae" (calm-spec 1.4, the autoencoder): each document is tokenized, gets EOS, and is right-padded with PAD to
  a multiple of K; documents are concatenated and cut into `seq_len`-token blocks (seq_len a multiple of K).
  No K-chunk straddles two documents, and the final partial block is padded with PAD, so no text is lost.
- "lm" (calm-spec 7.2, CALM and the AR baseline): BOS + tokens per document, concatenated with no EOS and
  cut into `seq_len`-token blocks; the remainder that does not fill a block is dropped.

Inputs: `.jsonl`/`.ndjson` files hold one document per line in a text field (default "text"); any other file
is plain UTF-8 text, one document per file (`txt_mode="file"`) or one document per blank-line separated
paragraph (`txt_mode="blank-line"`).

A shard folder holds MDS shards (column `tokens`, `ndarray:uint32`, zstd, xxh64 hashes), MDS's `index.json`,
and our `calm_index.json` describing how the blocks were made; `check_shard_index` compares it with a run.
`out` is a local folder or `s3://bucket/prefix` (endpoint from S3_ENDPOINT_URL, credentials from the AWS
variables): shards are uploaded as they are finished, MDS's index.json after them and calm_index.json last, so a
prefix without calm_index.json is never taken for a dataset. Reading and checking: `calm_megatron.data.shard_read`
(re-exported here).
"""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator, List, Optional

import numpy as np

from calm_megatron.data import storage
from calm_megatron.data.shard_read import (  # noqa: F401  (re-exported: the reading and checking API)
    COLUMNS, COMPRESSION, FORMAT_VERSION, HASH, INDEX_NAME, MDS_INDEX_NAME, PACKINGS, STAGE_PACKING,
    ShardCorruptError, check_shard_index, iter_blocks, num_blocks, read_mds_index, read_shard_index,
    split_paths, verify_shards)
from calm_megatron.data.tokenizer import Tokenizer, load_tokenizer

TXT_MODES = ("file", "blank-line")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
DEFAULT_SHARD_BYTES = 1 << 26


class InputError(ValueError):
    """An input file is missing, empty or malformed."""


# ---------------------------------------------------------------- documents

def validate_inputs(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Every input must be an existing, non-empty file; raises InputError naming the first one that is not."""
    paths = [Path(p) for p in inputs]
    if not paths:
        raise InputError("no input files given")
    for path in paths:
        if not path.exists():
            raise InputError(f"input file not found: {path}")
        if not path.is_file():
            raise InputError(f"input is not a file: {path}")
        if path.stat().st_size == 0:
            raise InputError(f"input file is empty: {path}")
    return paths


def _jsonl_documents(path: Path, text_key: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)[text_key]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise InputError(f"{path}:{line_no}: not a JSON object with a '{text_key}' field ({err})") from None
            if not isinstance(text, str):
                raise InputError(f"{path}:{line_no}: field '{text_key}' is not a string")
            yield text


def iter_documents(inputs: Iterable[str | os.PathLike], text_key: str = "text",
                   txt_mode: str = "file") -> Iterator[str]:
    """Documents of every input, in order (see the module docstring for the file formats)."""
    if txt_mode not in TXT_MODES:
        raise ValueError(f"txt_mode={txt_mode!r} not in {TXT_MODES}")
    for path in map(Path, inputs):
        if path.name.endswith(JSONL_SUFFIXES):
            yield from _jsonl_documents(path, text_key)
            continue
        text = path.read_text(encoding="utf-8")
        if txt_mode == "file":
            yield text
        else:
            yield from _paragraphs(text)


def _paragraphs(text: str) -> Iterator[str]:
    """Runs of non-blank lines; lines holding only whitespace separate documents."""
    lines: list[str] = []
    for line in text.split("\n") + [""]:
        if line.strip():
            lines.append(line)
        elif lines:
            yield "\n".join(lines)
            lines = []


# ---------------------------------------------------------------- packing

def pack_ae_document(ids: np.ndarray, chunk_size: int, eos_id: int, pad_id: int) -> np.ndarray:
    """ids + EOS, right-padded with PAD to a multiple of `chunk_size` (calm-spec 1.4)."""
    padding = -(len(ids) + 1) % chunk_size
    return np.concatenate([np.asarray(ids, np.uint32), np.array([eos_id] + [pad_id] * padding, np.uint32)])


def pack_lm_document(ids: np.ndarray, bos_id: int) -> np.ndarray:
    """BOS + ids (calm-spec 7.2)."""
    return np.concatenate([np.array([bos_id], np.uint32), np.asarray(ids, np.uint32)])


class BlockCutter:
    """Concatenates token arrays and cuts them into `seq_len`-token blocks."""

    def __init__(self, seq_len: int):
        self.seq_len = seq_len
        self._pending: list[np.ndarray] = []
        self._pending_len = 0

    def add(self, tokens: np.ndarray) -> list[np.ndarray]:
        """Append `tokens`; returns the blocks that are now complete."""
        self._pending.append(tokens)
        self._pending_len += len(tokens)
        if self._pending_len < self.seq_len:
            return []
        joined = np.concatenate(self._pending)
        num_full = len(joined) // self.seq_len
        cut = num_full * self.seq_len
        rest = joined[cut:]
        self._pending, self._pending_len = [rest], len(rest)
        return list(joined[:cut].reshape(num_full, self.seq_len))

    def finish(self, pad_id: Optional[int]) -> tuple[list[np.ndarray], int]:
        """The last partial block padded with `pad_id` (or dropped when pad_id is None), and the number of
        tokens padded (positive) or dropped (negative)."""
        if not self._pending_len:
            return [], 0
        rest = np.concatenate(self._pending)
        self._pending, self._pending_len = [], 0
        if pad_id is None:
            return [], -len(rest)
        padding = self.seq_len - len(rest)
        return [np.concatenate([rest, np.full(padding, pad_id, np.uint32)])], padding


# ---------------------------------------------------------------- tokenizing in worker processes

_worker_tokenizer: Optional[Tokenizer] = None


def _init_worker(tokenizer_path: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(tokenizer_path)


def _encode(text: str) -> np.ndarray:
    return np.asarray(_worker_tokenizer.encode(text), np.uint32)


class _Encoder:
    """Ordered, deterministic tokenization of a document stream, in-process or with a process pool.

    The pool is created (its workers forked) before streaming/torch are imported by the writer, and it
    is fed in bounded windows so that a huge input never piles up in the task queue.
    """

    def __init__(self, tokenizer_path: str, workers: int, window: int = 256):
        self.workers, self.window = workers, window
        self.pool = None
        if workers > 1:
            self.pool = multiprocessing.get_context().Pool(workers, _init_worker, (tokenizer_path,))
        else:
            _init_worker(tokenizer_path)

    def map(self, documents: Iterable[str]) -> Iterator[np.ndarray]:
        if self.pool is None:
            yield from map(_encode, documents)
            return
        documents = iter(documents)
        while batch := list(islice(documents, self.window * self.workers)):
            yield from self.pool.imap(_encode, batch, chunksize=max(1, len(batch) // (4 * self.workers)))

    def close(self, failed: bool = False) -> None:
        if self.pool is not None:
            if failed:
                self.pool.terminate()
            else:
                self.pool.close()
            self.pool.join()


# ---------------------------------------------------------------- writing

def _check_packing_args(packing: str, seq_len: int, chunk_size: Optional[int]) -> None:
    if packing not in PACKINGS:
        raise ValueError(f"packing={packing!r} not in {PACKINGS}")
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be >= 1")
    if packing == "ae" and (not chunk_size or chunk_size < 1):
        raise ValueError("packing 'ae' needs a chunk size K >= 1")
    if chunk_size and seq_len % chunk_size:
        raise ValueError(f"seq_len={seq_len} is not a multiple of the chunk size K={chunk_size}")


def _prepare_out_dir(out: Path, overwrite: bool) -> Path:
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"output folder {out} exists and is not empty (pass overwrite=True / --overwrite)")
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.parent.mkdir(parents=True, exist_ok=True)
    return staging


def _publish(staging: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)


class _RemoteSink:
    """Uploads each finished shard file of the local staging folder to the s3:// prefix, then deletes it, so the
    local disk holds only the shards in flight. MDS's index.json goes up after every shard."""

    def __init__(self, staging: Path, remote: str, threads: int = 4):
        self.staging, self.remote = staging, remote
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="calm-upload")
        self.pending: List[Future] = []
        self.max_pending = 2 * threads
        self.seen = 0

    def _upload(self, basename: str) -> None:
        local = self.staging / basename
        storage.upload_file(str(local), storage.join(self.remote, basename))
        local.unlink()

    def poll(self, writer) -> None:
        """Queue the shards `writer` finished since the last call; block while too many are in flight."""
        for shard in writer.shards[self.seen:]:
            basename = (shard.get("zip_data") or shard["raw_data"])["basename"]
            self.pending.append(self.pool.submit(self._upload, basename))
        self.seen = len(writer.shards)
        while len(self.pending) > self.max_pending:
            self.pending.pop(0).result()
        for future in [f for f in self.pending if f.done()]:
            self.pending.remove(future)
            future.result()

    def finish(self, writer) -> None:
        self.poll(writer)
        for future in self.pending:
            future.result()
        self.pending = []
        self._upload(MDS_INDEX_NAME)
        self.pool.shutdown()

    def abort(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _prepare_remote_out(out: str, overwrite: bool) -> None:
    """The bucket must exist; a non-empty prefix is refused unless `overwrite`, in which case calm_index.json is
    deleted first (the prefix stops being a dataset at once) and then everything else under it."""
    storage.check_bucket(out)
    existing = storage.list_objects(out)
    if existing and not overwrite:
        raise FileExistsError(f"{storage.describe(out)} is not empty ({len(existing)} objects; pass "
                              "overwrite=True / --overwrite)")
    if existing:
        index = storage.join(out, INDEX_NAME)
        if index in existing:
            storage.delete_objects([index])
        storage.delete_objects([url for url in existing if url != index])


def write_shards(inputs: list[str], tokenizer: str, out: str, packing: str, seq_len: int,
                 chunk_size: Optional[int] = None, workers: int = 1, text_key: str = "text",
                 txt_mode: str = "file", size_limit: int = DEFAULT_SHARD_BYTES, overwrite: bool = False,
                 progress: bool = True) -> dict:
    """Tokenize `inputs`, pack them (`packing` "ae" or "lm") and write MDS shards plus calm_index.json to `out`
    (a local folder or s3://bucket/prefix).

    Local: the folder is built beside `out` and renamed into place at the end, so `out` never holds a partial
    result. s3: shards are uploaded as they are finished and calm_index.json last, so readers (which require
    calm_index.json) never take a partial upload for a dataset. Returns the calm_index.json content. Raises
    InputError for bad inputs before any heavy work, DataStorageError when the store fails.
    """
    paths = validate_inputs(inputs)
    _check_packing_args(packing, seq_len, chunk_size)
    storage.check_supported(out)
    tok = load_tokenizer(tokenizer)
    remote = storage.is_remote(out)
    if remote:
        _prepare_remote_out(out, overwrite)
        staging = Path(tempfile.mkdtemp(prefix="calm_prepare_")) / "mds"  # MDSWriter creates it
        sink: Optional[_RemoteSink] = _RemoteSink(staging, out)
    else:
        staging, sink = _prepare_out_dir(Path(out), overwrite), None
    encoder = _Encoder(str(tok.path), workers)
    try:
        counts = _write_blocks(encoder, iter_documents(paths, text_key, txt_mode), tok, staging, packing,
                               seq_len, chunk_size, size_limit, progress, sink)
    except BaseException:
        encoder.close(failed=True)
        if sink is not None:
            sink.abort()
        shutil.rmtree(staging.parent if remote else staging, ignore_errors=True)
        raise
    encoder.close()
    if counts["num_samples"] == 0:
        shutil.rmtree(staging.parent if remote else staging, ignore_errors=True)
        if remote:
            storage.delete_objects(storage.list_objects(out))
        raise InputError(f"inputs {[str(p) for p in paths]} hold no text: no block was written")
    index = {"format_version": FORMAT_VERSION, "packing": packing, "tokenizer": tok.path.name,
             "tokenizer_fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size, "chunk_size": chunk_size,
             "seq_len": seq_len, **counts, "pad_id": tok.pad_id, "eos_id": tok.eos_id, "bos_id": tok.bos_id,
             "sources": [p.name for p in paths], "columns": COLUMNS, "compression": COMPRESSION, "hashes": [HASH]}
    index_bytes = (json.dumps(index, indent=2) + "\n").encode()
    if remote:
        storage.write_bytes(storage.join(out, INDEX_NAME), index_bytes)
        shutil.rmtree(staging.parent, ignore_errors=True)
    else:
        (staging / INDEX_NAME).write_bytes(index_bytes)
        _publish(staging, Path(out))
    return index


def _write_blocks(encoder: _Encoder, documents: Iterator[str], tok: Tokenizer, staging: Path, packing: str,
                  seq_len: int, chunk_size: Optional[int], size_limit: int, progress: bool,
                  sink: Optional[_RemoteSink] = None) -> dict:
    from tqdm import tqdm

    from calm_megatron.data.streaming_compat import import_streaming
    streaming = import_streaming()
    cutter = BlockCutter(seq_len)
    counts = {"num_samples": 0, "num_tokens": 0, "num_documents": 0, "num_text_tokens": 0,
              "num_pad_tokens": 0, "num_dropped_tokens": 0, "num_empty_documents": 0}
    bar = tqdm(desc=f"tokenizing ({packing}, seq_len {seq_len})", unit="doc",
               disable=not progress, dynamic_ncols=True)
    with streaming.MDSWriter(out=str(staging), columns=COLUMNS, compression=COMPRESSION, hashes=[HASH],
                             size_limit=size_limit) as writer:
        def emit(blocks: list[np.ndarray]) -> None:
            for block in blocks:
                writer.write({"tokens": block})
            counts["num_samples"] += len(blocks)
            if sink is not None and blocks:
                sink.poll(writer)

        for ids in encoder.map(_count_empty(documents, counts)):
            if packing == "ae":
                packed = pack_ae_document(ids, chunk_size, tok.eos_id, tok.pad_id)
                counts["num_pad_tokens"] += len(packed) - len(ids) - 1
            else:
                packed = pack_lm_document(ids, tok.bos_id)
            counts["num_documents"] += 1
            counts["num_text_tokens"] += len(ids)
            emit(cutter.add(packed))
            bar.update(1)
        blocks, padded = cutter.finish(tok.pad_id if packing == "ae" else None)
        emit(blocks)
    if sink is not None:
        sink.finish(writer)
    bar.close()
    counts["num_pad_tokens"] += max(padded, 0)
    counts["num_dropped_tokens"] = max(-padded, 0)
    counts["num_tokens"] = counts["num_samples"] * seq_len
    return counts


def _count_empty(documents: Iterator[str], counts: dict) -> Iterator[str]:
    """Skip empty documents (they would be a lone EOS or BOS), counting them."""
    for text in documents:
        if text:
            yield text
        else:
            counts["num_empty_documents"] += 1
