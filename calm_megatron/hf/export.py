"""Our checkpoint (any TP/PP/DP layout) -> a Hugging Face folder in the reference CALM format.

- autoencoder -> the reference ``Autoencoder`` folder;
- CALM -> the reference ``EnergyTransformer`` folder (the autoencoder under ``ae_model.``), plus the
  autoencoder as its own folder ``<out>/autoencoder``, which ``ae_path`` names (resolved against the
  CALM folder by our modeling code);
- baseline -> a stock ``LlamaForCausalLM`` folder (no remote code).
Each folder gets ``model.safetensors`` (sharded with an index past ``max_shard_bytes``), the tokenizer
files, ``generation_config.json``, and (CALM, AE) our self-contained ``configuration_*.py`` /
``modeling_*.py`` registered through ``auto_map``; ``calm_megatron.json`` records where it came from.

Tensors stream one rule at a time from the shard files to the output file: the model is never held
in memory, let alone twice.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from calm_megatron import config as C
from calm_megatron.hf import configs as H
from calm_megatron.hf import mapping
from calm_megatron.hf.shards import CheckpointReader
from calm_megatron.hf.tensor_io import (DEFAULT_MAX_SHARD_BYTES, ShardedSafetensorsWriter, iter_progress,
                                        write_json)
from calm_megatron.hf.tokenizer_files import TOKENIZER_FILES, token_ids, write_tokenizer_files

log = logging.getLogger("calm_megatron")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
AE_SUBFOLDER = "autoencoder"
PROVENANCE = "calm_megatron.json"
HF_STASH = "hf"  # inside an imported step: the HF configs it came from
TOKENIZER_STASH = "tokenizer"  # inside an imported step: the HF tokenizer files
CODE_DIR = Path(__file__).resolve().parent


def write_hf_weights(folder: Path, rules: List[mapping.Rule], get: Callable[[str], torch.Tensor],
                     shape_of: Callable[[str], tuple], dtype: torch.dtype, aliases: bool = True,
                     max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: bool = False,
                     desc: str = "writing") -> List[str]:
    """Convert and write every rule's tensors; returns the weight files written."""
    specs: Dict[str, tuple] = {}
    for rule in rules:  # plan on the meta device: shapes only
        outputs = rule.to_hf(*[torch.empty(shape_of(p.name), device="meta") for p in rule.ours])
        for name, tensor in zip(rule.hf, outputs):
            for target in (name,) + (rule.aliases.get(name, ()) if aliases else ()):
                specs[target] = (tuple(tensor.shape), dtype)
    writer = ShardedSafetensorsWriter(folder, specs, max_shard_bytes, metadata={"format": "pt"})
    try:
        for rule in iter_progress(rules, len(rules), desc, progress):
            outputs = rule.to_hf(*[get(p.name) for p in rule.ours])
            for name, tensor in zip(rule.hf, outputs):
                tensor = tensor.to(dtype)
                for target in (name,) + (rule.aliases.get(name, ()) if aliases else ()):
                    writer.write(target, tensor)
        return writer.close()
    except BaseException:
        writer.abort()
        raise


def _copy_code(folder: Path, files) -> None:
    for name in files:
        shutil.copyfile(CODE_DIR / name, folder / name)


def _read_stash(step: Path, name: str) -> dict:
    path = step / HF_STASH / name
    return json.loads(path.read_text()) if path.is_file() else {}


class _Tokenizer:
    """Where an export's tokenizer comes from, and how it is written."""

    def __init__(self, reader: CheckpointReader, override: Optional[str]):
        self.tokenizer, self.verbatim = None, None
        from calm_megatron.data.tokenizer import load_tokenizer

        candidates = []
        if override:
            candidates.append(Path(override))
        stash = reader.step / TOKENIZER_STASH
        if stash.is_dir():
            candidates.append(stash)
        if reader.cfg.data.tokenizer:
            candidates.append(Path(reader.cfg.data.tokenizer))
        for path in candidates:
            hf_files = path.is_dir() and any((path / f).is_file() for f in ("tokenizer_config.json", "tokenizer.json"))
            try:
                loaded = load_tokenizer(path)
            except (FileNotFoundError, ValueError, OSError) as err:
                loaded = None
                if not hf_files:
                    log.warning("tokenizer %s not usable: %s", path, err)
                    continue
            self.tokenizer, self.verbatim = loaded, (path if hf_files else None)
            break
        if self.tokenizer is None and self.verbatim is None:
            log.warning("no tokenizer found for %s (data.tokenizer=%r): the HF folder gets no tokenizer files; "
                        "pass --tokenizer", reader.step, reader.cfg.data.tokenizer)

    def ids(self, fallback: dict) -> dict:
        if self.tokenizer is not None:
            return token_ids(self.tokenizer)
        return {key: fallback.get(key) for key in H.TOKEN_FIELDS}

    def write(self, folder: Path, max_length: int) -> None:
        if self.verbatim is not None:
            for name in TOKENIZER_FILES:
                if (self.verbatim / name).is_file():
                    shutil.copyfile(self.verbatim / name, folder / name)
        elif self.tokenizer is not None:
            write_tokenizer_files(self.tokenizer, folder, max_length)


def _generation_config(folder: Path, tokens: dict, step: Path) -> None:
    """The imported folder's own generation_config.json if the step came from one, else the token ids."""
    stashed = step / HF_STASH / "generation_config.json"
    if stashed.is_file():
        shutil.copyfile(stashed, folder / "generation_config.json")
        return
    from calm_megatron.hf._compat import import_transformers

    transformers = import_transformers()
    fields = {k: v for k, v in tokens.items() if v is not None}
    transformers.GenerationConfig(**fields).to_json_file(str(folder / "generation_config.json"))


def _provenance(folder: Path, reader: CheckpointReader, dtype: str) -> None:
    write_json(folder / PROVENANCE, {"source_checkpoint": str(reader.step), "stage": reader.kind,
                                     "layout": {"tp": reader.tp, "pp": reader.pp}, "dtype": dtype,
                                     "config": C.to_dict(reader.cfg)})


def _prepare(folder: Path, overwrite: bool) -> None:
    if folder.exists() and any(folder.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{folder} exists and is not empty (use --overwrite to replace it)")
        if not (folder / "config.json").is_file():
            raise FileExistsError(f"{folder} is not empty and holds no config.json: not replacing it")
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)


def export_checkpoint(checkpoint: str, out: str, dtype: str = "fp32", *, tokenizer: Optional[str] = None,
                      head_aliases: bool = True, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                      overwrite: bool = False, progress: bool = False, check_manifest: bool = True) -> Path:
    """Write the HF folder of a step of ours (a step, a checkpoints folder or a run folder); returns it."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    reader = CheckpointReader(checkpoint, check_manifest=check_manifest)
    folder = Path(out)
    _prepare(folder, overwrite)
    source = _Tokenizer(reader, tokenizer)
    torch_dtype = DTYPES[dtype]
    if reader.kind == "calm":  # one tokenizer config for the CALM folder and its autoencoder folder
        max_length = reader.model_cfg.max_position_embeddings * reader.model_cfg.chunk_size
    elif reader.kind == "ar":
        max_length = reader.model_cfg.max_position_embeddings
    log.info("exporting %s (%s, tp=%d pp=%d) to %s as %s", reader.step, reader.kind, reader.tp, reader.pp, folder, dtype)
    if reader.kind in ("ae", "calm"):
        ae_folder = folder if reader.kind == "ae" else folder / AE_SUBFOLDER
        ae_folder.mkdir(parents=True, exist_ok=True)
        stash = _read_stash(reader.step, "autoencoder_config.json" if reader.kind == "calm" else "config.json")
        tokens = source.ids(stash)
        ae_config = H.autoencoder_hf_config(reader.ae_cfg, dtype, tokens, stash.get("max_position_embeddings",
                                                                                 H.DEFAULT_AE_MAX_POSITIONS))
        prefix = mapping.AE_PREFIX_OURS if reader.kind == "calm" else ""
        rules = mapping.autoencoder_rules(reader.ae_cfg, prefix, "")
        write_hf_weights(ae_folder, rules, reader.tensor, reader.shape, torch_dtype, True, max_shard_bytes,
                         progress, "autoencoder")
        write_json(ae_folder / "config.json", ae_config)
        _copy_code(ae_folder, H.AE_CODE_FILES)
        source.write(ae_folder, max_length if reader.kind == "calm" else ae_config["max_position_embeddings"])
        _generation_config(ae_folder, tokens, reader.step)
        _provenance(ae_folder, reader, dtype)
    if reader.kind == "calm":
        tokens = source.ids(_read_stash(reader.step, "config.json"))
        config = H.calm_hf_config(reader.model_cfg, AE_SUBFOLDER, dtype, tokens)
        write_hf_weights(folder, reader.rules, reader.tensor, reader.shape, torch_dtype, head_aliases,
                         max_shard_bytes, progress, "calm")
        write_json(folder / "config.json", config)
        _copy_code(folder, H.CALM_CODE_FILES)
        source.write(folder, max_length)
    elif reader.kind == "ar":
        tokens = source.ids(_read_stash(reader.step, "config.json"))
        write_hf_weights(folder, reader.rules, reader.tensor, reader.shape, torch_dtype, True, max_shard_bytes,
                         progress, "baseline")
        H.llama_hf_config(reader.model_cfg, dtype, tokens).to_json_file(str(folder / "config.json"), use_diff=True)
        source.write(folder, max_length)
    if reader.kind != "ae":
        _generation_config(folder, tokens, reader.step)
        _provenance(folder, reader, dtype)
    return folder
