"""Streaming file digests shared by shards, checkpoints and the corpus fetcher."""
from __future__ import annotations

import hashlib
from pathlib import Path


def file_digest(path: Path, algorithm: str = "xxh64") -> str:
    """Hex digest of a file read in 4 MiB blocks: "xxh64" (fast, for integrity) or any hashlib name."""
    if algorithm == "xxh64":
        import xxhash

        digest = xxhash.xxh64()
    else:
        digest = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
