"""Tokenizers: train a lossless sentencepiece model, and load either a sentencepiece `.model` or a Hugging Face
`tokenizer.json` behind one small interface.

Every tokenizer we hand out defines unk/bos/eos/pad: the autoencoder pads each document to a multiple of K
with PAD (calm-spec 1.4), and CALM/AR documents start with BOS (calm-spec 7.2). For a Hugging Face tokenizer
without a pad token we append "[PAD]", as the reference CALM does for Llama-3 (128256 + 1 = 128257).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path
from typing import Iterable, Iterator

HF_PAD_TOKEN = "[PAD]"
SPM_SPECIAL_IDS = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": 3}
# Token names tried, in order, when a tokenizer.json has no tokenizer_config.json beside it.
_HF_BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "[BOS]", "<|startoftext|>")
_HF_EOS_NAMES = ("<|end_of_text|>", "</s>", "<eos>", "[EOS]", "<|endoftext|>")
_HF_UNK_NAMES = ("<unk>", "[UNK]", "<|unk|>")


def file_fingerprint(path: str | os.PathLike) -> str:
    """First 16 hex characters of the file's sha256."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def resolve_tokenizer_file(path: str | os.PathLike) -> Path:
    """The tokenizer file behind `path`: a `.model`/`tokenizer.json` file, a folder holding one, or a
    sentencepiece prefix (`spm` for `spm.model`). Raises FileNotFoundError naming `path` otherwise."""
    p = Path(path)
    if p.is_file():
        return p
    if p.is_dir():
        if (p / "tokenizer.json").is_file():
            return p / "tokenizer.json"
        models = sorted(p.glob("*.model"))
        if len(models) == 1:
            return models[0]
    elif Path(str(p) + ".model").is_file():
        return Path(str(p) + ".model")
    raise FileNotFoundError(f"no tokenizer at {path} (expected a sentencepiece .model, a tokenizer.json, "
                            "or a folder holding exactly one of them)")


class Tokenizer:
    """A sentencepiece or Hugging Face tokenizer with explicit special ids.

    `encode` never adds special tokens: the shard writer adds BOS/EOS/PAD itself.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = resolve_tokenizer_file(path)
        self.fingerprint = file_fingerprint(self.path)
        if self.path.suffix == ".json":
            self.kind = "hf"
            self._init_hf()
        else:
            self.kind = "sentencepiece"
            self._init_spm()

    def _init_spm(self) -> None:
        import sentencepiece as spm
        self._spm = spm.SentencePieceProcessor(model_file=str(self.path))
        self.vocab_size = self._spm.get_piece_size()
        self.unk_id, self.bos_id = self._spm.unk_id(), self._spm.bos_id()
        self.eos_id, self.pad_id = self._spm.eos_id(), self._spm.pad_id()
        missing = [n for n, v in (("bos", self.bos_id), ("eos", self.eos_id), ("pad", self.pad_id)) if v < 0]
        if missing:
            raise ValueError(f"sentencepiece model {self.path} defines no {'/'.join(missing)} id; "
                             "retrain it with tools/train_tokenizer.py")

    def _init_hf(self) -> None:
        from tokenizers import Tokenizer as HFTokenizer
        self._hf = HFTokenizer.from_file(str(self.path))
        config = self._hf_config()
        if self._hf.token_to_id(HF_PAD_TOKEN) is None and not config.get("pad_token"):
            self._hf.add_special_tokens([HF_PAD_TOKEN])
        self.vocab_size = self._hf.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._hf_special_id(config.get("bos_token"), _HF_BOS_NAMES, "bos")
        self.eos_id = self._hf_special_id(config.get("eos_token"), _HF_EOS_NAMES, "eos")
        self.pad_id = self._hf_special_id(config.get("pad_token"), (HF_PAD_TOKEN,), "pad")
        unk = next((self._hf.token_to_id(n) for n in _HF_UNK_NAMES if self._hf.token_to_id(n) is not None), None)
        self.unk_id = -1 if unk is None else unk

    def _hf_config(self) -> dict:
        """tokenizer_config.json beside tokenizer.json, if any (names the bos/eos/pad tokens)."""
        config_path = self.path.with_name("tokenizer_config.json")
        if not config_path.is_file():
            return {}
        config = json.loads(config_path.read_text())
        for key in ("bos_token", "eos_token", "pad_token"):
            if isinstance(config.get(key), dict):  # AddedToken serialised as a dict
                config[key] = config[key].get("content")
        return config

    def _hf_special_id(self, configured: str | None, names: Iterable[str], role: str) -> int:
        for name in ([configured] if configured else []) + list(names):
            token_id = self._hf.token_to_id(name)
            if token_id is not None:
                return token_id
        raise ValueError(f"tokenizer {self.path} has no {role} token (tried {configured or ''} {list(names)})")

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without any special token."""
        if self.kind == "hf":
            return self._hf.encode(text, add_special_tokens=False).ids
        return self._spm.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; special tokens decode to their surface (sentencepiece: to nothing)."""
        ids = [int(i) for i in ids]
        if self.kind == "hf":
            return self._hf.decode(ids, skip_special_tokens=False)
        return self._spm.decode(ids)

    def __repr__(self) -> str:
        return (f"Tokenizer({self.kind}, {self.path.name}, vocab={self.vocab_size}, bos={self.bos_id}, "
                f"eos={self.eos_id}, pad={self.pad_id}, fingerprint={self.fingerprint})")


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a sentencepiece `.model` or a Hugging Face `tokenizer.json` (see `resolve_tokenizer_file`)."""
    return Tokenizer(path)


def tokenizer_vocab_size(path: str | os.PathLike) -> int:
    """Vocabulary size including added tokens (e.g. Llama-3 + [PAD] = 128257)."""
    return load_tokenizer(path).vocab_size


def tokenizer_fingerprint(path: str | os.PathLike) -> str:
    """16 hex characters of the sha256 of the tokenizer file."""
    return file_fingerprint(resolve_tokenizer_file(path))


def iter_text_lines(inputs: Iterable[str | os.PathLike], text_key: str = "text") -> Iterator[str]:
    """Non-empty lines of every document in jsonl (`text_key` field) or plain text files."""
    for path in inputs:
        with open(path, encoding="utf-8") as f:
            if str(path).endswith((".jsonl", ".ndjson")):
                for line in f:
                    if line.strip():
                        yield from (t for t in json.loads(line)[text_key].split("\n") if t.strip())
            else:
                yield from (line.rstrip("\n") for line in f if line.strip())


def sample_lines(inputs: Iterable[str | os.PathLike], max_lines: int, seed: int = 0,
                 text_key: str = "text") -> list[str]:
    """All lines, or a uniform sample of `max_lines` of them (reservoir sampling, deterministic per seed)."""
    rng = random.Random(seed)
    sample: list[str] = []
    for n, line in enumerate(iter_text_lines(inputs, text_key)):
        if n < max_lines:
            sample.append(line)
        else:
            j = rng.randrange(n + 1)
            if j < max_lines:
                sample[j] = line
    return sample


def train_sentencepiece(inputs: list[str], out_prefix: str, vocab_size: int, model_type: str = "bpe",
                        max_sentences: int = 400_000, seed: int = 0, text_key: str = "text",
                        num_threads: int | None = None) -> Tokenizer:
    """Train a lossless sentencepiece model on jsonl/txt `inputs`; writes `out_prefix`.model/.vocab.

    Exact round trip: identity normalization, no whitespace collapsing, no dummy prefix, whitespace-only
    pieces allowed, byte fallback for any character outside the vocabulary. Ids: unk 0, bos 1, eos 2, pad 3.
    Documents are split into lines (newlines and unseen characters become byte pieces) and at most
    `max_sentences` lines are sampled, which bounds the training time.
    """
    import sentencepiece as spm
    lines = sample_lines(inputs, max_sentences, seed=seed, text_key=text_key)
    if not lines:
        raise ValueError(f"no text found in {list(map(str, inputs))}")
    Path(out_prefix).parent.mkdir(parents=True, exist_ok=True)
    spm.set_random_generator_seed(seed)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(out_prefix), vocab_size=vocab_size,
        model_type=model_type, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, allow_whitespace_only_pieces=True, byte_fallback=True, split_digits=True,
        character_coverage=0.9995, max_sentence_length=1 << 16, hard_vocab_limit=False,
        num_threads=num_threads or os.cpu_count() or 1, minloglevel=2, **SPM_SPECIAL_IDS)
    return load_tokenizer(str(out_prefix) + ".model")


def round_trip_ok(tokenizer: Tokenizer, text: str) -> bool:
    """True when decode(encode(text)) == text."""
    return tokenizer.decode(tokenizer.encode(text)) == text

