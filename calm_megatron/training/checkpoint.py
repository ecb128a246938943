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
size (shards are concatenated along their partition dim and re-sliced; SwiGLU shards regrouped,
vocab padding adjusted) or pipeline size (tensor names use global layer indices, see `global_names`). Nothing is unpickled: every
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
from calm_megatron.hashing import file_digest

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


def _tp_info() -> Tuple[int, int]:
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()


def _partition_dim(param: torch.Tensor) -> int:
    tp, _ = _tp_info()
    return param.partition_dim if getattr(param, "tensor_model_parallel", False) and tp > 1 else -1


def glu_parameter_names(module: torch.nn.Module) -> set:
    """Names of the gated (SwiGLU) `linear_fc1` weights of Megatron MLPs.

    Each TP shard of such a weight is [gates of the shard; ups of the shard], so the full (TP=1)
    tensor is [all gates; all ups]: shards are regrouped, not concatenated (platform notes).
    """
    from megatron.core.transformer.mlp import MLP

    names = set()
    for prefix, sub in module.named_modules():
        if isinstance(sub, MLP) and getattr(sub.config, "gated_linear_unit", False):
            for pname, param in sub.linear_fc1.named_parameters():
                if getattr(param, "tensor_model_parallel", False) and getattr(param, "partition_dim", -1) == 0:
                    names.add(f"{prefix}.linear_fc1.{pname}" if prefix else f"linear_fc1.{pname}")
    return names


def global_names(module: torch.nn.Module) -> Dict[str, str]:
    """Module-local parameter/buffer names -> stage-independent names.

    Megatron numbers the layers of a TransformerBlock per pipeline stage (`layers.0` on every
    stage); checkpoints use the global layer index (`layer_number - 1`), so that a step saved at
    one pipeline size loads at another.
    """
    from megatron.core.transformer.transformer_block import TransformerBlock

    offsets = {}
    for prefix, sub in module.named_modules():
        if isinstance(sub, TransformerBlock) and len(sub.layers) and sub.layers[0].layer_number > 1:
            offsets[f"{prefix}.layers." if prefix else "layers."] = sub.layers[0].layer_number - 1
    mapping = {}
    for name, _ in list(module.named_parameters()) + list(module.named_buffers()):
        mapping[name] = name
        for prefix, offset in offsets.items():
            if name.startswith(prefix):
                index, rest = name[len(prefix):].split(".", 1)
                mapping[name] = f"{prefix}{int(index) + offset}.{rest}"
    return mapping


def _split_tp(full: torch.Tensor, dim: int, glu: bool) -> List[torch.Tensor]:
    """The TP shards of a full tensor (GLU weights: each shard takes its slice of gates and of ups)."""
    tp, _ = _tp_info()
    if not glu:
        return list(full.chunk(tp, dim=dim))
    gates, ups = full.chunk(2, dim=dim)
    return [torch.cat(pair, dim=dim) for pair in zip(gates.chunk(tp, dim=dim), ups.chunk(tp, dim=dim))]


def _join_tp(parts: List[torch.Tensor], dim: int, glu: bool) -> torch.Tensor:
    """The full tensor from its TP shards (inverse of :func:`_split_tp`)."""
    if not glu:
        return torch.cat(parts, dim=dim)
    halves = [part.chunk(2, dim=dim) for part in parts]
    return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=dim)


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
    names, glu = global_names(engine.module), glu_parameter_names(engine.module)
    for local, param in engine.module.named_parameters():
        name = names[local]
        for kind, value in _master_and_states(engine, param, keys).items():
            tensors[f"{kind}/{name}"] = value.detach().cpu().contiguous()
        meta[name] = {"partition_dim": _partition_dim(param), "shape": list(param.shape),
                      "trainable": bool(param.requires_grad), "glu": local in glu}
    for local, buf in engine.module.named_buffers():
        if buf is not None and not local.endswith("_extra_state"):
            tensors[f"buffer/{names[local]}"] = buf.detach().cpu().contiguous()
    if layout.dp_rank == 0:
        stem = directory / "model" / f"tp{layout.tp_rank:02d}_pp{layout.pp_rank:02d}"
        stem.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, f"{stem}.safetensors")
        stem.with_suffix(".json").write_text(json.dumps({"tp": layout.tp, "params": meta,
                                                         "optimizer_step": _optimizer_step(engine)}))


class _ModelShards:
    """The model shards of one step, every pipeline stage, read lazily (one tensor at a time).

    Tensors are addressed by stage-independent name (see :func:`global_names`), so a rank finds
    its parameters whatever the pipeline size of the saving run was.
    """

    def __init__(self, directory: Path):
        from safetensors import safe_open

        metas = sorted((directory / "model").glob("tp*_pp*.json"))
        if not metas:
            raise CheckpointError(f"{directory}: no model shards")
        stages: Dict[int, List[Path]] = {}
        for path in metas:
            stages.setdefault(int(path.stem.split("_pp")[1]), []).append(path)
        self.params: Dict[str, dict] = {}
        self.files: Dict[str, list] = {}
        self.optimizer_step = 0
        for stage, paths in sorted(stages.items()):
            meta = json.loads(paths[0].read_text())
            if len(paths) != meta["tp"]:
                raise CheckpointError(f"{directory}: {len(paths)} of {meta['tp']} tensor-parallel shards "
                                      f"present for pipeline stage {stage}")
            handles = [safe_open(str(p.with_suffix(".safetensors")), framework="pt") for p in paths]
            self.optimizer_step = max(self.optimizer_step, meta.get("optimizer_step", 0))
            for name, entry in meta["params"].items():
                self.params[name] = entry
                self.files[name] = handles
            for key in handles[0].keys():
                if key.startswith("buffer/"):
                    self.files.setdefault(key, handles)
        self.stages = sorted(stages)

    def has(self, key: str, name: str) -> bool:
        handles = self.files.get(name) or self.files.get(f"buffer/{name}")
        return bool(handles) and f"{key}/{name}" in handles[0].keys()

    def full(self, key: str, name: str) -> torch.Tensor:
        """The full (TP-joined) tensor `key/name` (key: model, an optimizer state, or buffer)."""
        if key == "buffer":
            return self.files[f"buffer/{name}"][0].get_tensor(f"buffer/{name}")
        entry, handles = self.params[name], self.files[name]
        parts = [h.get_tensor(f"{key}/{name}") for h in handles]
        if entry["partition_dim"] < 0 or len(parts) == 1:
            return parts[0]
        return _join_tp(parts, entry["partition_dim"], entry.get("glu", False))


# Vocabulary tables are padded to a multiple of TP with zero rows at the end (128257 -> 128258 at
# TP=2): between TP sizes the padding differs by less than the larger TP size.
MAX_VOCAB_PADDING = 64


def _fit_vocab_padding(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """Zero-pad or cut the trailing padding rows of a vocab-parallel table to this TP size's padding."""
    tp, _ = _tp_info()
    dim = getattr(param, "partition_dim", -1)
    if not getattr(param, "tensor_model_parallel", False) or dim < 0:
        return full
    rows = param.shape[dim] * tp
    diff = rows - full.shape[dim]
    if diff == 0 or abs(diff) >= MAX_VOCAB_PADDING:
        return full  # equal, or not a padding difference: the caller's shape check reports it
    if diff < 0:
        cut = full.narrow(dim, rows, -diff)
        if cut.abs().max() != 0:
            return full  # real rows, not padding
        return full.narrow(dim, 0, rows)
    pad_shape = list(full.shape)
    pad_shape[dim] = diff
    return torch.cat([full, full.new_zeros(pad_shape)], dim=dim)


def _my_slice(full: torch.Tensor, param: torch.Tensor, glu: bool = False) -> torch.Tensor:
    tp, rank = _tp_info()
    full = _fit_vocab_padding(full, param)
    if getattr(param, "tensor_model_parallel", False) and tp > 1:
        full = _split_tp(full, param.partition_dim, glu)[rank]
    return full


def _check_names(directory: Path, shards: "_ModelShards", own: Dict[str, str]) -> None:
    """Every parameter of this stage is in the step, and every parameter of the step is on some stage."""
    from megatron.core import parallel_state as ps

    missing = sorted(set(own.values()) - set(shards.params))
    stage_names = [None] * dist.get_world_size(ps.get_pipeline_model_parallel_group())
    dist.all_gather_object(stage_names, sorted(own.values()), group=ps.get_pipeline_model_parallel_group())
    extra = sorted(set(shards.params) - set().union(*map(set, stage_names)))
    if missing or extra:
        raise CheckpointError(f"{directory}: parameters differ from the model: missing {missing[:4]}, "
                              f"unexpected {extra[:4]}")


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

    shards = _ModelShards(directory)
    keys = () if weights_only else _opt_keys(cfg)
    names, glu = global_names(engine.module), glu_parameter_names(engine.module)
    own = dict(engine.module.named_parameters())
    _check_names(directory, shards, {local: names[local] for local in own})
    if keys:
        _ensure_optimizer_state(engine, keys, shards.optimizer_step)
    kind = _optimizer_kind(engine)
    with torch.no_grad():
        for local, param in own.items():
            name = names[local]
            value = _my_slice(shards.full("model", name), param, local in glu)
            if tuple(value.shape) != tuple(param.shape):
                raise CheckpointError(f"{directory}: tensor {name} has shape {tuple(value.shape)}, "
                                      f"the model expects {tuple(param.shape)}")
            param.copy_(value.to(param.dtype))
            if not param.requires_grad:
                continue
            if kind != "torch":
                safe_set_full_fp32_param(param, value.to(param.device))
            for key in keys:
                state = _my_slice(shards.full(key, name), param, local in glu)
                if kind == "torch":
                    engine.optimizer.state[param][key] = state.to(param.device, param.dtype).clone()
                else:
                    safe_set_full_optimizer_state(param, state.to(param.device), key)
        for local, buf in engine.module.named_buffers():
            if buf is not None and shards.has("buffer", names[local]):
                buf.copy_(shards.full("buffer", names[local]))


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
    entries = {str(p.relative_to(directory)): {"bytes": p.stat().st_size, "xxh64": file_digest(p)} for p in files}
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
        if file_digest(path) != entry["xxh64"]:
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
    state = json.loads((directory / "trainer_state.json").read_text())
    if not weights_only and "lr_scheduler" not in state:
        raise CheckpointError(f"{directory} holds weights only (an imported or exported model, no optimizer "
                              f"or data state): load it with checkpoint.finetune=true")
    load_model_shard(engine, cfg, directory, layout, weights_only=weights_only)
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
    """Parameters with tensor-parallel shards gathered (collective over the TP group), by global name.

    The names are stage-independent (see :func:`global_names`); under pipeline parallelism each
    stage returns its own part of the model.
    """
    from megatron.core import parallel_state as ps

    names, glu = global_names(module), glu_parameter_names(module)
    tensors = {}
    for local, param in module.named_parameters():
        value = param.detach()
        if _partition_dim(param) >= 0:
            group = ps.get_tensor_model_parallel_group()
            parts = [torch.empty_like(value) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, value.contiguous(), group=group)
            value = _join_tp(parts, param.partition_dim, local in glu)
        tensors[names[local]] = value.float().cpu().clone()
    return tensors


def load_full_state_dict(module: torch.nn.Module, tensors: Dict[str, torch.Tensor], source: str,
                         strict: bool = True) -> None:
    """Copy full (TP=1) tensors, by global name, into `module`, slicing the shards this TP rank owns.

    `strict=False` allows `tensors` to hold more than this module (another pipeline stage's part).
    """
    names, glu = global_names(module), glu_parameter_names(module)
    own = {names[local]: (local, param) for local, param in module.named_parameters()}
    missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or (strict and extra):
        raise CheckpointError(f"{source}: parameter names do not match the model: missing {missing[:4]}, "
                              f"unexpected {extra[:4]}")
    with torch.no_grad():
        for name, (local, param) in own.items():
            value = _my_slice(tensors[name], param, local in glu)
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
