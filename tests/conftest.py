"""Shared pytest fixtures. Distributed tests launch their own torchrun jobs (see tests/dist_helpers.py)."""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def megatron_single():
    """A one-process gloo group with Megatron-Core parallel state (tp=1, pp=1) for model tests."""
    from calm_megatron import distributed
    from calm_megatron.hf.loading import ensure_runtime

    ensure_runtime(seed=1234)
    yield distributed.current_layout()


def _synthetic_documents(count: int, seed: int):
    import random

    rng = random.Random(seed)
    words = ["the", "king", "queen", "lord", "shall", "thou", "art", "speak", "night", "day", "love",
             "death", "sword", "heaven", "earth", "and", "of", "to", "in", "my", "his", "her", "is", "not"]
    for _ in range(count):
        sentences = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))).capitalize() + "."
                     for _ in range(rng.randint(2, 8))]
        yield " ".join(sentences)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A synthetic corpus, a 512-piece tokenizer and AE (K=4, 64) / LM (128) shards, made once per session."""
    import json

    from calm_megatron.data.shards import write_shards
    from calm_megatron.data.tokenizer import train_sentencepiece

    root = tmp_path_factory.mktemp("tiny_data")
    for split, count, seed in (("train", 600, 1), ("valid", 60, 2)):
        with open(root / f"{split}.jsonl", "w") as fh:
            for doc in _synthetic_documents(count, seed):
                fh.write(json.dumps({"text": doc}) + "\n")
    tok = train_sentencepiece([str(root / "train.jsonl")], str(root / "spm"), vocab_size=512)
    paths = {"root": root, "tokenizer": root / "spm.model", "vocab_size": tok.vocab_size}
    for split in ("train", "valid"):
        for packing, seq_len in (("ae", 64), ("lm", 128)):
            out = root / "shards" / packing / split
            write_shards([str(root / f"{split}.jsonl")], str(paths["tokenizer"]), str(out), packing=packing,
                         seq_len=seq_len, chunk_size=4)
            paths[f"{packing}_{split}"] = out
    return paths


def data_overrides(paths, packing: str = "ae") -> list:
    """Config overrides pointing a run at the `tiny_data` tokenizer and shards."""
    return [f"data.tokenizer={paths['tokenizer']}", f"data.train={paths[packing + '_train']}",
            f"data.valid={paths[packing + '_valid']}"]
