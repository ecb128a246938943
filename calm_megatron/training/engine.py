"""The DeepSpeed engine around our Megatron-Core models, and one optimizer step over micro-batches.

Gradient accumulation follows the only pattern that is right with DeepSpeed 0.19.8 (platform notes):
`engine.backward(loss)` then `engine.step()` after every micro-batch; DeepSpeed divides the loss by
the accumulation steps and steps the optimizer on the boundary only.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional

import torch
import torch.distributed as dist

from calm_megatron import config as C
from calm_megatron import distributed
from calm_megatron.training import optim

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    """What one optimizer step measured (loss averaged over micro-batches and data-parallel ranks)."""
    loss: float
    grad_norm: float
    lr: float
    metrics: dict


def create_engine(model: torch.nn.Module, cfg: C.Config, dp: int,
                  no_decay: Optional[Callable] = None):
    """Wrap `model` in a DeepSpeed engine with the ZeRO stage, precision and clipping of `cfg`."""
    import deepspeed

    groups = optim.param_groups(model.named_parameters(), cfg.optim.weight_decay,
                                no_decay or optim.default_no_weight_decay)
    for group in groups:
        group.pop("name", None)
    optimizer = optim.build_optimizer(groups, cfg.optim)
    scheduler = optim.build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=C.to_deepspeed(cfg, dp), mpu=distributed.MegatronMpu())
    return engine


def sync_sequence_parallel_grads(module: torch.nn.Module) -> int:
    """Sum over the TP group, inside autograd, the gradients of parameters marked `sequence_parallel`.

    Under sequence parallelism such parameters (Transformer Engine's norms, biases after a
    reduce-scatter) see only this rank's slice of the sequence. Megatron reduces them in its own
    `finalize_model_grads`, which neither DeepSpeed nor our pipeline path runs; a gradient hook does
    it before the gradient is accumulated, so ZeRO-2's reduction hooks and every micro-batch see the
    full gradient. Returns how many parameters got the hook (0 with the local spec, whose norms
    sync in their forward).
    """
    from megatron.core import parallel_state as ps

    if ps.get_tensor_model_parallel_world_size() == 1:
        return 0
    group = ps.get_tensor_model_parallel_group()

    def reduce(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, group=group)
        return grad

    params = [p for p in module.parameters() if p.requires_grad and getattr(p, "sequence_parallel", False)]
    for param in params:
        param.register_hook(reduce)
    return len(params)


def _local_grad_norm_sq(module: torch.nn.Module, tp_rank: int) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float64)
    for param in module.parameters():
        if param.grad is None:
            continue
        # Replicated parameters are counted once per tensor-parallel group (on TP rank 0).
        if tp_rank == 0 or getattr(param, "tensor_model_parallel", False):
            total += param.grad.detach().double().pow(2).sum().cpu()
    return total


def grad_norm_unsharded(engine) -> float:
    """Global gradient norm from `param.grad` (ZeRO stage 0, where DeepSpeed does not record it)."""
    from megatron.core import parallel_state as ps

    total = _local_grad_norm_sq(engine.module, ps.get_tensor_model_parallel_rank()).to(distributed.device())
    dist.all_reduce(total, group=ps.get_model_parallel_group())
    return math.sqrt(total.item())


def train_step(engine, micro_batches: Iterator[torch.Tensor], accum_steps: int,
               forward: Callable[[torch.nn.Module, torch.Tensor], object],
               metrics_fn: Optional[Callable] = None) -> StepResult:
    """Run `accum_steps` micro-batches and one optimizer step; return the averaged measurements.

    `micro_batches` yields token tensors or (tokens, forward kwargs) pairs; `forward(engine, tokens,
    **kwargs)` returns the model output with a `.loss`; `metrics_fn(output, tokens)` may return
    extra float metrics (averaged like the loss).
    """
    lr = engine.get_lr()[0]
    losses: List[float] = []
    sums: dict = {}
    grad_norm = float("nan")
    for micro in range(accum_steps):
        item = next(micro_batches)
        tokens, kwargs = item if isinstance(item, tuple) else (item, {})
        output = forward(engine, tokens, **kwargs)
        engine.backward(output.loss)
        losses.append(output.loss.detach().float().item())
        for key, value in (metrics_fn(output, tokens) if metrics_fn else {}).items():
            sums[key] = sums.get(key, 0.0) + value
        if micro == accum_steps - 1 and engine.zero_optimization_stage() == 0:
            grad_norm = grad_norm_unsharded(engine)
        engine.step()
    if engine.zero_optimization_stage() > 0:
        norm = engine.get_global_grad_norm()
        grad_norm = float(norm) if norm is not None else float("nan")
    loss = distributed.all_reduce_mean(sum(losses) / len(losses))
    metrics = {k: distributed.all_reduce_mean(v / accum_steps) for k, v in sums.items()}
    return StepResult(loss=loss, grad_norm=grad_norm, lr=lr, metrics=metrics)
