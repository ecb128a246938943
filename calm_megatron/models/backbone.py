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
import copy
import logging
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.tensor_parallel import VocabParallelEmbedding
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
                       use_cpu_initialization: Optional[bool] = None,
                       perform_initialization: bool = True) -> TransformerConfig:
    """The Megatron-Core ``TransformerConfig`` of the backbone described by ``cfg``.

    tp/pp default to the initialised parallel state (1 without one). Every linear, output layers
    included, is initialised N(0, init_std) as HF Llama does (Megatron would scale output layers).
    ``recompute`` is ParallelConfig.recompute: none | selective (core attention) | full (every layer).
    ``perform_initialization=False`` skips the weight draws (building on the meta device to count).
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
        perform_initialization=perform_initialization,
        **recompute_kwargs,
    )


class _TPSyncedNorm:
    """Mixin: the affine parameters enter through ``copy_to_tensor_model_parallel_region``.

    Under sequence parallelism each TP rank normalises its own slice of the sequence, so the
    weight (and bias) gradients are partial sums; the copy's backward all-reduces them over the TP
    group inside autograd, so every rank holds the full gradient when backward ends.
    """

    def _synced(self, param):
        return None if param is None else tensor_parallel.copy_to_tensor_model_parallel_region(param)


class TPSyncedRMSNorm(_TPSyncedNorm, torch.nn.RMSNorm):
    """torch RMSNorm for sequence-parallel inputs (see :class:`_TPSyncedNorm`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.normalized_shape, self._synced(self.weight), self.eps)


class TPSyncedLayerNorm(_TPSyncedNorm, torch.nn.LayerNorm):
    """torch LayerNorm for sequence-parallel inputs (see :class:`_TPSyncedNorm`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self._synced(self.weight), self._synced(self.bias), self.eps)


class TorchNorm:
    """torch RMSNorm/LayerNorm with Megatron's norm-builder signature, sequence-parallel aware.

    Megatron's ``WrappedTorchNorm`` refuses sequence parallelism; with it on, this builds the
    TP-synced variants, whose parameter gradients are complete on every rank after backward
    (the state-dict keys are the same either way).
    """

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused):
        rms = config.normalization == "RMSNorm"
        if config.sequence_parallel:
            norm_cls = TPSyncedRMSNorm if rms else TPSyncedLayerNorm
        else:
            norm_cls = torch.nn.RMSNorm if rms else torch.nn.LayerNorm
        return norm_cls(hidden_size, eps=eps, dtype=config.params_dtype)


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

    ``forward(hidden [s, b, d]) -> [s, b, d]``; RoPE positions are ``position_offset + arange(s)``.
    On a stage that is not the first, the input comes from :meth:`set_input_tensor`, as Megatron's
    pipeline schedules expect. Sequence parallelism is handled inside (see :meth:`forward`).
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

    def padded_length(self, seq_len: int) -> int:
        """The sequence length the layers run on: under sequence parallelism a multiple of TP."""
        if not self.config.sequence_parallel:
            return seq_len
        tp = self.config.tensor_model_parallel_size
        return -(-seq_len // tp) * tp

    def forward(self, hidden_states: Optional[torch.Tensor], seq_len: Optional[int] = None,
                position_offset: int = 0, inference_context=None) -> torch.Tensor:
        """Run the layers: ``[s, b, d]`` in on the first stage, ``[s, b, d]`` out on the last.

        ``seq_len`` (default: the input's length) is s. Under sequence parallelism the first stage
        zero-pads the sequence to a multiple of TP and scatters it (causal attention keeps the
        padding from touching real positions), and the last stage gathers it and drops the
        padding; between stages tensors are ``[padded s / tp, b, d]``.

        ``inference_context``: a Megatron-Core ``StaticInferenceContext`` (KV cache, generation).
        The input is then positions ``offset .. offset+s-1`` with offset its ``sequence_len_offset``
        (which the caller advances by s after the call, as Megatron's generation loop does); their
        keys/values are appended to the cache and the queries attend to every cached position.
        """
        if seq_len is None:
            seq_len = hidden_states.size(0)
        if inference_context is not None:
            return self._forward_cached(hidden_states, seq_len, inference_context)
        padded = self.padded_length(seq_len)
        sequence_parallel = self.config.sequence_parallel
        if self.pre_process and sequence_parallel:
            hidden_states = F.pad(hidden_states, (0, 0, 0, 0, 0, padded - seq_len))
            hidden_states = tensor_parallel.scatter_to_sequence_parallel_region(hidden_states)
        rotary = self.rotary_pos_emb(padded, offset=position_offset)
        out = self.decoder(hidden_states, attention_mask=None, rotary_pos_emb=rotary)
        if self.post_process and sequence_parallel:
            # What follows (head, LM head) is TP-replicated and its column-parallel linears already
            # sum the input gradient over TP ranks: the backward of this gather only splits.
            out = tensor_parallel.gather_from_sequence_parallel_region(out, tensor_parallel_output_grad=False)
            out = out[:seq_len]
        return out

    def _forward_cached(self, hidden_states: torch.Tensor, seq_len: int, inference_context) -> torch.Tensor:
        """One KV-cached step through Megatron's static-batching inference path (no sequence parallel).

        RoPE covers the context's whole length; Megatron's attention slices the rows of the new
        queries and of all cached keys. A first step (offset 0) is causal; later steps are what
        Megatron calls ``no_mask``, which is exact for one new position, so a later step of several
        positions gets an explicit causal mask over (cached + new) keys.
        """
        if self.config.sequence_parallel or self.config.context_parallel_size != 1:
            raise ValueError("KV-cached inference runs without sequence or context parallelism")
        start = inference_context.sequence_len_offset
        if start + seq_len > inference_context.max_sequence_length:
            raise ValueError(f"KV cache holds {inference_context.max_sequence_length} positions; "
                             f"{start} cached + {seq_len} new do not fit")
        rotary = self.rotary_pos_emb(inference_context.max_sequence_length)
        mask = None
        if start > 0 and seq_len > 1:
            device = rotary.device if hidden_states is None else hidden_states.device
            query_pos = torch.arange(start, start + seq_len, device=device)[:, None]
            mask = (torch.arange(start + seq_len, device=device)[None, :] > query_pos)[None, None]
        return self.decoder(hidden_states, attention_mask=mask, rotary_pos_emb=rotary,
                            inference_context=inference_context)


def build_backbone(config: TransformerConfig, rope_theta: float, pre_process: Optional[bool] = None,
                   post_process: Optional[bool] = None) -> Backbone:
    """A :class:`Backbone` for this rank's pipeline stage (first/last stage from parallel_state)."""
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    return Backbone(config, rope_theta, pre_process=pre_process, post_process=post_process)


def without_sequence_parallel(config: ModelParallelConfig) -> ModelParallelConfig:
    """A copy of ``config`` with sequence parallelism off, for layers that see whole sequences."""
    plain = copy.copy(config)
    plain.sequence_parallel = False
    return plain


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """The vocabulary rounded up to a multiple of the TP size (Megatron splits it evenly)."""
    return -(-vocab_size // tp) * tp


def vocab_embedding(vocab_size: int, hidden_size: int, config: ModelParallelConfig,
                    init_std: float) -> VocabParallelEmbedding:
    """A vocab-parallel token embedding, N(0, init_std) on real rows and zero on the TP padding.

    With CPU initialisation the full (padded) table is drawn on every rank, so the real rows are
    the same at every TP size; padding rows are never looked up.
    """
    def init(weight: torch.Tensor) -> None:
        torch.nn.init.normal_(weight[:vocab_size], mean=0.0, std=init_std)
        torch.nn.init.zeros_(weight[vocab_size:])

    padded = padded_vocab_size(vocab_size, config.tensor_model_parallel_size)
    return VocabParallelEmbedding(padded, hidden_size, init_method=init, config=without_sequence_parallel(config))


def no_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
    """True for parameters HF's Trainer exempts from weight decay: biases and norm weights.

    Every bias and every norm weight/bias here is 1-D, while embeddings and linear weights are 2-D,
    so the rank decides (it also covers TE's fused ``layer_norm_weight``).
    """
    return param.ndim < 2 or name.endswith(".bias")


def allreduce_sequence_parallel_grads(module: torch.nn.Module) -> None:
    """All-reduce over the TP group the grads of parameters marked ``sequence_parallel``.

    Only Transformer Engine's norms carry that mark (Megatron reduces them in its own
    ``finalize_model_grads``, which DeepSpeed does not run): call this after backward when TE and
    sequence parallelism are both on. The local spec's norms sync inside autograd, so this is a
    no-op there, and at TP=1.
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
