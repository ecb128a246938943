"""Optimizer parameter groups and the learning-rate schedule."""
from __future__ import annotations

import math
from typing import Callable, Iterable, List, Tuple

import torch

from calm_megatron.config import OptimConfig


def default_no_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
    """Biases and normalisation weights (1-D tensors) get no weight decay, as in HF Trainer."""
    return param.ndim < 2 or name.endswith(".bias") or "norm" in name.lower()


def param_groups(named_params: Iterable[Tuple[str, torch.nn.Parameter]], weight_decay: float,
                 no_decay: Callable[[str, torch.nn.Parameter], bool] = default_no_weight_decay) -> List[dict]:
    """Two groups of trainable parameters: with and without weight decay (frozen ones are left out)."""
    decay, plain = [], []
    for name, param in named_params:
        if param.requires_grad:
            (plain if no_decay(name, param) else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": plain, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]]


def build_optimizer(groups: List[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    """A plain torch optimizer (DeepSpeed's fused ones would JIT-compile on CPU)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def lr_factor(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Multiplier of the peak LR at optimizer step `step` (0-based): linear warmup, then constant or cosine.

    Unlike the reference scripts (HF "constant" silently ignores warmup, calm-spec 7.3 #1), the warmup
    here is real.
    """
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.min_lr / cfg.lr
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, total_steps))
