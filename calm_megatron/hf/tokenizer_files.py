"""Tokenizer files for Hugging Face folders, and back.

Our runs name a sentencepiece ``.model`` or an HF ``tokenizer.json`` (``data.tokenizer``). An exported
folder gets files ``AutoTokenizer`` loads with the same ids:
- sentencepiece: ``tokenizer.model`` + a ``LlamaTokenizer`` config in legacy mode (the model's own
  normalisation, no added prefix space), BOS added by default as our documents start with BOS;
- tokenizer.json: the file itself (with "[PAD]" added when our loader added it), plus the
  ``tokenizer_config.json``/``special_tokens_map.json`` found beside it, else a generated config.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Dict, Optional

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt")


def token_ids(tokenizer) -> Dict[str, Optional[int]]:
    """pad/bos/eos ids of one of our tokenizers (None where undefined)."""
    def valid(value):
        return None if value is None or value < 0 else int(value)
    return {"pad_token_id": valid(tokenizer.pad_id), "bos_token_id": valid(tokenizer.bos_id),
            "eos_token_id": valid(tokenizer.eos_id)}


def write_tokenizer_files(tokenizer, folder: Path, max_length: int) -> None:
    """Write HF tokenizer files for one of our tokenizers (``calm_megatron.data.tokenizer.Tokenizer``)."""
    folder.mkdir(parents=True, exist_ok=True)
    if tokenizer.kind == "sentencepiece":
        shutil.copyfile(tokenizer.path, folder / "tokenizer.model")
        piece = tokenizer._spm.id_to_piece
        special = {"bos_token": piece(tokenizer.bos_id), "eos_token": piece(tokenizer.eos_id),
                   "pad_token": piece(tokenizer.pad_id)}
        if tokenizer.unk_id >= 0:
            special["unk_token"] = piece(tokenizer.unk_id)
        config = {"tokenizer_class": "LlamaTokenizer", "legacy": True, "add_prefix_space": False,
                  "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
                  "spaces_between_special_tokens": False, "model_max_length": max_length, **special}
        _dump(folder / "tokenizer_config.json", config)
        _dump(folder / "special_tokens_map.json", special)
        return
    source = Path(tokenizer.path)
    original = json.loads(source.read_text())
    added = {t["content"] for t in original.get("added_tokens", [])}
    vocab = original.get("model", {}).get("vocab", {})
    pad_in_file = (tokenizer._hf.id_to_token(tokenizer.pad_id) in added or
                   tokenizer._hf.id_to_token(tokenizer.pad_id) in vocab)
    if pad_in_file:
        shutil.copyfile(source, folder / "tokenizer.json")
    else:  # our loader appended "[PAD]": keep that id
        tokenizer._hf.save(str(folder / "tokenizer.json"))
    beside = [name for name in ("tokenizer_config.json", "special_tokens_map.json")
              if (source.parent / name).is_file()]
    for name in beside:
        shutil.copyfile(source.parent / name, folder / name)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {
        "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
        "model_max_length": max_length}
    to_token = tokenizer._hf.id_to_token
    for key, token_id in (("bos_token", tokenizer.bos_id), ("eos_token", tokenizer.eos_id),
                          ("pad_token", tokenizer.pad_id)):
        config.setdefault(key, to_token(token_id))
    _dump(config_path, config)


def copy_tokenizer_files(source: Path, target: Path) -> bool:
    """Copy the tokenizer files of an HF folder; True when any was found."""
    found = [name for name in TOKENIZER_FILES if (source / name).is_file()]
    if found:
        target.mkdir(parents=True, exist_ok=True)
    for name in found:
        shutil.copyfile(source / name, target / name)
    return bool(found)


def _dump(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
