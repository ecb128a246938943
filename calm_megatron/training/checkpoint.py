"""Checkpoints: `<save>/step_{N:08d}/` with the DeepSpeed engine state, the resolved config and, for
stage-1 runs, the autoencoder's full weights (safetensors), read by stage 2 whatever its TP size.

`<save>/latest` names the last complete step; it is replaced atomically after every rank finished.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist

from calm_megatron import config as C

LATEST = "latest"
AE_WEIGHTS = "autoencoder.safetensors"
AE_CONFIG = "autoencoder.json"


def step_dir(save_dir: str, step: int) -> Path:
    return Path(save_dir) / f"step_{step:08d}"


def _gather_tp(param: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state as ps

    if not getattr(param, "tensor_model_parallel", False) or ps.get_tensor_model_parallel_world_size() == 1:
        return param.detach()
    group = ps.get_tensor_model_parallel_group()
    parts = [torch.empty_like(param) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, param.detach().contiguous(), group=group)
    return torch.cat(parts, dim=param.partition_dim)


def full_state_dict(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Parameters and buffers with tensor-parallel shards gathered (collective over the TP group)."""
    tensors = {name: _gather_tp(p).float().cpu().clone() for name, p in module.named_parameters()}
    for name, buf in module.named_buffers():
        if buf is not None and not name.endswith("_extra_state"):
            tensors[name] = buf.detach().cpu().clone()
    return tensors


def load_full_state_dict(module: torch.nn.Module, tensors: Dict[str, torch.Tensor], source: str) -> None:
    """Copy full (TP=1) tensors into `module`, slicing the shards this TP rank owns."""
    from megatron.core import parallel_state as ps

    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    own = dict(module.named_parameters())
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own) - {n for n, _ in module.named_buffers()})
    if missing or unexpected:
        raise ValueError(f"{source}: parameter names do not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, param in own.items():
            full = tensors[name]
            if getattr(param, "tensor_model_parallel", False) and tp > 1:
                full = full.chunk(tp, dim=param.partition_dim)[rank]
            if tuple(full.shape) != tuple(param.shape):
                raise ValueError(f"{source}: tensor {name} has shape {tuple(full.shape)}, "
                                 f"the model expects {tuple(param.shape)}")
            param.copy_(full.to(param.dtype))


def save_autoencoder(module: torch.nn.Module, cfg: C.Config, directory: Path) -> None:
    """Write the AE's full weights and its config section (rank 0 writes; all TP ranks gather)."""
    from safetensors.torch import save_file

    tensors = full_state_dict(module)
    if dist.get_rank() == 0:
        save_file(tensors, str(directory / AE_WEIGHTS), metadata={"format": "calm-megatron-ae"})
        (directory / AE_CONFIG).write_text(json.dumps(C.to_dict(cfg)["autoencoder"], indent=1))


def resolve_step(path: str) -> Path:
    """A step directory from a step path, a checkpoints folder or a run folder (following `latest`)."""
    p = Path(path)
    for candidate in (p, p / "checkpoints"):
        if (candidate / LATEST).is_file():
            return candidate / (candidate / LATEST).read_text().strip()
    if p.is_dir() and (p / "config.yaml").is_file():
        return p
    raise FileNotFoundError(f"no checkpoint at {path}: expected a step directory or a folder with a "
                            f"'{LATEST}' file")


def load_autoencoder_weights(path: str) -> Tuple[C.AutoencoderConfig, Dict[str, torch.Tensor], Path]:
    """The AE config section and full weights saved by a stage-1 run (weights only, no pickle)."""
    from safetensors.torch import load_file

    step = resolve_step(path)
    weights, meta = step / AE_WEIGHTS, step / AE_CONFIG
    if not weights.is_file() or not meta.is_file():
        raise FileNotFoundError(f"{step} holds no autoencoder ({AE_WEIGHTS}, {AE_CONFIG}): is it a stage-1 run?")
    ae_cfg = C.from_dict({"autoencoder": json.loads(meta.read_text())}).autoencoder
    return ae_cfg, load_file(str(weights)), step


def save(engine, cfg: C.Config, step: int, export=None) -> Path:
    """Save a complete step; `latest` moves only after every rank has written its part."""
    directory = step_dir(cfg.save_dir, step)
    directory.mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(str(directory), tag="engine", save_latest=False)
    if export is not None:
        export(engine.module, directory)
    if dist.get_rank() == 0:
        C.save(cfg, str(directory / "config.yaml"))
        (directory / "meta.json").write_text(json.dumps({"step": step, "stage": cfg.run.stage}))
    dist.barrier()
    if dist.get_rank() == 0:
        tmp = Path(cfg.save_dir) / f".{LATEST}.tmp"
        tmp.write_text(directory.name)
        os.replace(tmp, Path(cfg.save_dir) / LATEST)
    dist.barrier()
    return directory
