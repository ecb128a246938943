"""Parameter names and layouts: our models <-> the reference CALM release (and stock Llama).

One table of :class:`Rule` per model kind. A rule turns one or more of our *canonical* tensors (the
full, TP=1 / PP=1 parameters of our model, local-spec names) into one or more Hugging Face tensors,
and back. Tensor-parallel sharding, vocabulary padding and pipeline stages are not handled here but
by the checkpoint reader/writer (:mod:`calm_megatron.hf.shards`), from the per-parameter facts each
rule records (:class:`Param`). Everything is pure torch: the functions also run on ``meta`` tensors,
which is how shapes are planned before any data moves.

Layout differences the rules resolve:
- Megatron's fused QKV interleaves per query group ([q of the group's heads; k; v] for each group);
  HF has separate q/k/v with heads contiguous. RoPE is the rotate-half form in both, so no
  permutation inside a head is needed.
- Megatron's SwiGLU ``linear_fc1`` is [gates; ups] (full, after TP shards are regrouped); HF has
  ``gate_proj`` and ``up_proj``.
- Our energy head keeps the reference's Lin_{d->2d} as two column-parallel halves ``gate``/``value``;
  the reference has one ``linears.4`` of 2d outputs.
- The reference autoencoder lists its tied embedding twice (``encoder.embed_tokens.weight`` and
  ``decoder.lm_head_weight``) and the CALM head twice (``mlp_generator.*`` and ``generative_head.*``):
  those second names are *aliases*, written on export and accepted instead of (or beside) the first.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from calm_megatron.config import AutoencoderConfig, ModelConfig

KINDS = ("ae", "calm", "ar")
AE_PREFIX_OURS, AE_PREFIX_HF = "autoencoder.", "ae_model."
HEAD_HF, HEAD_ALIAS_HF = "mlp_generator.", "generative_head."


@dataclass(frozen=True)
class Param:
    """One canonical parameter of our model and how it is sharded in a checkpoint."""
    name: str
    partition_dim: int = -1  # TP partition dim (-1: replicated on every TP rank)
    swiglu: bool = False  # Megatron's linear_fc1: each TP shard is [its gates; its ups]
    vocab: bool = False  # rows are the vocabulary: padded to a multiple of TP in checkpoints
    trainable: bool = True  # False for the frozen autoencoder inside a CALM


@dataclass(frozen=True)
class Rule:
    """Our tensors ``ours`` <-> HF tensors ``hf`` (with optional alias names per HF tensor)."""
    ours: Tuple[Param, ...]
    hf: Tuple[str, ...]
    to_hf: Callable[..., Tuple[torch.Tensor, ...]]
    to_ours: Callable[..., Tuple[torch.Tensor, ...]]
    aliases: Dict[str, Tuple[str, ...]] = field(default_factory=dict)


def _identity(*tensors):
    return tuple(tensors)


def _one(ours: Param, hf: str, aliases: Tuple[str, ...] = ()) -> Rule:
    return Rule((ours,), (hf,), _identity, _identity, {hf: aliases} if aliases else {})


# --------------------------------------------------------------------------- layout transforms

def split_qkv(weight: torch.Tensor, heads: int, groups: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron's fused QKV [groups * (heads/groups + 2) * hd, d] -> HF q [heads*hd, d], k, v [groups*hd, d]."""
    per_group = heads // groups
    rows, hidden = weight.shape
    head_dim = rows // (groups * (per_group + 2))
    grouped = weight.reshape(groups, per_group + 2, head_dim, hidden)
    q = grouped[:, :per_group].reshape(heads * head_dim, hidden)
    k = grouped[:, per_group].reshape(groups * head_dim, hidden)
    v = grouped[:, per_group + 1].reshape(groups * head_dim, hidden)
    return q.contiguous(), k.contiguous(), v.contiguous()


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int) -> torch.Tensor:
    """Inverse of :func:`split_qkv`."""
    per_group = heads // groups
    hidden = q.shape[1]
    head_dim = q.shape[0] // heads
    grouped = torch.cat([q.reshape(groups, per_group, head_dim, hidden), k.reshape(groups, 1, head_dim, hidden),
                         v.reshape(groups, 1, head_dim, hidden)], dim=1)
    return grouped.reshape(groups * (per_group + 2) * head_dim, hidden)


def _halves(tensor: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    first, second = tensor.chunk(2, dim=0)
    return first.contiguous(), second.contiguous()


def _concat(*tensors: torch.Tensor) -> Tuple[torch.Tensor]:
    return (torch.cat(tensors, dim=0),)


# --------------------------------------------------------------------------- rule tables

def autoencoder_rules(cfg: AutoencoderConfig, ours_prefix: str = "", hf_prefix: str = "",
                      trainable: bool = True) -> List[Rule]:
    """The chunk autoencoder: ours ``encoder.layers_before_squeeze.i`` <-> ``encoder.encoder_layers.i`` etc."""
    o, h = ours_prefix, hf_prefix
    rules = [_one(Param(f"{o}encoder.embed_tokens.weight", 0, vocab=True, trainable=trainable),
                  f"{h}encoder.embed_tokens.weight", (f"{h}decoder.lm_head_weight",))]

    def layer(ours: str, hf: str) -> List[Rule]:
        return [_one(Param(f"{ours}.norm.weight", trainable=trainable), f"{hf}.layernorm.weight"),
                _one(Param(f"{ours}.mlp.gate_proj.weight", 0, trainable=trainable), f"{hf}.mlp.gate_proj.weight"),
                _one(Param(f"{ours}.mlp.up_proj.weight", 0, trainable=trainable), f"{hf}.mlp.up_proj.weight"),
                _one(Param(f"{ours}.mlp.down_proj.weight", 1, trainable=trainable), f"{hf}.mlp.down_proj.weight")]

    def linear(ours: str, hf: str) -> List[Rule]:
        return [_one(Param(f"{ours}.{p}", trainable=trainable), f"{hf}.{p}") for p in ("weight", "bias")]

    enc_half, dec_half = cfg.num_encoder_layers // 2, cfg.num_decoder_layers // 2
    for i in range(enc_half):
        rules += layer(f"{o}encoder.layers_before_squeeze.{i}", f"{h}encoder.encoder_layers.{i}")
    rules += linear(f"{o}encoder.squeeze", f"{h}encoder.squeeze_layer")
    for i in range(enc_half):
        rules += layer(f"{o}encoder.layers_after_squeeze.{i}", f"{h}encoder.encoder_layers.{enc_half + i}")
    rules += [_one(Param(f"{o}encoder.norm.weight", trainable=trainable), f"{h}encoder.norm.weight")]
    rules += linear(f"{o}encoder.hidden_to_latent", f"{h}encoder.hidden_to_latent")
    rules += linear(f"{o}decoder.latent_to_hidden", f"{h}decoder.latent_to_hidden")
    for i in range(dec_half):
        rules += layer(f"{o}decoder.layers_before_expand.{i}", f"{h}decoder.decoder_layers.{i}")
    rules += linear(f"{o}decoder.expand", f"{h}decoder.expand_layer")
    for i in range(dec_half):
        rules += layer(f"{o}decoder.layers_after_expand.{i}", f"{h}decoder.decoder_layers.{dec_half + i}")
    rules += [_one(Param(f"{o}decoder.norm.weight", trainable=trainable), f"{h}decoder.norm.weight")]
    return rules


def backbone_rules(cfg: ModelConfig, hf_prefix: str) -> List[Rule]:
    """Megatron-Core GPT layers (local spec names) <-> HF Llama decoder layers."""
    heads, groups = cfg.num_attention_heads, cfg.num_query_groups or cfg.num_attention_heads
    rules: List[Rule] = []
    for i in range(cfg.num_layers):
        o, h = f"backbone.decoder.layers.{i}", f"{hf_prefix}layers.{i}"
        rules += [
            _one(Param(f"{o}.input_layernorm.weight"), f"{h}.input_layernorm.weight"),
            Rule((Param(f"{o}.self_attention.linear_qkv.weight", 0),),
                 (f"{h}.self_attn.q_proj.weight", f"{h}.self_attn.k_proj.weight", f"{h}.self_attn.v_proj.weight"),
                 lambda w: split_qkv(w, heads, groups),
                 lambda q, k, v: (merge_qkv(q, k, v, heads, groups),)),
            _one(Param(f"{o}.self_attention.linear_proj.weight", 1), f"{h}.self_attn.o_proj.weight"),
            _one(Param(f"{o}.pre_mlp_layernorm.weight"), f"{h}.post_attention_layernorm.weight"),
            Rule((Param(f"{o}.mlp.linear_fc1.weight", 0, swiglu=True),),
                 (f"{h}.mlp.gate_proj.weight", f"{h}.mlp.up_proj.weight"), _halves, _concat),
            _one(Param(f"{o}.mlp.linear_fc2.weight", 1), f"{h}.mlp.down_proj.weight"),
        ]
    rules.append(_one(Param("backbone.decoder.final_layernorm.weight"), f"{hf_prefix}norm.weight"))
    return rules


def head_rules(cfg: ModelConfig) -> List[Rule]:
    """Our tensor-parallel energy head <-> the reference ``MLPGenerator`` (+ its ``generative_head`` alias)."""
    rules: List[Rule] = []

    def add(ours: Tuple[Param, ...], hf: str, to_hf=_identity, to_ours=_identity):
        alias = HEAD_ALIAS_HF + hf
        rules.append(Rule(ours, (HEAD_HF + hf,), to_hf, to_ours, {HEAD_HF + hf: (alias,)}))

    def linear(ours: str, hf: str, weight_dim: int, bias_dim: int):
        add((Param(f"head.{ours}.weight", weight_dim),), f"{hf}.weight")
        add((Param(f"head.{ours}.bias", bias_dim),), f"{hf}.bias")

    def norm(ours: str, hf: str):
        add((Param(f"head.{ours}.weight"),), f"{hf}.weight")
        add((Param(f"head.{ours}.bias"),), f"{hf}.bias")

    linear("noise_proj", "noise_embd", 0, 0)
    linear("hidden_proj", "hidden_embd", 0, 0)
    norm("noise_norm", "norm_noise")
    norm("hidden_norm", "norm_hidden")
    for j in range(cfg.head_blocks):
        o, h = f"blocks.{j}", f"mlp_blocks.{j}"
        norm(f"{o}.norm", f"{h}.in_ln")
        linear(f"{o}.fuse_in", f"{h}.linears.0", 0, 0)
        linear(f"{o}.fuse_out", f"{h}.linears.2", 1, -1)
        for part in ("weight", "bias"):
            add((Param(f"head.{o}.gate.{part}", 0), Param(f"head.{o}.value.{part}", 0)), f"{h}.linears.4.{part}",
                _concat, _halves)
        linear(f"{o}.out", f"{h}.down_proj", 1, -1)
    norm("final_norm", "final_layer.in_ln")
    linear("final_fc1", "final_layer.linears.0", 0, 0)
    linear("final_fc2", "final_layer.linears.2", 1, -1)
    return rules


def calm_rules(cfg: ModelConfig, ae_cfg: AutoencoderConfig) -> List[Rule]:
    """The reference EnergyTransformer: backbone, input compression, head and the frozen AE."""
    rules = [_one(Param("embedding.weight", 0, vocab=True), "transformer.embed_tokens.weight"),
             _one(Param("input_compression.fc1.weight", 0), "embed_proj.0.weight"),
             _one(Param("input_compression.fc1.bias", 0), "embed_proj.0.bias"),
             _one(Param("input_compression.fc2.weight", 1), "embed_proj.2.weight"),
             _one(Param("input_compression.fc2.bias"), "embed_proj.2.bias"),
             _one(Param("input_compression.norm.weight"), "embed_proj.3.weight"),
             _one(Param("input_compression.norm.bias"), "embed_proj.3.bias")]
    rules += backbone_rules(cfg, "transformer.")
    rules += head_rules(cfg)
    rules += autoencoder_rules(ae_cfg, AE_PREFIX_OURS, AE_PREFIX_HF, trainable=False)
    return rules


def ar_rules(cfg: ModelConfig) -> List[Rule]:
    """The baseline <-> stock ``LlamaForCausalLM`` (untied embedding and LM head)."""
    rules = [_one(Param("embedding.weight", 0, vocab=True), "model.embed_tokens.weight")]
    rules += backbone_rules(cfg, "model.")
    rules.append(_one(Param("output_layer.weight", 0, vocab=True), "lm_head.weight"))
    return rules


def rules_for(kind: str, model_cfg: Optional[ModelConfig] = None,
              ae_cfg: Optional[AutoencoderConfig] = None) -> List[Rule]:
    """The rule table of a model kind (ae | calm | ar)."""
    if kind == "ae":
        return autoencoder_rules(ae_cfg)
    if kind == "calm":
        return calm_rules(model_cfg, ae_cfg)
    if kind == "ar":
        return ar_rules(model_cfg)
    raise ValueError(f"unknown model kind {kind!r}; expected one of {', '.join(KINDS)}")


def params_of(rules: List[Rule]) -> Dict[str, Param]:
    """Our canonical parameters, by name, in rule order."""
    return {p.name: p for rule in rules for p in rule.ours}


def hf_names_of(rules: List[Rule], with_aliases: bool = True) -> List[str]:
    names = []
    for rule in rules:
        for name in rule.hf:
            names.append(name)
            if with_aliases:
                names.extend(rule.aliases.get(name, ()))
    return names


# --------------------------------------------------------------------------- checkpoint names

_LAYER = re.compile(r"^backbone\.decoder\.layers\.(\d+)\.(.+)$")
# Transformer Engine's spec fuses the pre-attention and pre-MLP norms into the following linears.
TE_NAMES = {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
            "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight"}


def layer_index(name: str) -> Optional[int]:
    match = _LAYER.match(name)
    return int(match.group(1)) if match else None


def with_layer_index(name: str, index: int) -> str:
    match = _LAYER.match(name)
    return f"backbone.decoder.layers.{index}.{match.group(2)}"


def canonical_name(name: str) -> str:
    """A checkpoint name with Transformer Engine's fused-norm names mapped to the local spec's."""
    match = _LAYER.match(name)
    if match and match.group(2) in TE_NAMES:
        return f"backbone.decoder.layers.{match.group(1)}.{TE_NAMES[match.group(2)]}"
    return name


def te_name(name: str) -> str:
    """The Transformer Engine spec's name of a canonical (local spec) parameter name."""
    match = _LAYER.match(name)
    if match:
        for te, local in TE_NAMES.items():
            if match.group(2) == local:
                return f"backbone.decoder.layers.{match.group(1)}.{te}"
    return name


def pipeline_stage(name: str, num_layers: int, pp: int) -> Tuple[int, str]:
    """(stage, stage-local name) of a canonical parameter under an even pipeline split.

    Megatron-Core numbers a stage's layers from 0; the embedding and input compression live on the
    first stage, the final norm, the head, the LM head and the frozen autoencoder on the last.
    """
    index = layer_index(name)
    if index is not None:
        per_stage = num_layers // pp
        return index // per_stage, with_layer_index(name, index % per_stage)
    if name.startswith(("embedding.", "input_compression.")):
        return 0, name
    return pp - 1, name


# --------------------------------------------------------------------------- shapes

def autoencoder_hf_shapes(cfg: AutoencoderConfig, prefix: str = "") -> Dict[str, Tuple[int, ...]]:
    """Names and shapes of the reference Autoencoder's state dict (aliases included)."""
    V, d, f, l, K = cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.latent_size, cfg.chunk_size
    shapes = {"encoder.embed_tokens.weight": (V, d), "decoder.lm_head_weight": (V, d)}

    def layers(stack: str, count: int):
        for i in range(count):
            shapes.update({f"{stack}.{i}.layernorm.weight": (d,), f"{stack}.{i}.mlp.gate_proj.weight": (f, d),
                           f"{stack}.{i}.mlp.up_proj.weight": (f, d), f"{stack}.{i}.mlp.down_proj.weight": (d, f)})

    layers("encoder.encoder_layers", cfg.num_encoder_layers)
    layers("decoder.decoder_layers", cfg.num_decoder_layers)
    shapes.update({"encoder.squeeze_layer.weight": (d, K * d), "encoder.squeeze_layer.bias": (d,),
                   "encoder.norm.weight": (d,), "encoder.hidden_to_latent.weight": (2 * l, d),
                   "encoder.hidden_to_latent.bias": (2 * l,), "decoder.latent_to_hidden.weight": (d, l),
                   "decoder.latent_to_hidden.bias": (d,), "decoder.expand_layer.weight": (K * d, d),
                   "decoder.expand_layer.bias": (K * d,), "decoder.norm.weight": (d,)})
    return {prefix + name: shape for name, shape in shapes.items()}


def backbone_hf_shapes(cfg: ModelConfig, prefix: str) -> Dict[str, Tuple[int, ...]]:
    d, f, heads = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads
    groups, head_dim = cfg.num_query_groups or heads, cfg.hidden_size // cfg.num_attention_heads
    shapes = {f"{prefix}embed_tokens.weight": (cfg.vocab_size, d), f"{prefix}norm.weight": (d,)}
    for i in range(cfg.num_layers):
        h = f"{prefix}layers.{i}"
        shapes.update({f"{h}.input_layernorm.weight": (d,), f"{h}.self_attn.q_proj.weight": (heads * head_dim, d),
                       f"{h}.self_attn.k_proj.weight": (groups * head_dim, d),
                       f"{h}.self_attn.v_proj.weight": (groups * head_dim, d),
                       f"{h}.self_attn.o_proj.weight": (d, heads * head_dim),
                       f"{h}.post_attention_layernorm.weight": (d,), f"{h}.mlp.gate_proj.weight": (f, d),
                       f"{h}.mlp.up_proj.weight": (f, d), f"{h}.mlp.down_proj.weight": (d, f)})
    return shapes


def head_hf_shapes(cfg: ModelConfig, prefix: str = HEAD_HF) -> Dict[str, Tuple[int, ...]]:
    d, l, noise = cfg.hidden_size, cfg.latent_size, cfg.noise_size
    shapes = {"noise_embd.weight": (d, noise), "noise_embd.bias": (d,), "hidden_embd.weight": (d, d),
              "hidden_embd.bias": (d,), "norm_noise.weight": (d,), "norm_noise.bias": (d,),
              "norm_hidden.weight": (d,), "norm_hidden.bias": (d,)}
    for j in range(cfg.head_blocks):
        b = f"mlp_blocks.{j}"
        shapes.update({f"{b}.in_ln.weight": (d,), f"{b}.in_ln.bias": (d,), f"{b}.linears.0.weight": (d, 2 * d),
                       f"{b}.linears.0.bias": (d,), f"{b}.linears.2.weight": (d, d), f"{b}.linears.2.bias": (d,),
                       f"{b}.linears.4.weight": (2 * d, d), f"{b}.linears.4.bias": (2 * d,),
                       f"{b}.down_proj.weight": (d, d), f"{b}.down_proj.bias": (d,)})
    shapes.update({"final_layer.in_ln.weight": (d,), "final_layer.in_ln.bias": (d,),
                   "final_layer.linears.0.weight": (d, d), "final_layer.linears.0.bias": (d,),
                   "final_layer.linears.2.weight": (l, d), "final_layer.linears.2.bias": (l,)})
    return {prefix + name: shape for name, shape in shapes.items()}


def hf_shapes(kind: str, model_cfg: Optional[ModelConfig] = None,
              ae_cfg: Optional[AutoencoderConfig] = None) -> Dict[str, Tuple[int, ...]]:
    """Every name (aliases included) and shape of the HF state dict of a model kind."""
    if kind == "ae":
        return autoencoder_hf_shapes(ae_cfg)
    if kind == "ar":
        shapes = backbone_hf_shapes(model_cfg, "model.")
        shapes["lm_head.weight"] = (model_cfg.vocab_size, model_cfg.hidden_size)
        return shapes
    if kind != "calm":
        raise ValueError(f"unknown model kind {kind!r}")
    d, K = model_cfg.hidden_size, model_cfg.chunk_size
    shapes = backbone_hf_shapes(model_cfg, "transformer.")
    shapes.update({"embed_proj.0.weight": (2 * d, K * d), "embed_proj.0.bias": (2 * d,),
                   "embed_proj.2.weight": (d, 2 * d), "embed_proj.2.bias": (d,), "embed_proj.3.weight": (d,),
                   "embed_proj.3.bias": (d,)})
    shapes.update(head_hf_shapes(model_cfg, HEAD_HF))
    shapes.update(head_hf_shapes(model_cfg, HEAD_ALIAS_HF))
    shapes.update(autoencoder_hf_shapes(ae_cfg, AE_PREFIX_HF))
    return shapes


def canonical_shapes(rules: List[Rule], shapes_hf: Dict[str, Tuple[int, ...]]) -> Dict[str, Tuple[int, ...]]:
    """Our canonical (TP=1) shapes, by running each rule backwards on meta tensors of the HF shapes."""
    out = {}
    for rule in rules:
        inputs = [torch.empty(shapes_hf[name], device="meta") for name in rule.hf]
        for param, tensor in zip(rule.ours, rule.to_ours(*inputs)):
            out[param.name] = tuple(tensor.shape)
    return out


def infer_autoencoder_shapes(shapes: Dict[str, Tuple[int, ...]], ours_prefix: str = "",
                             hf_prefix: Optional[str] = None) -> dict:
    """Autoencoder sizes (hidden, intermediate, latent, K, layer counts) read off tensor shapes.

    ``shapes`` are our canonical names (``ours_prefix``) or, with ``hf_prefix``, the reference's.
    Used when the autoencoder's own config is not at hand (a CALM checkpoint or folder whose
    autoencoder lives elsewhere).
    """
    if hf_prefix is not None:
        p = hf_prefix
        embed, gate = shapes[f"{p}encoder.embed_tokens.weight"] if f"{p}encoder.embed_tokens.weight" in shapes \
            else shapes[f"{p}decoder.lm_head_weight"], shapes[f"{p}encoder.encoder_layers.0.mlp.gate_proj.weight"]
        squeeze, latent = shapes[f"{p}encoder.squeeze_layer.weight"], shapes[f"{p}encoder.hidden_to_latent.weight"]
        enc = len({n.split(".")[len(p.split(".")) + 1] for n in shapes if n.startswith(f"{p}encoder.encoder_layers.")})
        dec = len({n.split(".")[len(p.split(".")) + 1] for n in shapes if n.startswith(f"{p}decoder.decoder_layers.")})
    else:
        p = ours_prefix
        embed, gate = shapes[f"{p}encoder.embed_tokens.weight"], shapes[f"{p}encoder.layers_before_squeeze.0.mlp.gate_proj.weight"]
        squeeze, latent = shapes[f"{p}encoder.squeeze.weight"], shapes[f"{p}encoder.hidden_to_latent.weight"]

        def count(stack):
            return 2 * len({n[len(stack):].split(".")[0] for n in shapes if n.startswith(stack)})
        enc, dec = count(f"{p}encoder.layers_before_squeeze."), count(f"{p}decoder.layers_before_expand.")
    d = embed[1]
    return dict(hidden_size=d, intermediate_size=gate[0], chunk_size=squeeze[1] // d, latent_size=latent[0] // 2,
                num_encoder_layers=enc, num_decoder_layers=dec)
