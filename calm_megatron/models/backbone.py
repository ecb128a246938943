"""The Llama-style Transformer backbone shared by CALM and the autoregressive baseline.

A Megatron-Core ``TransformerBlock`` built from a ``ModuleSpec``: pre-RMSNorm, SwiGLU, RoPE (theta
from the config) over backbone positions (chunk indices for CALM), no biases, MHA or GQA through
``num_query_groups``, causal self-attention and a final RMSNorm. With Transformer Engine importable
the TE spec is used (fused norm+linear, TE attention); otherwise Megatron's local spec with torch
norms and a scaled-dot-product core attention (:class:`SDPAttention`, which runs on CPU).

Layout: Megatron's ``[seq, batch, hidden]`` throughout the backbone.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlock,
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import init_method_normal

from calm_megatron.config import ModelConfig

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16")
RECOMPUTE = ("none", "selective", "full")


def have_transformer_engine() -> bool:
    """True when Transformer Engine imports (and a GPU is present to run it)."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # ImportError, or a broken TE build that fails at import
        return False
    return True


def _parallel_sizes(tp: Optional[int], pp: Optional[int]) -> tuple:
    if parallel_state.model_parallel_is_initialized():
        tp = tp or parallel_state.get_tensor_model_parallel_world_size()
        pp = pp or parallel_state.get_pipeline_model_parallel_world_size()
    return tp or 1, pp or 1


def params_dtype(precision: str) -> torch.dtype:
    """The parameter dtype of a precision name (fp32 | bf16)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {', '.join(PRECISIONS)}")
    return torch.bfloat16 if precision == "bf16" else torch.float32


def transformer_config(cfg: ModelConfig, precision: str = "fp32", tp: Optional[int] = None,
                       pp: Optional[int] = None, sequence_parallel: bool = False, recompute: str = "none",
                       use_cpu_initialization: Optional[bool] = None) -> TransformerConfig:
    """The Megatron-Core ``TransformerConfig`` of the backbone described by ``cfg``.

    tp/pp default to the initialised parallel state (1 without one). Every linear, output layers
    included, is initialised N(0, init_std) as HF Llama does (Megatron would scale output layers).
    ``recompute`` is ParallelConfig.recompute: none | selective (core attention) | full (every layer).
    """
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute={recompute!r} is not one of {', '.join(RECOMPUTE)}")
    tp, pp = _parallel_sizes(tp, pp)
    dtype = params_dtype(precision)
    if use_cpu_initialization is None:
        use_cpu_initialization = not torch.cuda.is_available()
    init = init_method_normal(cfg.init_std)
    recompute_kwargs = {}
    if recompute == "selective":
        recompute_kwargs = dict(recompute_granularity="selective", recompute_modules=["core_attn"])
    elif recompute == "full":
        recompute_kwargs = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.intermediate_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups or cfg.num_attention_heads,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method=init,
        output_layer_init_method=init,
        init_method_std=cfg.init_std,
        embedding_init_method=init,
        embedding_init_method_std=cfg.init_std,
        attention_softmax_in_fp32=True,
        apply_rope_fusion=False,  # needs Transformer Engine even on GPU; the unfused path is exact
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        persist_layer_norm=False,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=sequence_parallel and tp > 1,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=use_cpu_initialization,
        **recompute_kwargs,
    )


class TorchNorm:
    """torch RMSNorm/LayerNorm with Megatron's norm-builder signature, sequence-parallel aware.

    Megatron's ``WrappedTorchNorm`` refuses sequence parallelism. This one allows it and marks the
    weight (and bias) with ``sequence_parallel=True`` as Megatron's fused norms do: their gradients
    are partial sums over the sequence shards and must be all-reduced over the TP group
    (:func:`allreduce_sequence_parallel_grads`).
    """

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused):
        norm_cls = torch.nn.RMSNorm if config.normalization == "RMSNorm" else torch.nn.LayerNorm
        norm = norm_cls(hidden_size, eps=eps, dtype=config.params_dtype)
        for param in norm.parameters():
            setattr(param, "sequence_parallel", config.sequence_parallel)
        return norm


class SDPAttention(MegatronModule):
    """Core attention through ``torch.nn.functional.scaled_dot_product_attention`` (causal).

    A drop-in for Megatron's local ``DotProductAttention``, whose default causal mask is built on
    ``device="cuda"`` and whose score buffer is materialised in full. Inputs are Megatron's
    ``[s, b, heads_per_partition (or groups), head_dim]``; the output is ``[s, b, hidden/tp]``.
    """

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection=None):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not support context parallelism; use Transformer Engine")
        tp = pg_collection.tp.size() if pg_collection is not None else \
            parallel_state.get_tensor_model_parallel_world_size()
        self.attn_mask_type = attn_mask_type
        self.heads_per_partition = config.num_attention_heads // tp
        self.groups_per_partition = config.num_query_groups // tp
        self.hidden_per_partition = config.kv_channels * self.heads_per_partition
        self.softmax_scale = softmax_scale  # None: 1/sqrt(head_dim), as in DotProductAttention
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        """Attention of ``[s, b, np, hn]`` queries over keys/values; a given bool mask marks blocked pairs."""
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPAttention supports neither packed sequences nor attention bias")
        mask_type = attn_mask_type or self.attn_mask_type
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, np, s, hn]
        if self.groups_per_partition != self.heads_per_partition:
            repeat = self.heads_per_partition // self.groups_per_partition
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        mask = None if attention_mask is None else ~attention_mask  # Megatron: True = blocked
        causal = mask is None and mask_type == AttnMaskType.causal and q.size(2) > 1
        if causal and q.size(2) != k.size(2):
            raise ValueError("causal SDPAttention needs as many queries as keys (no KV cache here)")
        dropout_p = self.dropout_p if self.training else 0.0
        rng = tensor_parallel.get_cuda_rng_tracker().fork() if dropout_p > 0 else contextlib.nullcontext()
        with rng:  # dropout draws from the TP-rank stream, as in DotProductAttention
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                                 is_causal=causal, scale=self.softmax_scale)
        s, b = out.size(2), out.size(0)
        return out.permute(2, 0, 1, 3).reshape(s, b, self.hidden_per_partition)


def layer_spec(use_transformer_engine: Optional[bool] = None) -> ModuleSpec:
    """The Llama layer spec: Transformer Engine's when available, else the local one with SDPA."""
    if use_transformer_engine is None:
        use_transformer_engine = have_transformer_engine()
    if use_transformer_engine:
        return get_gpt_layer_with_transformer_engine_spec()
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.input_layernorm = TorchNorm
    spec.submodules.pre_mlp_layernorm = TorchNorm
    spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return spec


def _final_norm_spec(use_transformer_engine: bool):
    if use_transformer_engine:
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    return TorchNorm


class Backbone(MegatronModule):
    """RoPE + the Transformer block (+ final RMSNorm on the last pipeline stage).

    ``forward(hidden [s, b, d], position_offset=0) -> [s, b, d]``. RoPE positions are
    ``position_offset + arange(s)`` (the full sequence length under sequence parallelism). On a
    stage that is not the first, the input comes from :meth:`set_input_tensor`, as Megatron's
    pipeline schedules expect.
    """

    def __init__(self, config: TransformerConfig, rope_theta: float, pre_process: bool = True,
                 post_process: bool = True, use_transformer_engine: Optional[bool] = None):
        super().__init__(config=config)
        if use_transformer_engine is None:
            use_transformer_engine = have_transformer_engine()
        self.use_transformer_engine = use_transformer_engine
        self.pre_process, self.post_process = pre_process, post_process
        log.info("backbone: %s spec", "Transformer Engine" if use_transformer_engine
                 else "local (torch norms + SDPA attention)")
        spec = layer_spec(use_transformer_engine)
        pp_rank = parallel_state.get_pipeline_model_parallel_rank() if config.pipeline_model_parallel_size > 1 else 0
        submodules = TransformerBlockSubmodules(
            layer_specs=[spec] * get_num_layers_to_build(config, pp_rank=pp_rank),
            layer_norm=_final_norm_spec(use_transformer_engine))
        self.rotary_pos_emb = RotaryEmbedding(kv_channels=config.kv_channels, rotary_percent=1.0,
                                              rotary_base=rope_theta,
                                              use_cpu_initialization=config.use_cpu_initialization)
        self.decoder = TransformerBlock(config=config, spec=submodules, pre_process=pre_process,
                                        post_process=post_process)

    def set_input_tensor(self, input_tensor) -> None:
        """Pipeline schedules hand the previous stage's output here."""
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    def forward(self, hidden_states: Optional[torch.Tensor], position_offset: int = 0) -> torch.Tensor:
        """Run the layers on ``[s, b, d]`` inputs (ignored off the first pipeline stage)."""
        source = hidden_states if self.decoder.input_tensor is None or self.pre_process \
            else self.decoder.input_tensor
        seq_len = source.size(0)
        if self.config.sequence_parallel:
            seq_len *= self.config.tensor_model_parallel_size
        rotary = self.rotary_pos_emb(seq_len, offset=position_offset)
        return self.decoder(hidden_states, attention_mask=None, rotary_pos_emb=rotary)


def build_backbone(config: TransformerConfig, rope_theta: float, pre_process: Optional[bool] = None,
                   post_process: Optional[bool] = None) -> Backbone:
    """A :class:`Backbone` for this rank's pipeline stage (first/last stage from parallel_state)."""
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    return Backbone(config, rope_theta, pre_process=pre_process, post_process=post_process)


def no_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
    """True for parameters HF's Trainer exempts from weight decay: biases and norm weights.

    Every bias and every norm weight/bias here is 1-D, while embeddings and linear weights are 2-D,
    so the rank decides (it also covers TE's fused ``layer_norm_weight``).
    """
    return param.ndim < 2 or name.endswith(".bias")


def allreduce_sequence_parallel_grads(module: torch.nn.Module) -> None:
    """All-reduce, over the TP group, the grads of parameters marked ``sequence_parallel``.

    Needed after backward when sequence parallelism is on (norm weights see only their sequence
    shard). A no-op at TP=1 or without sequence parallelism.
    """
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return
    grads = [p.grad for p in module.parameters()
             if getattr(p, "sequence_parallel", False) and p.grad is not None]
    if not grads:
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    torch.distributed.all_reduce(flat, group=parallel_state.get_tensor_model_parallel_group())
    for grad, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        grad.copy_(synced)


def count_backbone_parameters(cfg: ModelConfig) -> int:
    """Closed-form parameter count of the backbone (all layers + final norm)."""
    d, heads = cfg.hidden_size, cfg.num_attention_heads
    groups = cfg.num_query_groups or heads
    head_dim = d // heads
    attention = d * (heads + 2 * groups) * head_dim + heads * head_dim * d
    mlp = 3 * d * cfg.intermediate_size
    per_layer = attention + mlp + 2 * d  # + input and pre-MLP RMSNorm weights
    return cfg.num_layers * per_layer + d
