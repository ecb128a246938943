"""What differs between the training stages (autoencoder, CALM, baseline): model, metrics, eval, export."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, Iterable, List

import torch
import torch.distributed as dist

from calm_megatron import config as C

log = logging.getLogger("calm_megatron")


def _sum_over_dp(values: Dict[str, float]) -> Dict[str, float]:
    from megatron.core import parallel_state as ps

    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(tensor, group=ps.get_data_parallel_group())
    return dict(zip(keys, tensor.tolist()))


def pad_id_of(shard_dir: str) -> int:
    """The PAD id recorded by tools/prepare_data.py in the shard index (local folder or s3://)."""
    from calm_megatron.data.shards import read_shard_index

    return int(read_shard_index(shard_dir)["pad_id"])


class AutoencoderStage:
    """Stage 1: the chunk autoencoder."""

    name = "ae"

    def __init__(self, cfg: C.Config):
        self.cfg = cfg

    def build(self) -> torch.nn.Module:
        from calm_megatron.models.autoencoder import build_autoencoder

        return build_autoencoder(self.cfg.autoencoder, precision=self.cfg.train.precision)

    def no_decay(self, name, param) -> bool:
        from calm_megatron.models.autoencoder import no_weight_decay

        return no_weight_decay(name, param)

    def count_params(self, module) -> Dict[str, int]:
        from calm_megatron.models.autoencoder import count_parameters

        return {"ae_params": count_parameters(self.cfg.autoencoder)}

    def forward_kwargs(self, sample_ids: List[int]) -> Dict[str, object]:
        """Extra arguments of the training forward for the samples with these global indices."""
        return {}

    def train_metrics(self, module, output, tokens: torch.Tensor) -> Dict[str, float]:
        predicted = module.predict(output.logits.detach())
        return {"recon_acc": (predicted == tokens.to(predicted.device)).float().mean().item()}

    @torch.no_grad()
    def evaluate(self, module, batches: Iterable[torch.Tensor]) -> Dict[str, float]:
        """Held-out reconstruction: token accuracy over non-PAD tokens, exact match of whole chunks."""
        K = self.cfg.autoencoder.chunk_size
        pad = pad_id_of(self.cfg.data.valid) if self.cfg.data.valid else -1
        was_training = module.training
        module.eval()
        sums = {"tokens": 0.0, "tokens_ok": 0.0, "chunks": 0.0, "chunks_ok": 0.0}
        for tokens in batches:
            predicted = module.reconstruct(tokens)
            real = tokens != pad
            ok = predicted == tokens
            sums["tokens"] += real.sum().item()
            sums["tokens_ok"] += (ok & real).sum().item()
            chunk_real = real.view(*tokens.shape[:-1], -1, K).any(-1)
            chunk_ok = ok.view(*tokens.shape[:-1], -1, K).all(-1)
            sums["chunks"] += chunk_real.sum().item()
            sums["chunks_ok"] += (chunk_ok & chunk_real).sum().item()
        module.train(was_training)
        sums = _sum_over_dp(sums)
        return {"recon_token_acc": sums["tokens_ok"] / max(sums["tokens"], 1.0),
                "recon_chunk_acc": sums["chunks_ok"] / max(sums["chunks"], 1.0),
                "eval_tokens": sums["tokens"]}

    def export(self, module, directory: Path) -> None:
        from calm_megatron.training.checkpoint import save_autoencoder

        save_autoencoder(module, self.cfg, directory)


def _dp_group():
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_group()


class CALMStage:
    """Stage 2: the energy Transformer over a frozen stage-1 autoencoder."""

    name = "calm"

    def __init__(self, cfg: C.Config):
        self.cfg = cfg

    def load_autoencoder(self):
        """The frozen AE from `model.autoencoder_checkpoint`, at this run's TP size (or a random one)."""
        from calm_megatron.models.autoencoder import build_autoencoder
        from calm_megatron.models.calm import check_autoencoder_compatible
        from calm_megatron.training import checkpoint

        if self.cfg.model.autoencoder_checkpoint == C.RANDOM_AUTOENCODER:
            log.warning("model.autoencoder_checkpoint=%s: a RANDOM frozen autoencoder (for benchmarks; "
                        "the CALM learns nothing meaningful)", C.RANDOM_AUTOENCODER)
            return build_autoencoder(self.cfg.autoencoder, precision=self.cfg.train.precision)  # build_calm checks it
        ae_cfg, tensors, step = checkpoint.load_autoencoder_weights(self.cfg.model.autoencoder_checkpoint)
        check_autoencoder_compatible(self.cfg.model, ae_cfg)
        autoencoder = build_autoencoder(ae_cfg, precision=self.cfg.train.precision)
        checkpoint.load_full_state_dict(autoencoder, tensors, str(step))
        return autoencoder

    def build(self) -> torch.nn.Module:
        from calm_megatron.models.calm import build_calm

        return build_calm(self.cfg.model, self.load_autoencoder(), precision=self.cfg.train.precision,
                          parallel=self.cfg.parallel)

    def no_decay(self, name, param) -> bool:
        from calm_megatron.models.backbone import no_weight_decay

        return no_weight_decay(name, param)

    def count_params(self, module) -> Dict[str, int]:
        from calm_megatron.models.calm import count_parameters_calm

        return {"calm_params": count_parameters_calm(self.cfg.model).total_excluding_autoencoder}

    def forward_kwargs(self, sample_ids: List[int]) -> Dict[str, object]:
        """Per-sample seeds: head noise and posterior draws become functions of (run seed, global sample
        index), identical at every TP/PP/DP layout and micro-batch split, and on resume."""
        from calm_megatron.models.energy_head import stream_seed

        return {"sample_seeds": [stream_seed(self.cfg.run.seed, i) for i in sample_ids]}

    def train_metrics(self, module, output, tokens) -> Dict[str, float]:
        return {}

    @torch.no_grad()
    def evaluate(self, module, batches: Iterable[torch.Tensor]) -> Dict[str, float]:
        from calm_megatron.metrics.evaluate import calm_brierlm

        was_training = module.training
        module.eval()
        result = calm_brierlm(module, batches, _dp_group())
        module.train(was_training)
        return result

    def export(self, module, directory: Path) -> None:
        return None


class ARStage(CALMStage):
    """Stage 2 baseline: the autoregressive Transformer on the same backbone."""

    name = "ar"

    def build(self) -> torch.nn.Module:
        from calm_megatron.models.ar import build_ar

        return build_ar(self.cfg.model, precision=self.cfg.train.precision, parallel=self.cfg.parallel)

    def count_params(self, module) -> Dict[str, int]:
        from calm_megatron.models.ar import count_parameters_ar

        return {"ar_params": count_parameters_ar(self.cfg.model).total}

    def forward_kwargs(self, sample_ids: List[int]) -> Dict[str, object]:
        return {}

    @torch.no_grad()
    def evaluate(self, module, batches: Iterable[torch.Tensor]) -> Dict[str, float]:
        from calm_megatron.metrics.evaluate import ar_brierlm

        was_training = module.training
        module.eval()
        generator = torch.Generator(device=next(module.parameters()).device).manual_seed(self.cfg.run.seed)
        result = ar_brierlm(module, batches, _dp_group(), generator=generator)
        module.train(was_training)
        return result


STAGES = {"ae": AutoencoderStage, "calm": CALMStage, "ar": ARStage}


def stage_for(cfg: C.Config):
    """The stage adapter for `cfg.run.stage`."""
    if cfg.run.stage not in STAGES:
        raise C.ConfigError(f"run.stage={cfg.run.stage!r} is not trainable yet; available: {', '.join(STAGES)}")
    return STAGES[cfg.run.stage](cfg)
