"""Our model (TP=1, PP=1, in this process) from a checkpoint of ours or from a Hugging Face folder.

For evaluation and generation tools that take either: :func:`load_model` dispatches on the path,
:func:`load_hf_as_ours` reads an HF folder (reference CALM/AE format or Llama) into our model class.
Both build the model without drawing random weights and copy the canonical tensors in one at a time.
They need Megatron-Core's parallel state; :func:`ensure_runtime` creates a one-process one.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Tuple

import torch

from calm_megatron import config as C
from calm_megatron.hf.source import HFSource, is_hf_folder


@dataclass
class LoadedModel:
    """A model ready for inference and what it came from."""
    model: torch.nn.Module  # eval mode, fp32 (or ``precision``), on the CPU
    kind: str  # ae | calm | ar
    tokenizer: str  # a path our tokenizer loader reads ('' if none is known)
    source: Path
    config: C.Config  # the run's config (a checkpoint's own; for an HF folder: stage, model sections, tokenizer)


def ensure_runtime(seed: int = 1234) -> bool:
    """A one-process gloo group and Megatron-Core parallel state (TP=1, PP=1) unless one exists.

    The group gets a free port of its own whatever rank variables the environment holds, and the
    environment is left as it was (child processes must not inherit this process's port). Returns
    True when it created the group (the caller owns it and may tear it down).
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    if dist.is_initialized() and parallel_state.model_parallel_is_initialized():
        if parallel_state.get_tensor_model_parallel_world_size() != 1 or \
                parallel_state.get_pipeline_model_parallel_world_size() != 1:
            raise RuntimeError("loading a full model for inference needs TP=1 and PP=1 in this process")
        return False
    import os

    from calm_megatron import distributed

    keys = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    saved = {key: os.environ.pop(key, None) for key in keys}
    try:
        distributed.init(tp=1, pp=1, seed=seed, init_deepspeed=False)
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None)
            if value is not None:
                os.environ[key] = value
    return True


def build_model(kind: str, model_cfg: Optional[C.ModelConfig], ae_cfg: Optional[C.AutoencoderConfig],
                precision: str = "fp32") -> torch.nn.Module:
    """Our model of ``kind`` with uninitialised weights (to be loaded), on this process (TP=1)."""
    from calm_megatron.models.autoencoder import build_autoencoder

    if kind == "ae":
        return build_autoencoder(ae_cfg, precision, perform_initialization=False)
    if kind == "calm":
        from calm_megatron.models.calm import build_calm

        autoencoder = build_autoencoder(ae_cfg, precision, perform_initialization=False)
        return build_calm(model_cfg, autoencoder, precision, perform_initialization=False)
    if kind == "ar":
        from calm_megatron.models.ar import build_ar

        return build_ar(model_cfg, precision, perform_initialization=False)
    raise ValueError(f"unknown model kind {kind!r}")


def copy_into(model: torch.nn.Module, tensors: Iterable[Tuple[str, torch.Tensor]], source: str) -> None:
    """Copy canonical tensors into ``model``'s parameters; every parameter exactly once, shapes equal."""
    own = dict(model.named_parameters())
    seen = set()
    with torch.no_grad():
        for name, tensor in tensors:
            if name not in own:
                raise ValueError(f"{source}: tensor {name} has no parameter in the model")
            if tuple(tensor.shape) != tuple(own[name].shape):
                raise ValueError(f"{source}: tensor {name} has shape {tuple(tensor.shape)}, the model expects "
                                 f"{tuple(own[name].shape)}")
            own[name].copy_(tensor.to(own[name].dtype))
            seen.add(name)
    missing = sorted(set(own) - seen)
    if missing:
        raise ValueError(f"{source}: no tensor for {len(missing)} parameters, e.g. {missing[:3]}")


def load_checkpoint_model(path: str, precision: str = "fp32", check_manifest: bool = True) -> LoadedModel:
    """A step of ours (step, checkpoints or run folder; any TP/PP layout) as a TP=1 model.

    ``check_manifest`` verifies the step's checksums first.
    """
    from calm_megatron.hf.shards import CheckpointReader

    ensure_runtime()
    reader = CheckpointReader(path, check_manifest=check_manifest)
    model = build_model(reader.kind, reader.model_cfg, reader.ae_cfg, precision)
    copy_into(model, ((name, reader.tensor(name)) for name in reader.params), str(reader.step))
    tokenizer = reader.cfg.data.tokenizer if reader.cfg.data.tokenizer and Path(reader.cfg.data.tokenizer).exists() else ""
    return LoadedModel(model.eval(), reader.kind, tokenizer, reader.step, reader.cfg)


def load_hf_model(folder: str, precision: str = "fp32") -> LoadedModel:
    """An HF folder (reference Autoencoder / EnergyTransformer, or Llama) as our TP=1 model."""
    ensure_runtime()
    source = HFSource(folder)
    model = build_model(source.kind, source.model_cfg, source.ae_cfg, precision)
    copy_into(model, source.tensors(), str(source.folder))
    tokenizer = ""
    if any((source.folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        tokenizer = str(source.folder)
    cfg = C.Config()
    cfg.run.stage, cfg.data.tokenizer = source.kind, tokenizer
    if source.model_cfg is not None:
        cfg.model = source.model_cfg
    if source.ae_cfg is not None:
        cfg.autoencoder = source.ae_cfg
    return LoadedModel(model.eval(), source.kind, tokenizer, source.folder, cfg)


def load_hf_as_ours(folder: str, precision: str = "fp32") -> torch.nn.Module:
    """Our model (eval mode) holding the weights of an HF folder."""
    return load_hf_model(folder, precision).model


def load_model(path: str, precision: str = "fp32") -> LoadedModel:
    """Our checkpoint or an HF folder, whichever ``path`` is."""
    return load_hf_model(path, precision) if is_hf_folder(path) else load_checkpoint_model(path, precision)
