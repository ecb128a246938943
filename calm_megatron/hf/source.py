"""A Hugging Face folder in the reference CALM format (or stock Llama), read as our canonical tensors.

:class:`HFSource` checks the folder before any tensor is converted: its architecture must be one we
read (``Autoencoder``, ``EnergyTransformer``, ``LlamaForCausalLM``), every expected tensor must be
present under its name or an alias (the reference lists the CALM head under both ``mlp_generator.``
and ``generative_head.``, the autoencoder's tied table under ``encoder.embed_tokens.weight`` and
``decoder.lm_head_weight``: either or both are accepted, and both must then be equal), shapes must
match the config, dtypes must be floating (fp32/bf16/fp16). Every error names the tensor.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

import torch

from calm_megatron import config as C
from calm_megatron.hf import configs as H
from calm_megatron.hf import mapping
from calm_megatron.hf.tensor_io import HFWeights, WeightsError

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
PROVENANCE = "calm_megatron.json"


class HFFormatError(ValueError):
    """An HF folder that does not hold a model we can read, or holds it wrongly."""


def is_hf_folder(path: os.PathLike) -> bool:
    """True for a folder with an HF ``config.json`` (and not one of our checkpoint steps/runs)."""
    p = Path(path)
    return (p.is_dir() and (p / "config.json").is_file() and not (p / "trainer_state.json").is_file()
            and not (p / "latest").is_file() and not (p / "checkpoints").is_dir())


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise HFFormatError(f"{folder}: no config.json (not a Hugging Face model folder)")
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise HFFormatError(f"{path}: not valid JSON: {err}") from None


class HFSource:
    """The model in an HF folder: kind, our config sections, and canonical tensors on demand."""

    def __init__(self, folder: os.PathLike, ae_folder: Optional[os.PathLike] = None):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise HFFormatError(f"{self.folder}: not a folder")
        self.config = _read_config(self.folder)
        try:
            self.kind = H.kind_of(self.config, str(self.folder / "config.json"))
        except H.HFConfigError as err:
            raise HFFormatError(str(err)) from None
        try:
            self.weights = HFWeights(self.folder)
        except WeightsError as err:
            raise HFFormatError(str(err)) from None
        base = self._our_config_base()
        self.ae_config_dict: Dict = {}
        try:
            self.model_cfg = (H.model_config_from_hf(self.config, self.kind, base.model, str(self.folder / "config.json"))
                              if self.kind != "ae" else None)
            self.ae_cfg = self._autoencoder_config(base.autoencoder, ae_folder)
        except H.HFConfigError as err:
            raise HFFormatError(str(err)) from None
        self.rules = mapping.rules_for(self.kind, self.model_cfg, self.ae_cfg)
        self.params = mapping.params_of(self.rules)
        self.expected = mapping.hf_shapes(self.kind, self.model_cfg, self.ae_cfg)
        self.shapes = mapping.canonical_shapes(self.rules, self.expected)
        # A Llama with tied embeddings may store no lm_head.weight: the embedding is the LM head.
        self.fallbacks: Dict[str, str] = {}
        if self.kind == "ar" and self.config.get("tie_word_embeddings") and "lm_head.weight" not in self.weights:
            self.fallbacks["lm_head.weight"] = "model.embed_tokens.weight"
        self._check()

    # ----------------------------------------------------------------- configs

    def _our_config_base(self) -> C.Config:
        """Our extra fields (num_targets, variational AE, ...) from the provenance file of our own exports."""
        path = self.folder / PROVENANCE
        if path.is_file():
            try:
                return C.from_dict(json.loads(path.read_text())["config"])
            except (ValueError, KeyError, C.ConfigError):
                pass
        return C.Config()

    def _autoencoder_config(self, base: C.AutoencoderConfig, ae_folder) -> Optional[C.AutoencoderConfig]:
        if self.kind == "ar":
            return None
        if self.kind == "ae":
            self.ae_config_dict = self.config
            return H.ae_config_from_hf(self.config, base, str(self.folder / "config.json"))
        folder = self._find_ae_folder(ae_folder)
        shapes = {name: self.weights.shape(name) for name in self.weights.names()}
        if folder is not None:
            self.ae_config_dict = _read_config(folder)
            if H.kind_of(self.ae_config_dict, str(folder / "config.json")) != "ae":
                raise HFFormatError(f"{folder}: ae_path names a folder that is not an Autoencoder")
            ae = H.ae_config_from_hf(self.ae_config_dict, base, str(folder / "config.json"))
        else:  # the autoencoder's folder is elsewhere (a hub id): its sizes are in the weights' shapes
            ae = dataclasses.replace(base, rms_norm_eps=self.config.get("rms_norm_eps", base.rms_norm_eps),
                                     init_std=self.config.get("initializer_range", base.init_std))
        try:
            sizes = mapping.infer_autoencoder_shapes(shapes, hf_prefix=mapping.AE_PREFIX_HF)
        except KeyError as err:
            if folder is not None:
                return ae  # the tensor check names what is missing
            raise HFFormatError(f"{self.folder}: tensor {err.args[0]} is missing, and without it (and without the "
                                f"folder ae_path={self.config.get('ae_path')!r}) the autoencoder's sizes are "
                                "unknown") from None
        inferred = dataclasses.replace(ae, vocab_size=self.config["vocab_size"], **sizes)
        if folder is not None and inferred != ae:
            raise HFFormatError(f"{self.folder}: the autoencoder weights under '{mapping.AE_PREFIX_HF}' do not match "
                                f"the config of {folder} ({_diff(ae, inferred)})")
        return inferred

    def _find_ae_folder(self, ae_folder) -> Optional[Path]:
        if ae_folder is not None:
            return Path(ae_folder)
        ae_path = self.config.get("ae_path")
        if not ae_path:
            return None
        for candidate in (self.folder / ae_path, Path(ae_path)):
            if (candidate / "config.json").is_file():
                return candidate
        return None

    # ----------------------------------------------------------------- checks

    def _check(self) -> None:
        known = set(self.expected)
        unexpected = [n for n in self.weights.names() if n not in known]
        if unexpected:
            raise HFFormatError(f"{self.folder}: tensor {unexpected[0]} (and {len(unexpected) - 1} more) is not "
                                f"part of a {self.config['architectures'][0]} with this config")
        for rule in self.rules:
            for name in rule.hf:
                candidates = (name,) + rule.aliases.get(name, ())
                if not any(c in self.weights for c in candidates) and name not in self.fallbacks:
                    also = f" (or {', '.join(candidates[1:])})" if len(candidates) > 1 else ""
                    raise HFFormatError(f"{self.folder}: tensor {name}{also} is missing from "
                                        f"{self.weights.source}")
        for name in self.weights.names():
            shape, dtype = self.weights.shape(name), self.weights.dtype(name)
            if tuple(shape) != tuple(self.expected[name]):
                raise HFFormatError(f"{self.folder}: tensor {name} has shape {tuple(shape)}, the config implies "
                                    f"{tuple(self.expected[name])}")
            if dtype not in FLOAT_DTYPES:
                raise HFFormatError(f"{self.folder}: tensor {name} has dtype {dtype}; expected float32, bfloat16 "
                                    f"or float16 ({self.weights.file_of(name).name})")

    # ----------------------------------------------------------------- tensors

    def _hf_tensor(self, name: str, aliases: Tuple[str, ...]) -> torch.Tensor:
        present = [c for c in (name,) + aliases if c in self.weights] or [self.fallbacks[name]]
        tensor = self.weights.get(present[0])
        for other in present[1:]:
            if not torch.equal(tensor, self.weights.get(other)):
                raise HFFormatError(f"{self.folder}: tensors {present[0]} and {other} must be the same tensor "
                                    "(the reference stores it twice) but differ")
        return tensor.to(torch.float32)

    def tensors(self, rules=None) -> Iterator[Tuple[str, torch.Tensor]]:
        """(canonical name, full fp32 tensor) of every parameter, one rule at a time."""
        for rule in rules if rules is not None else self.rules:
            inputs = [self._hf_tensor(name, rule.aliases.get(name, ())) for name in rule.hf]
            for param, tensor in zip(rule.ours, rule.to_ours(*inputs)):
                yield param.name, tensor.contiguous()


def _diff(a, b) -> str:
    return ", ".join(f"{f.name} {getattr(a, f.name)} vs {getattr(b, f.name)}"
                     for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name))
