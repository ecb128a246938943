"""Per-rank model-state memory: parameter, gradient and optimizer-state bytes, and the start-up report.

Counted from the tensors a DeepSpeed engine really holds on this rank (so ZeRO partitioning shows):
- parameters: the module's parameters and buffers on this rank (this TP shard of this PP stage);
- gradients: `param.grad` plus ZeRO-2's partitioned gradient buffers (meaningful between backward
  and step; zero at start-up, when nothing has been computed yet);
- optimizer state: the inner optimizer's state tensors (Adam moments, SGD momentum) and the fp32
  master partitions that ZeRO / DeepSpeed's bf16 optimizer keep apart from the model's weights.
"""
from __future__ import annotations

import logging
from typing import Dict, Iterable

import torch
import torch.distributed as dist

log = logging.getLogger("calm_megatron")

MIB = 2 ** 20


def _bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one flat buffer count once, in full)."""
    seen, total = set(), 0
    for t in tensors:
        if not torch.is_tensor(t) or t.device.type == "meta" or not t.numel():
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def _tensors(value) -> list:
    if torch.is_tensor(value):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    return []


def parameter_bytes(module: torch.nn.Module) -> int:
    return _bytes(list(module.parameters()) + [b for b in module.buffers() if b is not None])


def gradient_bytes(engine) -> int:
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    opt = engine.optimizer
    # ZeRO's own gradient buffers: accumulated partitions, the reduced partition, the contiguous buffer.
    for name in ("all_grad_tensors", "averaged_gradients", "grads_in_partition"):
        grads.extend(_tensors(getattr(opt, name, None)))
    return _bytes(grads)


def optimizer_state_bytes(engine) -> int:
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    tensors = [v for state in inner.state.values() for v in state.values() if torch.is_tensor(v)]
    for name in ("single_partition_of_fp32_groups", "fp32_groups_flat_partition"):  # fp32 masters
        tensors.extend(getattr(opt, name, None) or [])
    model_storages = {p.untyped_storage().data_ptr() for p in engine.module.parameters()}
    return _bytes(t for t in tensors if t.untyped_storage().data_ptr() not in model_storages)


def model_state_bytes(engine) -> Dict[str, int]:
    return {"params": parameter_bytes(engine.module), "grads": gradient_bytes(engine),
            "optimizer": optimizer_state_bytes(engine)}


def _device_memory() -> str:
    import os

    import psutil

    text = f"rss {psutil.Process(os.getpid()).memory_info().rss / 2 ** 30:.2f}GiB"
    if torch.cuda.is_available():
        text += (f" gpu {torch.cuda.memory_allocated() / 2 ** 30:.2f}GiB "
                 f"(peak {torch.cuda.max_memory_allocated() / 2 ** 30:.2f}GiB)")
    return text


def rank_memory_lines(engine, layout) -> list:
    """One line per rank (gathered on every rank): coordinates, model-state bytes, process memory."""
    sizes = model_state_bytes(engine)
    line = (f"rank {layout.rank} (tp {layout.tp_rank} pp {layout.pp_rank} dp {layout.dp_rank}): "
            f"params {sizes['params'] / MIB:.2f}MiB grads {sizes['grads'] / MIB:.2f}MiB "
            f"optimizer {sizes['optimizer'] / MIB:.2f}MiB | {_device_memory()}")
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [line]
    lines = [None] * dist.get_world_size()
    dist.all_gather_object(lines, line)
    return lines


def log_rank_memory(engine, layout, when: str) -> None:
    """Log every rank's memory on rank 0 (collective: call it on all ranks)."""
    lines = rank_memory_lines(engine, layout)
    log.info("memory %s, per rank:\n  %s", when, "\n  ".join(lines))
