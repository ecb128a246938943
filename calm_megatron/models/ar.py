"""The autoregressive Transformer baseline (Transformer-S/M/L of calm-spec 5.1) on CALM's backbone.

    tokens [B, T] -> vocab-parallel embedding -> backbone (RoPE over token positions)
    -> untied vocab-parallel LM head (ColumnParallelLinear, no bias) -> vocab-parallel cross-entropy,
    predicting token t+1 from tokens <= t (positions 0..T-2 are scored).

Logits stay sharded over the vocabulary (``[B, T, V/tp]``) for the loss; :meth:`ARModel.logits`
gathers them for evaluation. A vocabulary that TP does not divide is padded; padded logits are -inf.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import init_method_normal

from calm_megatron.config import ModelConfig, ParallelConfig
from calm_megatron.models.backbone import (
    build_backbone,
    count_backbone_parameters,
    no_weight_decay,
    padded_vocab_size,
    transformer_config,
    vocab_embedding,
    without_sequence_parallel,
)

__all__ = ["ARModel", "AROutput", "build_ar", "count_parameters_ar", "no_weight_decay"]


@dataclass
class AROutput:
    """What :meth:`ARModel.forward` returns on the last pipeline stage."""
    loss: torch.Tensor  # scalar: mean cross-entropy over B * (T-1) predicted tokens (fp32)
    logits: Optional[torch.Tensor]  # [B, T, V/tp]: this rank's vocabulary shard (padding at -inf)


class ARModel(MegatronModule):
    """Embedding + backbone + untied LM head. Build it with :func:`build_ar`."""

    def __init__(self, cfg: ModelConfig, config, pre_process: bool = True, post_process: bool = True):
        super().__init__(config=config)
        self.model_cfg = cfg
        self.model_type = ModelType.encoder_or_decoder
        self.pre_process, self.post_process = pre_process, post_process
        tp = config.tensor_model_parallel_size
        if pre_process:
            self.embedding = vocab_embedding(cfg.vocab_size, cfg.hidden_size, config, cfg.init_std)
        self.backbone = build_backbone(config, cfg.rope_theta, pre_process, post_process)
        if post_process:
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                cfg.hidden_size, padded_vocab_size(cfg.vocab_size, tp), config=without_sequence_parallel(config),
                init_method=self._output_init(cfg), bias=False, gather_output=False,
                skip_bias_add=False)
            per_rank = self.output_layer.output_size_per_partition
            vocab_start = parallel_state.get_tensor_model_parallel_rank() * per_rank
            self.num_local_padding = max(0, min(per_rank, vocab_start + per_rank - cfg.vocab_size))

    @staticmethod
    def _output_init(cfg: ModelConfig):
        normal = init_method_normal(cfg.init_std)

        def init(weight: torch.Tensor) -> None:  # the full (padded) table: padding rows zero
            normal(weight[:cfg.vocab_size])
            torch.nn.init.zeros_(weight[cfg.vocab_size:])
        return init

    def set_input_tensor(self, input_tensor) -> None:
        """Pipeline schedules hand the previous stage's output here."""
        self.backbone.set_input_tensor(input_tensor)

    def _local_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[T, B, V/tp]`` logits (or the backbone output off the last stage)."""
        hidden = self.embedding(tokens.t().contiguous()) if self.pre_process else None  # [T, B, d]
        h = self.backbone(hidden, seq_len=tokens.size(1))
        if not self.post_process:
            return h
        logits = self.output_layer(h)[0]
        if self.num_local_padding:
            padding = torch.arange(logits.size(-1), device=logits.device) >= logits.size(-1) - self.num_local_padding
            logits = logits.masked_fill(padding, float("-inf"))
        return logits

    def forward(self, tokens: torch.Tensor, return_logits: bool = True):
        """Next-token cross-entropy of tokens ``[B, T]``; :class:`AROutput` on the last stage.

        Off the last pipeline stage it returns the backbone output ``[T, B, d]``. ``return_logits=False``
        saves one logits-sized copy (the vocab-parallel CE works in place on fp32 input).
        """
        logits = self._local_logits(tokens)
        if not self.post_process:
            return logits
        shifted = logits[:-1].float()
        if return_logits and shifted.data_ptr() == logits.data_ptr():
            shifted = shifted.clone()
        labels = tokens[:, 1:].t().contiguous()
        loss = tensor_parallel.vocab_parallel_cross_entropy(shifted, labels).mean()
        return AROutput(loss=loss, logits=logits.transpose(0, 1) if return_logits else None)

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits ``[B, T, V]`` (gathered over TP, padding removed), for evaluation."""
        local = self._local_logits(tokens)
        full = tensor_parallel.gather_from_tensor_model_parallel_region(local)
        return full[..., :self.model_cfg.vocab_size].transpose(0, 1)


def build_ar(cfg: ModelConfig, precision: str = "fp32", *, parallel: Optional[ParallelConfig] = None,
             perform_initialization: bool = True) -> ARModel:
    """Build this rank's AR baseline (TP/PP from Megatron's parallel state; ``parallel`` adds
    sequence parallelism and the recompute policy)."""
    parallel = parallel or ParallelConfig()
    config = transformer_config(cfg, precision, sequence_parallel=parallel.sequence_parallel,
                                recompute=parallel.recompute, perform_initialization=perform_initialization)
    return ARModel(cfg, config, pre_process=parallel_state.is_pipeline_first_stage(),
                   post_process=parallel_state.is_pipeline_last_stage())


class ARParameterCount(NamedTuple):
    """Closed-form parameter counts of the AR baseline at TP=1."""
    total: int
    embedding: int
    backbone: int
    lm_head: int


def count_parameters_ar(cfg: ModelConfig) -> ARParameterCount:
    """Parameter count of the AR baseline ``cfg`` describes (untied embedding and LM head)."""
    embedding = lm_head = cfg.vocab_size * cfg.hidden_size
    backbone = count_backbone_parameters(cfg)
    return ARParameterCount(embedding + backbone + lm_head, embedding, backbone, lm_head)
