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
"""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

from calm_megatron.data.tokenizer import Tokenizer, load_tokenizer, tokenizer_fingerprint

FORMAT_VERSION = 1
INDEX_NAME = "calm_index.json"
MDS_INDEX_NAME = "index.json"
COLUMNS = {"tokens": "ndarray:uint32"}
COMPRESSION = "zstd"
HASH = "xxh64"
PACKINGS = ("ae", "lm")
STAGE_PACKING = {"ae": "ae", "calm": "lm", "ar": "lm"}
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


def write_shards(inputs: list[str], tokenizer: str, out: str, packing: str, seq_len: int,
                 chunk_size: Optional[int] = None, workers: int = 1, text_key: str = "text",
                 txt_mode: str = "file", size_limit: int = DEFAULT_SHARD_BYTES, overwrite: bool = False,
                 progress: bool = True) -> dict:
    """Tokenize `inputs`, pack them (`packing` "ae" or "lm") and write MDS shards plus calm_index.json to `out`.

    The folder is built beside `out` and renamed into place at the end, so `out` never holds a partial
    result. Returns the calm_index.json content. Raises InputError for bad inputs before any heavy work.
    """
    paths = validate_inputs(inputs)
    _check_packing_args(packing, seq_len, chunk_size)
    tok = load_tokenizer(tokenizer)
    out_path = Path(out)
    staging = _prepare_out_dir(out_path, overwrite)
    encoder = _Encoder(str(tok.path), workers)
    try:
        counts = _write_blocks(encoder, iter_documents(paths, text_key, txt_mode), tok, staging, packing,
                               seq_len, chunk_size, size_limit, progress)
    except BaseException:
        encoder.close(failed=True)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    encoder.close()
    if counts["num_samples"] == 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise InputError(f"inputs {[str(p) for p in paths]} hold no text: no block was written")
    index = {"format_version": FORMAT_VERSION, "packing": packing, "tokenizer": tok.path.name,
             "tokenizer_fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size, "chunk_size": chunk_size,
             "seq_len": seq_len, **counts, "pad_id": tok.pad_id, "eos_id": tok.eos_id, "bos_id": tok.bos_id,
             "sources": [p.name for p in paths], "columns": COLUMNS, "compression": COMPRESSION, "hashes": [HASH]}
    (staging / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    _publish(staging, out_path)
    return index


def _write_blocks(encoder: _Encoder, documents: Iterator[str], tok: Tokenizer, staging: Path, packing: str,
                  seq_len: int, chunk_size: Optional[int], size_limit: int, progress: bool) -> dict:
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


# ---------------------------------------------------------------- checking

def read_shard_index(path: str | os.PathLike) -> dict:
    """calm_index.json of a shard folder; ValueError naming the folder when it is missing or unreadable."""
    folder = Path(path)
    if "://" in str(path):
        raise ValueError(f"{path}: remote shard folders are not supported yet; use a local or mounted path")
    if not folder.is_dir():
        raise ValueError(f"shard folder {path} does not exist")
    index_path = folder / INDEX_NAME
    if not index_path.is_file():
        raise ValueError(f"{path} has no {INDEX_NAME} (write shards with tools/prepare_data.py)")
    try:
        return json.loads(index_path.read_text())
    except ValueError as err:
        raise ValueError(f"{index_path} is not valid JSON: {err}") from None


def check_shard_index(path, stage, chunk_size, vocab_size, seq_len, tokenizer=None) -> dict:
    """Check that the shards in `path` fit a run; returns calm_index.json. Raises a one-line ValueError naming
    the folder and both values on any disagreement.

    stage "ae" needs packing "ae" written with the same K; stages "calm"/"ar" need packing "lm" whose
    seq_len is a multiple of K (LM blocks do not depend on K). vocab_size and seq_len must be equal, and
    when `tokenizer` (a path or a Tokenizer) is given its fingerprint must match the one the shards used.
    """
    if stage not in STAGE_PACKING:
        raise ValueError(f"stage {stage!r} not in {sorted(STAGE_PACKING)}")
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


def _mds_index(path: str | os.PathLike) -> dict:
    index_path = Path(path) / MDS_INDEX_NAME
    if not index_path.is_file():
        raise ValueError(f"{path} has no MDS {MDS_INDEX_NAME}")
    return json.loads(index_path.read_text())


def _file_xxh64(path: Path) -> str:
    import xxhash
    digest = xxhash.xxh64()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _verify_file(folder: Path, info: dict) -> None:
    path = folder / info["basename"]
    expected = (info.get("hashes") or {}).get(HASH)
    if expected is None:
        raise ValueError(f"shard file {path} was written without an {HASH} hash and cannot be verified")
    if path.stat().st_size != info["bytes"]:
        raise ValueError(f"shard file {path} has {path.stat().st_size} bytes, its index says {info['bytes']}")
    if _file_xxh64(path) != expected:
        raise ValueError(f"shard file {path} is corrupt: {HASH} mismatch with {folder / MDS_INDEX_NAME}")


def verify_shards(path: str | os.PathLike) -> int:
    """Recompute the xxh64 of every shard file listed in MDS's index.json; returns how many files were checked.

    Checks the compressed file and, where Streaming has already decompressed it beside, the raw file too.
    Raises ValueError naming the shard file on a missing file, a size or a hash mismatch.
    """
    folder = Path(path)
    checked = 0
    for shard in _mds_index(folder)["shards"]:
        present = [info for info in (shard.get("zip_data"), shard["raw_data"])
                   if info and (folder / info["basename"]).is_file()]
        if not present:
            main = shard.get("zip_data") or shard["raw_data"]
            raise ValueError(f"shard file {folder / main['basename']} is missing")
        for info in present:
            _verify_file(folder, info)
            checked += 1
    return checked


# ---------------------------------------------------------------- reading without Streaming's cache

def _shard_raw_bytes(folder: Path, shard: dict) -> bytes:
    """The raw MDS bytes of one shard, verified: the raw file when present, else the decompressed zip file."""
    raw = shard["raw_data"]
    if (folder / raw["basename"]).is_file():
        _verify_file(folder, raw)
        return (folder / raw["basename"]).read_bytes()
    zipped = shard.get("zip_data")
    if not zipped or not (folder / zipped["basename"]).is_file():
        raise ValueError(f"shard file {folder / (zipped or raw)['basename']} is missing")
    _verify_file(folder, zipped)
    from streaming.base.compression import decompress
    return decompress(COMPRESSION, (folder / zipped["basename"]).read_bytes())


def num_blocks(path: str | os.PathLike) -> int:
    """Number of samples (blocks) in a shard folder, from MDS's index.json."""
    return sum(shard["samples"] for shard in _mds_index(path)["shards"])


def iter_blocks(path: str | os.PathLike, start: int = 0, step: int = 1,
                stop: Optional[int] = None) -> Iterator[tuple[int, np.ndarray]]:
    """(block index, uint32 tokens) for blocks start, start+step, ... < stop, in order, reading the MDS shards
    directly (no shared memory, no cache writes). Every shard is hash-verified before use."""
    from calm_megatron.data.streaming_compat import import_streaming
    import_streaming()
    from streaming.base.format import reader_from_json

    folder = Path(path)
    shards = _mds_index(folder)["shards"]
    stop = num_blocks(folder) if stop is None else stop
    first = 0
    for shard in shards:
        last = first + shard["samples"]
        wanted = range(max(start, first + (start - first) % step), min(last, stop), step)
        if len(wanted):
            reader = reader_from_json(str(folder), None, shard)
            data = _shard_raw_bytes(folder, shard)
            offsets = np.frombuffer(data, np.uint32, count=shard["samples"] + 1, offset=4)
            for block_id in wanted:
                i = block_id - first
                yield block_id, reader.decode_sample(data[offsets[i]:offsets[i + 1]])["tokens"]
        first = last
