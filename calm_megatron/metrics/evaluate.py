"""BrierLM evaluation loops for CALM and the autoregressive baseline over held-out blocks.

Every block a rank receives is scored once (no duplicated tail blocks); the accumulated sums and
counts are all-reduced over the data-parallel group only, then BrierLM = 100 * geometric mean of
Brier-1..4 (each clamped at 0, calm-spec 7.5).
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional

import torch

from calm_megatron.metrics.brier import (BRIER_MAX_N, BrierAccumulator, ar_brier, calm_brier_rollout,
                                         calm_brier_teacher_forced, chunk_sampler_from_hidden)


def _finish(acc: BrierAccumulator, dp_group) -> Dict[str, float]:
    acc.all_reduce(dp_group)
    result = acc.result()
    result["brier_positions"] = float(acc.counts[0].item())
    return result


@torch.no_grad()
def calm_brierlm(model, blocks: Iterable[torch.Tensor], dp_group=None) -> Dict[str, float]:
    """BrierLM of a CALM: teacher-forced at chunk starts (K >= 4), with rollouts for K < 4."""
    acc = BrierAccumulator()
    K = model.model_cfg.chunk_size
    for tokens in blocks:
        chunks = tokens.view(tokens.shape[0], -1, K)
        hidden = model.hidden_states(tokens)  # [B, L-1, d]: state i predicts chunk i+1
        pred_a, pred_b = model.sample_chunks(hidden, 2)
        if K >= BRIER_MAX_N:
            calm_brier_teacher_forced(pred_a, pred_b, chunks[:, 1:], acc)
        else:
            sampler = chunk_sampler_from_hidden(
                lambda c: model.hidden_states(c.flatten(1), include_last_chunk=True), model.sample_chunks)
            calm_brier_rollout(sampler, chunks, pred_a, pred_b, acc)
    return _finish(acc, dp_group)


@torch.no_grad()
def ar_brierlm(model, blocks: Iterable[torch.Tensor], dp_group=None,
               generator: Optional[torch.Generator] = None, rollout_batch_size: int = 64) -> Dict[str, float]:
    """BrierLM of the baseline: the Rao-Blackwellised estimator at every token position."""
    acc = BrierAccumulator()
    for tokens in blocks:
        ar_brier(model.logits, tokens, acc, generator=generator, rollout_batch_size=rollout_batch_size)
    return _finish(acc, dp_group)
