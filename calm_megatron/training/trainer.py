"""The training run: model on this rank, DeepSpeed engine, streaming batches, eval, checkpoint, summary."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, Iterator, Optional

import torch

from calm_megatron import config as C
from calm_megatron import distributed
from calm_megatron.training import checkpoint, engine as engine_lib, monitor as monitor_lib
from calm_megatron.training.stages import stage_for

log = logging.getLogger("calm_megatron")


def train_batches(cfg: C.Config, layout: distributed.Layout) -> Iterator[torch.Tensor]:
    """Micro-batches of token ids for this rank (tensor-parallel peers read identical samples)."""
    from calm_megatron.data.loader import build_train_loader

    loader = build_train_loader(cfg.data.train, batch_size=cfg.train.micro_batch_size, seed=cfg.run.seed,
                                dp_rank=layout.dp_rank, dp_size=layout.dp, replication=layout.tp,
                                shuffle=cfg.data.shuffle, download_retry=cfg.data.download_retry,
                                timeout_s=cfg.data.timeout_s, num_workers=cfg.data.num_workers)
    for batch in loader:
        yield batch["tokens"].to(distributed.device())


def eval_batches(cfg: C.Config, layout: distributed.Layout) -> Iterator[torch.Tensor]:
    from calm_megatron.data.loader import iter_eval_batches

    for batch in iter_eval_batches(cfg.data.valid, batch_size=cfg.train.micro_batch_size,
                                   dp_rank=layout.dp_rank, dp_size=layout.dp,
                                   max_batches=cfg.train.eval_batches or None):
        yield batch["tokens"].to(distributed.device())


class Trainer:
    """Owns one run of one stage on this rank."""

    def __init__(self, cfg: C.Config, layout: distributed.Layout,
                 batches: Optional[Iterator[torch.Tensor]] = None):
        self.cfg, self.layout = cfg, layout
        self.stage = stage_for(cfg)
        model = self.stage.build().to(distributed.device())
        self.params = self.stage.count_params(model)
        log.info("layout: %s | zero stage %d | %s | %s", layout.describe(), cfg.parallel.zero_stage,
                 cfg.train.precision, ", ".join(f"{k}={v:,}" for k, v in self.params.items()))
        self.engine = engine_lib.create_engine(model, cfg, layout.dp, self.stage.no_decay)
        self.accum_steps = C.grad_accum_steps(cfg, layout.dp)
        self.batches = batches if batches is not None else train_batches(cfg, layout)
        self.tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_len
        log.info("memory after engine init: %s", monitor_lib.memory_summary())

    def forward(self, engine, tokens):
        return engine(tokens)

    def train_step(self) -> engine_lib.StepResult:
        return engine_lib.train_step(self.engine, self.batches, self.accum_steps, self.forward,
                                     self.stage.train_metrics)

    def evaluate(self) -> Dict[str, float]:
        if not self.cfg.data.valid:
            return {}
        return self.stage.evaluate(self.engine.module, eval_batches(self.cfg, self.layout))

    def fit(self) -> Dict[str, float]:
        """Train `train.steps` optimizer steps with periodic eval; save the final checkpoint."""
        cfg = self.cfg
        monitor = monitor_lib.Monitor(cfg, self.layout.rank, self.tokens_per_step)
        last_eval: Dict[str, float] = {}
        result = None
        for step in range(1, cfg.train.steps + 1):
            result = self.train_step()
            monitor.step(step, {"loss": result.loss, **result.metrics, "lr": result.lr,
                                "grad_norm": result.grad_norm})
            if cfg.train.eval_interval and step % cfg.train.eval_interval == 0 and step != cfg.train.steps:
                monitor.event(step, self.evaluate(), "eval")
            if cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0 and step != cfg.train.steps:
                checkpoint.save(self.engine, cfg, step, self.stage.export)
        last_eval = self.evaluate()
        monitor.event(cfg.train.steps, last_eval, "eval")
        saved = checkpoint.save(self.engine, cfg, cfg.train.steps, self.stage.export)
        log.info("checkpoint: %s | memory: %s", saved, monitor_lib.memory_summary())
        summary = {"stage": cfg.run.stage, "steps": cfg.train.steps, "final_loss": result.loss,
                   "tokens_seen": cfg.train.steps * self.tokens_per_step,
                   "train_wall_seconds": round(monitor.elapsed(), 2), "checkpoint": str(saved),
                   **self.params, **last_eval}
        monitor.close()
        if self.layout.rank == 0:
            out = Path(cfg.out_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / "train_summary.json").write_text(json.dumps(summary, indent=1))
        return summary
