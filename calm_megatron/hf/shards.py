"""Our sharded checkpoint steps, read and written one tensor at a time, at any TP/PP layout.

A step (see ``calm_megatron/training/checkpoint.py``) holds ``model/tp{T}_pp{P}.safetensors`` with
keys ``model/<name>`` (and optimizer moments ``exp_avg/<name>``...) plus a JSON per file with each
parameter's TP ``partition_dim`` and local shape. Names are those of ``named_parameters()`` on that
pipeline stage: Megatron-Core numbers a stage's layers from 0.

:class:`CheckpointReader` turns that into *canonical* tensors: full (TP=1) parameters under their
PP=1, local-spec names, with
- shards concatenated along their partition dim, except SwiGLU ``linear_fc1``, whose every shard
  is [its gates; its ups] and which is regrouped into [all gates; all ups];
- the vocabulary padding that TP adds (rows past ``vocab_size``) removed;
- stage-local layer numbers made global, Transformer Engine's fused-norm names mapped to the
  local spec's.
:func:`write_step` does the inverse for any TP/PP and writes a complete step (manifest, ``latest``).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F
import yaml

from calm_megatron import config as C
from calm_megatron.hf import mapping
from calm_megatron.hf.tensor_io import SafetensorsWriter, iter_progress
from calm_megatron.training.checkpoint import (AE_CONFIG, AE_WEIGHTS, LATEST, CheckpointError, resolve_step,
                                               verify, write_manifest)

_SHARD = re.compile(r"^tp(\d+)_pp(\d+)\.json$")


def padded_vocab(vocab_size: int, tp: int) -> int:
    """Rows of a vocabulary-parallel table at TP size ``tp`` (Megatron splits it evenly)."""
    return -(-vocab_size // tp) * tp


@dataclass
class _Entry:
    stage: int
    local: str  # the name in the stage's files
    partition_dim: int
    local_shape: Tuple[int, ...]
    trainable: bool
    glu: Optional[bool]  # recorded by newer steps: a SwiGLU fc1 whose shards are [gates; ups]


class CheckpointReader:
    """Canonical full tensors of one step of ours, streamed from its shard files (see module doc)."""

    def __init__(self, path: os.PathLike, check_manifest: bool = True):
        self.step = resolve_step(str(path))
        if check_manifest:
            verify(self.step)
        config_file = self.step / "config.yaml"
        if not config_file.is_file():
            raise CheckpointError(f"{self.step}: no config.yaml")
        self.cfg = C.from_dict(yaml.safe_load(config_file.read_text()))
        self.kind = self.cfg.run.stage
        self._handles: Dict[Tuple[int, int], object] = {}
        self._read_layout()
        shapes = {name: self._full_shape_raw(name) for name in self.entries}
        self.model_cfg = self.cfg.model if self.kind != "ae" else None
        self.ae_cfg = self._autoencoder_config(shapes)
        self.rules = mapping.rules_for(self.kind, self.model_cfg, self.ae_cfg)
        self.params = mapping.params_of(self.rules)
        self._check_against_rules(shapes)

    # ----------------------------------------------------------------- layout

    def _read_layout(self) -> None:
        files = {}
        for meta_file in sorted((self.step / "model").glob("tp*_pp*.json")):
            match = _SHARD.match(meta_file.name)
            if match:
                files[(int(match.group(2)), int(match.group(1)))] = meta_file
        if not files:
            raise CheckpointError(f"{self.step}: no model shards (model/tp*_pp*.json)")
        stages = sorted({p for p, _ in files})
        if stages != list(range(len(stages))):
            raise CheckpointError(f"{self.step}: pipeline stages {stages} are not 0..{len(stages) - 1}")
        self.pp = len(stages)
        self.meta: Dict[Tuple[int, int], dict] = {key: json.loads(f.read_text()) for key, f in files.items()}
        self.tp = self.meta[(0, 0)]["tp"]
        for stage in stages:
            ranks = sorted(t for p, t in files if p == stage)
            if ranks != list(range(self.tp)):
                raise CheckpointError(f"{self.step}: stage {stage} has TP shards {ranks}, expected 0..{self.tp - 1}")
        self.entries: Dict[str, _Entry] = {}
        offset = 0
        for stage in stages:
            params = self.meta[(stage, 0)]["params"]
            for rank in range(1, self.tp):
                if set(self.meta[(stage, rank)]["params"]) != set(params):
                    raise CheckpointError(f"{self.step}: TP shards of stage {stage} list different parameters")
            layers = sorted({i for i in map(mapping.layer_index, params) if i is not None})
            # Steps name layers by their global index; older ones by the stage-local one (from 0).
            shift = offset if layers and layers[0] == 0 else 0
            for local, info in params.items():
                index = mapping.layer_index(local)
                name = mapping.canonical_name(local if index is None else mapping.with_layer_index(local, index + shift))
                if name in self.entries:
                    raise CheckpointError(f"{self.step}: parameter {name} appears on two pipeline stages")
                self.entries[name] = _Entry(stage, local, int(info["partition_dim"]), tuple(info["shape"]),
                                            bool(info.get("trainable", True)), info.get("glu"))
            offset += len(layers)
        self.num_layers = offset

    def _full_shape_raw(self, name: str) -> Tuple[int, ...]:
        entry = self.entries[name]
        shape = list(entry.local_shape)
        if entry.partition_dim >= 0 and self.tp > 1:
            shape[entry.partition_dim] *= self.tp
        return tuple(shape)

    def _autoencoder_config(self, shapes) -> Optional[C.AutoencoderConfig]:
        if self.kind == "ae":
            return self.cfg.autoencoder
        if self.kind != "calm":
            return None
        base = self.cfg.autoencoder
        ae_step = self.cfg.model.autoencoder_checkpoint
        try:  # the frozen AE's own config section, when its stage-1 step is reachable
            meta = resolve_step(ae_step) / AE_CONFIG if ae_step else None
            if meta is not None and meta.is_file():
                base = C.from_dict({"autoencoder": json.loads(meta.read_text())}).autoencoder
        except CheckpointError:
            pass
        sizes = mapping.infer_autoencoder_shapes(shapes, ours_prefix=mapping.AE_PREFIX_OURS)
        return dataclasses.replace(base, vocab_size=self.cfg.model.vocab_size, **sizes)

    def _check_against_rules(self, shapes) -> None:
        missing = [n for n in self.params if n not in self.entries]
        extra = [n for n in self.entries if n not in self.params]
        if missing or extra:
            raise CheckpointError(f"{self.step}: the {self.kind} checkpoint's parameters differ from the model's: "
                                  f"missing {missing[:4]}, unexpected {extra[:4]}")
        expected = mapping.canonical_shapes(self.rules, mapping.hf_shapes(self.kind, self.model_cfg, self.ae_cfg))
        for name, param in self.params.items():
            entry = self.entries[name]
            if self.tp > 1 and entry.partition_dim != param.partition_dim:
                raise CheckpointError(f"{self.step}: tensor {name} is split along dim {entry.partition_dim}, "
                                      f"expected {param.partition_dim} (an unknown layout)")
            if entry.glu is not None and entry.glu != param.swiglu:
                raise CheckpointError(f"{self.step}: tensor {name} is marked glu={entry.glu}, expected {param.swiglu}")
            shape = list(shapes[name])
            if param.vocab and shape[0] == padded_vocab(expected[name][0], self.tp):
                shape[0] = expected[name][0]
            if tuple(shape) != expected[name]:
                raise CheckpointError(f"{self.step}: tensor {name} has full shape {tuple(shapes[name])}, the config "
                                      f"implies {expected[name]}")

    # ----------------------------------------------------------------- tensors

    def state_keys(self) -> List[str]:
        """The kinds of state stored per parameter: 'model', and optimizer moments ('exp_avg', ...)."""
        return sorted({key.split("/", 1)[0] for key in self._handle(0, 0).keys() if not key.startswith("buffer/")})

    def _handle(self, stage: int, rank: int):
        if (stage, rank) not in self._handles:
            from safetensors import safe_open

            path = self.step / "model" / f"tp{rank:02d}_pp{stage:02d}.safetensors"
            if not path.is_file():
                raise CheckpointError(f"{path}: missing")
            self._handles[(stage, rank)] = safe_open(str(path), framework="pt")
        return self._handles[(stage, rank)]

    def shape(self, name: str) -> Tuple[int, ...]:
        """The canonical (TP=1, unpadded) shape."""
        shape = list(self._full_shape_raw(name))
        if self.params[name].vocab:
            shape[0] = self._vocab_size(name)
        return tuple(shape)

    def _vocab_size(self, name: str) -> int:
        if name.startswith(mapping.AE_PREFIX_OURS) or self.kind == "ae":
            return self.ae_cfg.vocab_size
        return self.model_cfg.vocab_size

    def tensor(self, name: str, state: str = "model") -> torch.Tensor:
        """The canonical tensor ``name`` (``state``: 'model' or an optimizer moment), fp32 as stored."""
        entry, param = self.entries[name], self.params[name]
        key = f"{state}/{entry.local}"
        parts = []
        for rank in range(self.tp if entry.partition_dim >= 0 else 1):
            handle = self._handle(entry.stage, rank)
            if key not in handle.keys():
                raise CheckpointError(f"{self.step}: tp{rank:02d}_pp{entry.stage:02d}.safetensors has no {key}")
            parts.append(handle.get_tensor(key))
        full = join_shards(parts, entry.partition_dim, param.swiglu)
        if param.vocab:
            full = full[:self._vocab_size(name)]
        return full


def join_shards(parts: List[torch.Tensor], dim: int, swiglu: bool) -> torch.Tensor:
    """TP shards -> the full tensor (SwiGLU fc1: regroup each shard's [gates; ups])."""
    if len(parts) == 1 or dim < 0:
        return parts[0]
    if swiglu:
        halves = [part.chunk(2, dim=dim) for part in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=dim)
    return torch.cat(parts, dim=dim)


def split_shards(full: torch.Tensor, tp: int, dim: int, swiglu: bool) -> List[torch.Tensor]:
    """The full tensor -> TP shards, the layout Megatron-Core's layers hold (inverse of :func:`join_shards`)."""
    if tp == 1 or dim < 0:
        return [full] * tp
    if swiglu:
        gates, ups = full.chunk(2, dim=dim)
        return [torch.cat([g, u], dim=dim) for g, u in zip(gates.chunk(tp, dim=dim), ups.chunk(tp, dim=dim))]
    return list(full.chunk(tp, dim=dim))


# --------------------------------------------------------------------------- writing a step

def _pad_vocab(tensor: torch.Tensor, tp: int) -> torch.Tensor:
    rows = padded_vocab(tensor.shape[0], tp)
    return F.pad(tensor, (0, 0, 0, rows - tensor.shape[0])) if rows != tensor.shape[0] else tensor


def plan_layout(params: Dict[str, mapping.Param], shapes: Dict[str, Tuple[int, ...]], num_layers: int,
                tp: int, pp: int, te_names: bool = False):
    """Per (stage, rank): {file name: (local shape, Param)} of a model split at TP=tp, PP=pp.

    Files name parameters as the trainer saves them: layers by their global index (whatever the
    stage), Transformer Engine's fused-norm names with ``te_names``.
    """
    if num_layers % pp:
        raise ValueError(f"{num_layers} layers cannot be split evenly over pp={pp} pipeline stages")
    plan: Dict[Tuple[int, int], Dict[str, Tuple[Tuple[int, ...], mapping.Param]]] = {
        (stage, rank): {} for stage in range(pp) for rank in range(tp)}
    for name, param in params.items():
        stage, _ = mapping.pipeline_stage(name, num_layers, pp)
        file_name = mapping.te_name(name) if te_names else name
        shape = list(shapes[name])
        if param.vocab:
            shape[0] = padded_vocab(shape[0], tp)
        if param.partition_dim >= 0 and tp > 1:
            if shape[param.partition_dim] % tp:
                raise ValueError(f"tensor {name} of shape {tuple(shapes[name])} cannot be split over tp={tp} "
                                 f"along dim {param.partition_dim}")
            shape[param.partition_dim] //= tp
        for rank in range(tp):
            plan[(stage, rank)][file_name] = (tuple(shape), param)
    return plan


def write_step(step: Path, params: Dict[str, mapping.Param], shapes: Dict[str, Tuple[int, ...]],
               tensors: Iterable[Tuple[str, torch.Tensor]], num_layers: int, tp: int, pp: int,
               te_names: bool = False, progress: bool = False) -> None:
    """Write ``model/tp*_pp*.safetensors`` + ``.json`` of a step from canonical tensors, one at a time.

    ``tensors`` yields (canonical name, full fp32 tensor) for every parameter in ``params``.
    Only weights are written (``model/<name>``): load such a step with ``checkpoint.finetune=true``.
    """
    plan = plan_layout(params, shapes, num_layers, tp, pp, te_names)
    local_of = {}
    for (stage, rank), entries in plan.items():
        for local, (_, param) in entries.items():
            local_of[param.name] = (stage, local)
    writers = {key: SafetensorsWriter(step / "model" / f"tp{key[1]:02d}_pp{key[0]:02d}.safetensors",
                                      {f"model/{local}": (shape, torch.float32) for local, (shape, _) in entries.items()})
               for key, entries in plan.items()}
    try:
        for name, full in iter_progress(tensors, len(params), "writing shards", progress):
            param = params[name]
            if tuple(full.shape) != tuple(shapes[name]):
                raise ValueError(f"tensor {name} has shape {tuple(full.shape)}, expected {tuple(shapes[name])}")
            full = full.to(torch.float32)
            if param.vocab:
                full = _pad_vocab(full, tp)
            stage, local = local_of[name]
            for rank, shard in enumerate(split_shards(full, tp, param.partition_dim, param.swiglu)):
                writers[(stage, rank)].write(f"model/{local}", shard)
        for writer in writers.values():
            writer.close()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    for (stage, rank), entries in plan.items():
        meta = {"tp": tp, "params": {local: {"partition_dim": param.partition_dim if tp > 1 else -1,
                                             "shape": list(shape), "trainable": param.trainable,
                                             "glu": param.swiglu}
                                     for local, (shape, param) in entries.items()},
                "optimizer_step": 0}
        (step / "model" / f"tp{rank:02d}_pp{stage:02d}.json").write_text(json.dumps(meta))


def finish_step(step: Path, cfg: C.Config, trainer_state: dict) -> None:
    """config.yaml, trainer_state.json, the manifest, and ``latest`` in the parent folder (last)."""
    C.save(cfg, str(step / "config.yaml"))
    (step / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
    write_manifest(step)
    tmp = step.parent / f".{LATEST}.tmp"
    tmp.write_text(step.name)
    os.replace(tmp, step.parent / LATEST)


def write_autoencoder_export(step: Path, cfg: C.Config, tensors: Callable[[str], torch.Tensor],
                             names: List[str], shapes: Dict[str, Tuple[int, ...]]) -> None:
    """The stage-1 export a CALM run reads: ``autoencoder.safetensors`` (full AE) + ``autoencoder.json``."""
    writer = SafetensorsWriter(step / AE_WEIGHTS, {n: (shapes[n], torch.float32) for n in names},
                               metadata={"format": "calm-megatron-ae"})
    try:
        for name in names:
            writer.write(name, tensors(name).to(torch.float32))
        writer.close()
    except BaseException:
        writer.abort()
        raise
    (step / AE_CONFIG).write_text(json.dumps(C.to_dict(cfg)["autoencoder"], indent=1))
