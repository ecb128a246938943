"""A Hugging Face folder (reference Autoencoder / EnergyTransformer, or Llama) -> a step of ours.

The output is a checkpoints folder the trainer loads with ``checkpoint.load=<out>`` and
``checkpoint.finetune=true`` (weights only: an imported step has no optimizer state):

    <out>/step_00000000/      the model at TP=tp, PP=pp (model shards + JSON, config.yaml,
                              trainer_state.json, manifest.json), plus
                              hf/config.json (and autoencoder_config.json) - the HF configs, so that a
                              later export reproduces the fields ours has no place for - and
                              tokenizer/ - the folder's tokenizer files (data.tokenizer points there)
    <out>/latest
    <out>/autoencoder/step_00000000/, latest   (CALM only) the frozen autoencoder as a stage-1 step
                              with autoencoder.safetensors: model.autoencoder_checkpoint points there
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Optional

from calm_megatron import config as C
from calm_megatron.hf import mapping
from calm_megatron.hf.export import AE_SUBFOLDER, HF_STASH, TOKENIZER_STASH
from calm_megatron.hf.shards import finish_step, write_autoencoder_export, write_step
from calm_megatron.hf.source import HFSource
from calm_megatron.hf.tokenizer_files import copy_tokenizer_files

log = logging.getLogger("calm_megatron")
STEP_NAME = "step_00000000"


def _our_tokenizer_path(folder: Path) -> str:
    """``folder`` when our tokenizer loader reads it (tokenizer.json or one sentencepiece .model), else ''."""
    from calm_megatron.data.tokenizer import load_tokenizer

    try:
        load_tokenizer(folder)
        return str(folder.resolve())
    except (FileNotFoundError, ValueError, OSError) as err:
        log.warning("the tokenizer files of the HF folder are kept in %s but our loader cannot read them (%s): "
                    "set data.tokenizer yourself", folder, err)
        return ""


def _run_config(source: HFSource, stage: str, tp: int, pp: int, tokenizer: str) -> C.Config:
    cfg = C.Config()
    cfg.run.stage, cfg.run.name = stage, f"imported-{stage}"
    cfg.parallel.tp, cfg.parallel.pp = tp, pp
    cfg.data.tokenizer = tokenizer
    if source.ae_cfg is not None:
        cfg.autoencoder = source.ae_cfg
    if source.model_cfg is not None:
        cfg.model = source.model_cfg
    K = cfg.autoencoder.chunk_size if stage == "ae" else cfg.model.chunk_size
    if stage == "calm":
        cfg.train.seq_len = cfg.model.max_position_embeddings * K  # the reference's block: all chunk positions
    elif stage == "ar":
        cfg.train.seq_len = cfg.model.max_position_embeddings
    else:
        cfg.train.seq_len = max(K, 2048 // K * K)
    return cfg


def _trainer_state(source: HFSource, tp: int, pp: int) -> dict:
    return {"step": 0, "tokens_seen": 0, "lr_scheduler": None, "loader": None,
            "layout": {"tp": tp, "pp": pp, "dp": 1}, "losses": {}, "imported_from": str(source.folder.resolve())}


def _stash(step: Path, source: HFSource, autoencoder_only: bool = False) -> str:
    stash = step / HF_STASH
    stash.mkdir(parents=True, exist_ok=True)
    config = source.ae_config_dict if autoencoder_only else source.config
    if config:
        (stash / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if source.kind == "calm" and source.ae_config_dict and not autoencoder_only:
        (stash / "autoencoder_config.json").write_text(json.dumps(source.ae_config_dict, indent=2, sort_keys=True)
                                                      + "\n")
    if not autoencoder_only and (source.folder / "generation_config.json").is_file():
        shutil.copyfile(source.folder / "generation_config.json", stash / "generation_config.json")
    if copy_tokenizer_files(source.folder, step / TOKENIZER_STASH):
        return _our_tokenizer_path(step / TOKENIZER_STASH)
    log.warning("%s has no tokenizer files", source.folder)
    return ""


def _write_autoencoder_step(source: HFSource, out: Path, tp: int, te_names: bool, progress: bool) -> Path:
    """The CALM's frozen autoencoder as a complete stage-1 step (what model.autoencoder_checkpoint names)."""
    step = out / AE_SUBFOLDER / STEP_NAME
    step.mkdir(parents=True)
    rules = mapping.autoencoder_rules(source.ae_cfg, "", mapping.AE_PREFIX_HF)
    params = mapping.params_of(rules)
    shapes = {name: source.shapes[mapping.AE_PREFIX_OURS + name] for name in params}
    write_step(step, params, shapes, source.tensors(rules), 0, tp, 1, te_names, progress)
    tokenizer = _stash(step, source, autoencoder_only=True)
    cfg = _run_config(source, "ae", tp, 1, tokenizer)
    cached = dict(source.tensors(rules))  # the autoencoder is small next to the CALM (75M parameters)
    write_autoencoder_export(step, cfg, cached.__getitem__, list(params), shapes)
    finish_step(step, cfg, _trainer_state(source, tp, 1))
    return step.parent


def import_hf(folder: str, out: str, tp: int = 1, pp: int = 1, *, te_names: bool = False,
              ae_folder: Optional[str] = None, overwrite: bool = False, progress: bool = False) -> Path:
    """Convert an HF folder into a checkpoints folder of ours at TP=tp, PP=pp; returns the step written."""
    source = HFSource(folder, ae_folder)
    out_dir = Path(out)
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out_dir} exists and is not empty (use --overwrite to replace it)")
        if not (out_dir / "latest").is_file():
            raise FileExistsError(f"{out_dir} is not empty and holds no 'latest': not replacing it")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if source.kind == "ae" and pp != 1:
        raise ValueError("the autoencoder has no attention and is never pipelined: use --pp 1")
    log.info("importing %s (%s) into %s at tp=%d pp=%d", source.folder, source.kind, out_dir, tp, pp)
    ae_checkpoint = None
    if source.kind == "calm":
        ae_checkpoint = _write_autoencoder_step(source, out_dir, tp, te_names, progress)
    step = out_dir / STEP_NAME
    step.mkdir()
    num_layers = source.model_cfg.num_layers if source.model_cfg is not None else 0
    write_step(step, source.params, source.shapes, source.tensors(), num_layers, tp, pp, te_names, progress)
    tokenizer = _stash(step, source)
    cfg = _run_config(source, source.kind, tp, pp, tokenizer)
    if ae_checkpoint is not None:
        cfg.model = dataclasses.replace(cfg.model, autoencoder_checkpoint=str(ae_checkpoint.resolve()))
    if source.kind == "ae":
        write_autoencoder_export(step, cfg, dict(source.tensors()).__getitem__, list(source.params), source.shapes)
    finish_step(step, cfg, _trainer_state(source, tp, pp))
    return step
