"""Our config sections <-> the config.json of the reference CALM release (and of stock Llama).

The reference field lists (calm-hf-format doc) are reproduced exactly; nothing else goes into a
CALM or autoencoder config.json except the keys every Hugging Face config carries
(``architectures``, ``model_type``, ``auto_map``, ``torch_dtype``, ``transformers_version``).
Values our configs do not hold (token ids, the autoencoder's unused ``max_position_embeddings``)
come from the tokenizer or from the HF config an imported checkpoint was made from.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional

from calm_megatron.config import AutoencoderConfig, ModelConfig

ARCH_AE, ARCH_CALM, ARCH_LLAMA = "Autoencoder", "EnergyTransformer", "LlamaForCausalLM"
KIND_OF_ARCH = {ARCH_AE: "ae", ARCH_CALM: "calm", ARCH_LLAMA: "ar"}
AE_MODEL_TYPE, CALM_MODEL_TYPE = "autoencoder", "energy"

# Field lists of the reference config.json files (calm-hf-format doc), besides the common HF keys.
AE_FIELDS = ("ae_dropout", "kl_clamp", "kl_weight", "patch_size", "vocab_size", "hidden_size", "intermediate_size",
             "num_encoder_layers", "num_decoder_layers", "latent_size", "hidden_act", "max_position_embeddings",
             "initializer_range", "rms_norm_eps", "pad_token_id", "bos_token_id", "eos_token_id",
             "tie_word_embeddings", "mlp_bias")
CALM_FIELDS = ("ae_path", "patch_size", "num_mlp_layers", "num_samples", "beta", "noise_size", "latent_size",
               "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
               "use_cache", "rope_theta", "rope_scaling", "attention_bias", "attention_dropout", "mlp_bias",
               "tie_word_embeddings", "pad_token_id", "bos_token_id", "eos_token_id")
COMMON_FIELDS = ("architectures", "model_type", "auto_map", "torch_dtype", "transformers_version")
AE_AUTO_MAP = {"AutoConfig": "configuration_autoencoder.AutoencoderConfig",
               "AutoModel": "modeling_autoencoder.Autoencoder"}
CALM_AUTO_MAP = {"AutoConfig": "configuration_calm.CALMConfig", "AutoModel": "modeling_calm.EnergyTransformer"}
AE_CODE_FILES = ("configuration_autoencoder.py", "modeling_autoencoder.py")
CALM_CODE_FILES = ("configuration_calm.py", "modeling_calm.py") + AE_CODE_FILES
TOKEN_FIELDS = ("pad_token_id", "bos_token_id", "eos_token_id")
DEFAULT_AE_MAX_POSITIONS = 2048  # the autoencoder has no positions; Llama's default, as the reference stores


class HFConfigError(ValueError):
    """An HF config that is not one of the supported architectures, or not representable in ours."""


def _transformers_version() -> str:
    from calm_megatron.hf._compat import import_transformers

    return import_transformers().__version__


def _dtype_name(dtype: str) -> str:
    return {"fp32": "float32", "bf16": "bfloat16"}[dtype]


def _tokens(tokens: Optional[Dict[str, Optional[int]]]) -> Dict[str, Optional[int]]:
    tokens = tokens or {}
    return {key: tokens.get(key) for key in TOKEN_FIELDS}


# --------------------------------------------------------------------------- ours -> HF

def autoencoder_hf_config(ae: AutoencoderConfig, dtype: str = "fp32", tokens=None,
                          max_position_embeddings: int = DEFAULT_AE_MAX_POSITIONS) -> dict:
    """The reference Autoencoder config.json of our autoencoder section."""
    fields = {"ae_dropout": ae.dropout, "kl_clamp": ae.kl_clamp, "kl_weight": ae.kl_weight, "patch_size": ae.chunk_size,
              "vocab_size": ae.vocab_size, "hidden_size": ae.hidden_size, "intermediate_size": ae.intermediate_size,
              "num_encoder_layers": ae.num_encoder_layers, "num_decoder_layers": ae.num_decoder_layers,
              "latent_size": ae.latent_size, "hidden_act": "silu", "max_position_embeddings": max_position_embeddings,
              "initializer_range": ae.init_std, "rms_norm_eps": ae.rms_norm_eps, "tie_word_embeddings": False,
              "mlp_bias": False, **_tokens(tokens)}
    return {"architectures": [ARCH_AE], "model_type": AE_MODEL_TYPE, "auto_map": dict(AE_AUTO_MAP),
            "torch_dtype": _dtype_name(dtype), "transformers_version": _transformers_version(), **fields}


def calm_hf_config(model: ModelConfig, ae_path: str, dtype: str = "fp32", tokens=None) -> dict:
    """The reference EnergyTransformer config.json of our model section."""
    fields = {"ae_path": ae_path, "patch_size": model.chunk_size, "num_mlp_layers": model.head_blocks,
              "num_samples": model.num_samples, "beta": model.energy_alpha, "noise_size": model.noise_size,
              "latent_size": model.latent_size, **_backbone_fields(model), **_tokens(tokens)}
    return {"architectures": [ARCH_CALM], "model_type": CALM_MODEL_TYPE, "auto_map": dict(CALM_AUTO_MAP),
            "torch_dtype": _dtype_name(dtype), "transformers_version": _transformers_version(), **fields}


def _backbone_fields(model: ModelConfig) -> dict:
    return {"vocab_size": model.vocab_size, "hidden_size": model.hidden_size,
            "intermediate_size": model.intermediate_size, "num_hidden_layers": model.num_layers,
            "num_attention_heads": model.num_attention_heads,
            "num_key_value_heads": model.num_query_groups or model.num_attention_heads, "hidden_act": "silu",
            "max_position_embeddings": model.max_position_embeddings, "initializer_range": model.init_std,
            "rms_norm_eps": model.rms_norm_eps, "use_cache": True, "rope_theta": model.rope_theta,
            "rope_scaling": None, "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
            "tie_word_embeddings": False}


def llama_hf_config(model: ModelConfig, dtype: str = "fp32", tokens=None):
    """A stock ``LlamaConfig`` of the baseline (written with ``to_json_file``, as save_pretrained does)."""
    from calm_megatron.hf._compat import import_transformers

    transformers = import_transformers()
    fields = _backbone_fields(model)
    fields.update(_tokens(tokens))
    return transformers.LlamaConfig(architectures=[ARCH_LLAMA], torch_dtype=_dtype_name(dtype),
                                    head_dim=model.hidden_size // model.num_attention_heads, **fields)


# --------------------------------------------------------------------------- HF -> ours

def kind_of(config: dict, source: str = "config.json") -> str:
    """ae | calm | ar from an HF config dict; HFConfigError naming the architecture otherwise."""
    architectures = config.get("architectures") or []
    kinds = {KIND_OF_ARCH[a] for a in architectures if a in KIND_OF_ARCH}
    if len(kinds) != 1:
        raise HFConfigError(f"{source}: architectures={architectures} (model_type={config.get('model_type')!r}) is "
                            f"not one this converter reads; supported: {', '.join(KIND_OF_ARCH)}")
    return kinds.pop()


def _require(config: dict, keys, source: str) -> None:
    missing = [k for k in keys if k not in config]
    if missing:
        raise HFConfigError(f"{source}: missing config fields {missing}")


def _check_supported(config: dict, source: str, llama: bool) -> None:
    problems = []
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={config['hidden_act']!r} (only silu)")
    if config.get("mlp_bias", False):
        problems.append("mlp_bias=true")
    if llama:
        if config.get("attention_bias", False):
            problems.append("attention_bias=true")
        if config.get("rope_scaling") not in (None, {}):
            problems.append(f"rope_scaling={config['rope_scaling']!r} (only plain RoPE)")
        heads = config["num_attention_heads"]
        if config.get("head_dim") not in (None, config["hidden_size"] // heads):
            problems.append(f"head_dim={config['head_dim']} != hidden_size/num_attention_heads")
        if config["hidden_size"] % heads:
            problems.append("hidden_size not divisible by num_attention_heads")
    if problems:
        raise HFConfigError(f"{source}: unsupported settings: {'; '.join(problems)}")


def ae_config_from_hf(config: dict, base: Optional[AutoencoderConfig] = None,
                      source: str = "config.json") -> AutoencoderConfig:
    """Our autoencoder section from a reference Autoencoder config.json (``base`` for our extra fields)."""
    _require(config, ("vocab_size", "hidden_size", "intermediate_size", "latent_size", "patch_size"), source)
    _check_supported(config, source, llama=False)
    base = base or AutoencoderConfig()
    return dataclasses.replace(
        base, vocab_size=config["vocab_size"], chunk_size=config["patch_size"], hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"], latent_size=config["latent_size"],
        num_encoder_layers=config.get("num_encoder_layers", 2), num_decoder_layers=config.get("num_decoder_layers", 2),
        kl_weight=config.get("kl_weight", 1e-3), kl_clamp=config.get("kl_clamp", 0.5),
        dropout=config.get("ae_dropout", 0.15), rms_norm_eps=config.get("rms_norm_eps", 1e-6),
        init_std=config.get("initializer_range", 0.02))


def model_config_from_hf(config: dict, kind: str, base: Optional[ModelConfig] = None,
                         source: str = "config.json") -> ModelConfig:
    """Our model section from an EnergyTransformer or Llama config.json (``base`` for our extra fields)."""
    _require(config, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                      "num_attention_heads"), source)
    _check_supported(config, source, llama=True)
    base = base or ModelConfig()
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    fields = dict(vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
                  intermediate_size=config["intermediate_size"], num_layers=config["num_hidden_layers"],
                  num_attention_heads=heads, num_query_groups=0 if kv == heads else kv,
                  max_position_embeddings=config.get("max_position_embeddings", 2048),
                  rope_theta=float(config.get("rope_theta", 10000.0)), rms_norm_eps=config.get("rms_norm_eps", 1e-6),
                  init_std=config.get("initializer_range", 0.02))
    if kind == "calm":
        _require(config, ("patch_size", "latent_size", "num_mlp_layers", "noise_size"), source)
        fields.update(chunk_size=config["patch_size"], latent_size=config["latent_size"],
                      head_blocks=config["num_mlp_layers"], noise_size=config["noise_size"],
                      num_samples=config.get("num_samples", 8), energy_alpha=float(config.get("beta", 1.0)))
    return dataclasses.replace(base, **fields)
