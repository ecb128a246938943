"""Sharded, verifiable, layout-independent checkpoints.

Layout of one step (see docs/checkpoints.md):

    <save>/step_{N:08d}/
        model/tp{T:02d}_pp{P:02d}.safetensors   fp32 master weights + optimizer moments of one TP shard
                                               of one pipeline stage (written by its DP rank 0)
        model/tp{T:02d}_pp{P:02d}.json          per tensor: TP partition dim (-1: replicated), shape
        rng/rank{R:05d}.safetensors + .json     this rank's CPU/CUDA/Megatron-tracker/numpy/python RNG
        trainer_state.json                     step, tokens, LR schedule, loader state, layout
        config.yaml                            the resolved config (no secrets)
        autoencoder.safetensors + .json        stage 1 only: the full AE, read by stage 2
        manifest.json                          every file above with its size and xxh64 (written last)
    <save>/latest                              the name of the last complete step (atomic rename)

ZeRO partitions are gathered over the data-parallel group with DeepSpeed's `safe_get_full_*` API,
so a step can be loaded at any data-parallel size and ZeRO stage, and at another tensor-parallel
size (shards are concatenated along their partition dim and re-sliced). Nothing is unpickled: every
tensor file is safetensors, everything else JSON.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from calm_megatron import config as C

log = logging.getLogger("calm_megatron")

LATEST = "latest"
MANIFEST = "manifest.json"
AE_WEIGHTS = "autoencoder.safetensors"
AE_CONFIG = "autoencoder.json"
OPT_KEYS = {"adamw": ("exp_avg", "exp_avg_sq"), "sgd": ("momentum_buffer",)}


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, corrupt or incompatible."""


def step_dir(save_dir: str, step: int) -> Path:
    return Path(save_dir) / f"step_{step:08d}"


def _file_hash(path: Path) -> str:
    import xxhash

    digest = xxhash.xxh64()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _tp_info() -> Tuple[int, int]:
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()


def _partition_dim(param: torch.Tensor) -> int:
    tp, _ = _tp_info()
    return param.partition_dim if getattr(param, "tensor_model_parallel", False) and tp > 1 else -1


# --------------------------------------------------------------------------- model + optimizer state

def _optimizer_kind(engine) -> str:
    opt = engine.optimizer
    if hasattr(opt, "single_partition_of_fp32_groups"):
        return "zero"
    if hasattr(opt, "fp32_groups_flat_partition"):
        return "bf16"
    return "torch"


def _opt_keys(cfg: C.Config) -> Tuple[str, ...]:
    if cfg.optim.optimizer == "sgd" and cfg.optim.momentum == 0:
        return ()
    return OPT_KEYS[cfg.optim.optimizer]


def _master_and_states(engine, param, keys) -> Dict[str, torch.Tensor]:
    """The fp32 master weight and optimizer states of `param` (full over data parallel)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if not param.requires_grad:
        return {"model": param.detach().float()}
    if _optimizer_kind(engine) == "torch":
        state = engine.optimizer.state.get(param, {})
        out = {"model": param.detach().float()}
        out.update({k: state[k].detach().float() for k in keys if k in state})
        return out
    out = {"model": safe_get_full_fp32_param(param)}
    for key in keys:
        out[key] = safe_get_full_optimizer_state(param, key)
    return out


def safe_full(param, key: str) -> torch.Tensor:
    """The full optimizer state `key` of `param` under ZeRO (for tools and benchmarks)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    return safe_get_full_optimizer_state(param, key)


def _optimizer_step(engine) -> int:
    opt = engine.optimizer if _optimizer_kind(engine) == "torch" else engine.optimizer.optimizer
    for state in opt.state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def _relink_optimizer_fragments(engine) -> None:
    """Point every parameter's ZeRO fragment at its optimizer state.

    DeepSpeed 0.19.8 links the fragments once, right after stepping the *first* param group, so the
    parameters of later groups (our no-weight-decay group) never see their exp_avg/exp_avg_sq.
    """
    from deepspeed.utils import lazy_init_hp_params_optimizer_state

    kind = _optimizer_kind(engine)
    if kind == "torch":
        return
    zero = engine.optimizer
    flats = zero.single_partition_of_fp32_groups if kind == "zero" else zero.fp32_groups_flat_partition
    groups = zero.bit16_groups if kind == "zero" else zero.bf16_groups
    for group, flat in zip(groups, flats):
        if flat in zero.optimizer.state:
            lazy_init_hp_params_optimizer_state(group, flat, zero.optimizer.state)


def save_model_shard(engine, cfg: C.Config, directory: Path, layout) -> None:
    """Write this (TP, PP) shard's weights and optimizer state; collective over the DP group."""
    from safetensors.torch import save_file

    keys = _opt_keys(cfg)
    _relink_optimizer_fragments(engine)
    tensors: Dict[str, torch.Tensor] = {}
    meta: Dict[str, dict] = {}
    for name, param in engine.module.named_parameters():
        for kind, value in _master_and_states(engine, param, keys).items():
            tensors[f"{kind}/{name}"] = value.detach().cpu().contiguous()
        meta[name] = {"partition_dim": _partition_dim(param), "shape": list(param.shape),
                      "trainable": bool(param.requires_grad)}
    for name, buf in engine.module.named_buffers():
        if buf is not None and not name.endswith("_extra_state"):
            tensors[f"buffer/{name}"] = buf.detach().cpu().contiguous()
    if layout.dp_rank == 0:
        stem = directory / "model" / f"tp{layout.tp_rank:02d}_pp{layout.pp_rank:02d}"
        stem.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, f"{stem}.safetensors")
        stem.with_suffix(".json").write_text(json.dumps({"tp": layout.tp, "params": meta,
                                                         "optimizer_step": _optimizer_step(engine)}))


def _read_stage_shards(directory: Path, pp_rank: int) -> Tuple[List[Dict[str, torch.Tensor]], dict]:
    from safetensors.torch import load_file

    metas = sorted((directory / "model").glob(f"tp*_pp{pp_rank:02d}.json"))
    if not metas:
        raise CheckpointError(f"{directory}: no model shards for pipeline stage {pp_rank}")
    meta = json.loads(metas[0].read_text())
    if len(metas) != meta["tp"]:
        raise CheckpointError(f"{directory}: {len(metas)} of {meta['tp']} tensor-parallel shards present")
    shards = [load_file(str(m.with_suffix(".safetensors"))) for m in metas]
    return shards, meta


def _full_tensor(shards, meta, key: str, name: str) -> torch.Tensor:
    dim = meta["params"][name]["partition_dim"]
    if dim < 0 or len(shards) == 1:
        return shards[0][key]
    return torch.cat([shard[key] for shard in shards], dim=dim)


def _my_slice(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    tp, rank = _tp_info()
    if getattr(param, "tensor_model_parallel", False) and tp > 1:
        full = full.chunk(tp, dim=param.partition_dim)[rank]
    return full


def _ensure_optimizer_state(engine, keys, step: int) -> None:
    """Create optimizer state entries (lazy in torch) so that loaded moments have a home."""
    kind = _optimizer_kind(engine)
    if kind == "torch":
        for group in engine.optimizer.param_groups:
            for p in group["params"]:
                state = engine.optimizer.state[p]
                state["step"] = torch.tensor(float(step))
                for key in keys:
                    state.setdefault(key, torch.zeros_like(p, memory_format=torch.preserve_format))
        return
    zero = engine.optimizer
    flats = zero.single_partition_of_fp32_groups if kind == "zero" else zero.fp32_groups_flat_partition
    for flat in flats:
        state = zero.optimizer.state[flat]
        state["step"] = torch.tensor(float(step))
        for key in keys:
            state.setdefault(key, torch.zeros_like(flat))
    _relink_optimizer_fragments(engine)
    if hasattr(zero, "_hp_optimizer_states_linked"):
        zero._hp_optimizer_states_linked = True


def load_model_shard(engine, cfg: C.Config, directory: Path, layout, weights_only: bool = False) -> None:
    """Load weights (and optimizer state unless `weights_only`) at this rank's TP/PP/DP layout."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    shards, meta = _read_stage_shards(directory, layout.pp_rank)
    keys = () if weights_only else _opt_keys(cfg)
    own = dict(engine.module.named_parameters())
    if set(own) != set(meta["params"]):
        missing, extra = sorted(set(own) - set(meta["params"])), sorted(set(meta["params"]) - set(own))
        raise CheckpointError(f"{directory}: parameters differ from the model: missing {missing[:4]}, "
                              f"unexpected {extra[:4]}")
    if keys:
        _ensure_optimizer_state(engine, keys, meta["optimizer_step"])
    kind = _optimizer_kind(engine)
    with torch.no_grad():
        for name, param in own.items():
            value = _my_slice(_full_tensor(shards, meta, f"model/{name}", name), param)
            if tuple(value.shape) != tuple(param.shape):
                raise CheckpointError(f"{directory}: tensor {name} has shape {tuple(value.shape)}, "
                                      f"the model expects {tuple(param.shape)}")
            param.copy_(value.to(param.dtype))
            if not param.requires_grad:
                continue
            if kind != "torch":
                safe_set_full_fp32_param(param, value.to(param.device))
            for key in keys:
                state = _my_slice(_full_tensor(shards, meta, f"{key}/{name}", name), param)
                if kind == "torch":
                    engine.optimizer.state[param][key] = state.to(param.device, param.dtype).clone()
                else:
                    safe_set_full_optimizer_state(param, state.to(param.device), key)
        for name, buf in engine.module.named_buffers():
            if buf is not None and f"buffer/{name}" in shards[0]:
                buf.copy_(shards[0][f"buffer/{name}"])


# --------------------------------------------------------------------------- RNG

def _rng_state() -> Tuple[Dict[str, torch.Tensor], dict]:
    from megatron.core.tensor_parallel import random as mrandom

    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    for name, state in mrandom.get_cuda_rng_tracker().get_states().items():
        tensors[f"tracker/{name}"] = state.clone() if torch.is_tensor(state) else state.get_state()
    np_state = np.random.get_state()
    extra = {"python": list(random.getstate()[1]), "python_version": random.getstate()[0],
             "python_gauss": random.getstate()[2],
             "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    return tensors, extra


def save_rng(directory: Path, rank: int) -> None:
    from safetensors.torch import save_file

    tensors, extra = _rng_state()
    stem = directory / "rng" / f"rank{rank:05d}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, f"{stem}.safetensors")
    stem.with_suffix(".json").write_text(json.dumps(extra))


def load_rng(directory: Path, rank: int) -> bool:
    """Restore this rank's RNG streams; False when the step has none for this rank (other layout)."""
    from megatron.core.tensor_parallel import random as mrandom
    from safetensors.torch import load_file

    stem = directory / "rng" / f"rank{rank:05d}"
    if not stem.with_suffix(".safetensors").is_file():
        return False
    tensors, extra = load_file(f"{stem}.safetensors"), json.loads(stem.with_suffix(".json").read_text())
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available() and "torch_cuda" in tensors:
        torch.cuda.set_rng_state(tensors["torch_cuda"])
    tracker = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("tracker/")}
    mrandom.get_cuda_rng_tracker().set_states(tracker)
    random.setstate((extra["python_version"], tuple(extra["python"]), extra["python_gauss"]))
    n = extra["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    return True


# --------------------------------------------------------------------------- manifest, latest, pruning

def write_manifest(directory: Path) -> None:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {str(p.relative_to(directory)): {"bytes": p.stat().st_size, "xxh64": _file_hash(p)} for p in files}
    tmp = directory / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"files": entries}, indent=1))
    os.replace(tmp, directory / MANIFEST)


def verify(directory: Path) -> None:
    """Refuse a step whose manifest is missing or whose files differ from it (naming the file)."""
    manifest = directory / MANIFEST
    if not manifest.is_file():
        raise CheckpointError(f"{directory}: no {MANIFEST}: the step is incomplete (crashed while saving?)")
    for rel, entry in json.loads(manifest.read_text())["files"].items():
        path = directory / rel
        if not path.is_file():
            raise CheckpointError(f"{path}: listed in the manifest but missing")
        if path.stat().st_size != entry["bytes"]:
            raise CheckpointError(f"{path}: size {path.stat().st_size} != {entry['bytes']} in the manifest")
        if _file_hash(path) != entry["xxh64"]:
            raise CheckpointError(f"{path}: checksum differs from the manifest (corrupt file)")


def _publish_latest(save_dir: Path, directory: Path) -> None:
    tmp = save_dir / f".{LATEST}.tmp"
    tmp.write_text(directory.name)
    os.replace(tmp, save_dir / LATEST)


def _prune(save_dir: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    steps = sorted(p for p in save_dir.glob("step_*") if (p / MANIFEST).is_file())
    for old in steps[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def complete_steps(save_dir: str) -> List[Path]:
    """Step directories with a manifest, newest first."""
    return sorted((p for p in Path(save_dir).glob("step_*") if (p / MANIFEST).is_file()), reverse=True)


def find_resume_step(save_dir: str) -> Optional[Path]:
    """The step named by `latest`, verified; falls back to older complete steps with a warning."""
    latest = Path(save_dir) / LATEST
    if not latest.is_file():
        return None
    candidates = [Path(save_dir) / latest.read_text().strip()]
    candidates += [p for p in complete_steps(save_dir) if p != candidates[0]]
    for candidate in candidates:
        try:
            verify(candidate)
            return candidate
        except CheckpointError as err:
            log.warning("cannot resume from %s: %s; trying the previous complete step", candidate, err)
    raise CheckpointError(f"{save_dir}: '{LATEST}' exists but no complete, valid step was found")


# --------------------------------------------------------------------------- whole steps

def save(trainer_state: dict, engine, cfg: C.Config, layout, export=None, fault_hook=None) -> Path:
    """Save a complete step. Every rank writes its part; `latest` moves only after all are done."""
    directory = step_dir(cfg.save_dir, trainer_state["step"])
    if layout.rank == 0 and directory.exists():
        shutil.rmtree(directory)  # a leftover of a crashed save of this same step
    dist.barrier()
    save_model_shard(engine, cfg, directory, layout)
    save_rng(directory, layout.rank)
    if fault_hook is not None:
        fault_hook(directory)
    if export is not None:
        export(engine.module, directory)
    if layout.rank == 0:
        C.save(cfg, str(directory / "config.yaml"))
        (directory / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
    dist.barrier()
    if layout.rank == 0:
        write_manifest(directory)
        _publish_latest(Path(cfg.save_dir), directory)
        _prune(Path(cfg.save_dir), cfg.checkpoint.keep_last)
    dist.barrier()
    return directory


def load(directory: Path, engine, cfg: C.Config, layout, weights_only: bool = False) -> dict:
    """Load a verified step into `engine`; returns its trainer state (RNG restored when layouts match)."""
    verify(directory)
    load_model_shard(engine, cfg, directory, layout, weights_only=weights_only)
    state = json.loads((directory / "trainer_state.json").read_text())
    if weights_only:
        return state
    if engine.lr_scheduler is not None:
        scheduler = engine.lr_scheduler
        scheduler.load_state_dict(state["lr_scheduler"])
        # load_state_dict restores the schedule's position but not the optimizer's current LR.
        for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr
    same_layout = state["layout"] == {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp}
    if not (same_layout and load_rng(directory, layout.rank)):
        from calm_megatron import distributed

        log.warning("resuming at another layout (%s -> tp=%d pp=%d dp=%d): RNG streams re-seeded",
                    state["layout"], layout.tp, layout.pp, layout.dp)
        distributed.seed_everything(cfg.run.seed + state["step"], layout)
    return state


# --------------------------------------------------------------------------- the frozen autoencoder

def full_state_dict(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Parameters and buffers with tensor-parallel shards gathered (collective over the TP group)."""
    from megatron.core import parallel_state as ps

    tensors = {}
    for name, param in module.named_parameters():
        value = param.detach()
        if _partition_dim(param) >= 0:
            group = ps.get_tensor_model_parallel_group()
            parts = [torch.empty_like(value) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, value.contiguous(), group=group)
            value = torch.cat(parts, dim=param.partition_dim)
        tensors[name] = value.float().cpu().clone()
    return tensors


def load_full_state_dict(module: torch.nn.Module, tensors: Dict[str, torch.Tensor], source: str) -> None:
    """Copy full (TP=1) tensors into `module`, slicing the shards this TP rank owns."""
    own = dict(module.named_parameters())
    if set(own) != set(tensors):
        missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        raise CheckpointError(f"{source}: parameter names do not match the model: missing {missing[:4]}, "
                              f"unexpected {extra[:4]}")
    with torch.no_grad():
        for name, param in own.items():
            value = _my_slice(tensors[name], param)
            if tuple(value.shape) != tuple(param.shape):
                raise CheckpointError(f"{source}: tensor {name} has shape {tuple(value.shape)}, "
                                      f"the model expects {tuple(param.shape)}")
            param.copy_(value.to(param.dtype))


def save_autoencoder(module: torch.nn.Module, cfg: C.Config, directory: Path) -> None:
    """Write the AE's full weights and its config section (all TP ranks gather, rank 0 writes)."""
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
    if (p / MANIFEST).is_file() or (p / "trainer_state.json").is_file():
        return p
    raise CheckpointError(f"no checkpoint at {path}: expected a step directory, a checkpoints folder or a "
                          f"run folder with a '{LATEST}' file")


def load_autoencoder_weights(path: str) -> Tuple[C.AutoencoderConfig, Dict[str, torch.Tensor], Path]:
    """The AE config section and full weights saved by a stage-1 run (safetensors, no pickle)."""
    from safetensors.torch import load_file

    step = resolve_step(path)
    verify(step)
    weights, meta = step / AE_WEIGHTS, step / AE_CONFIG
    if not weights.is_file() or not meta.is_file():
        raise CheckpointError(f"{step} holds no autoencoder ({AE_WEIGHTS}, {AE_CONFIG}): is it a stage-1 run?")
    ae_cfg = C.from_dict({"autoencoder": json.loads(meta.read_text())}).autoencoder
    return ae_cfg, load_file(str(weights)), step
