"""The training run: model on this rank, DeepSpeed engine, streaming batches, eval, checkpoints, resume."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from calm_megatron import config as C
from calm_megatron import distributed
from calm_megatron.training import checkpoint, engine as engine_lib, monitor as monitor_lib
from calm_megatron.training.preemption import StopRequest
from calm_megatron.training.stages import stage_for

log = logging.getLogger("calm_megatron")


class TrainData:
    """This rank's micro-batches from the streaming loader, with its resumable state.

    Under pipeline parallelism the first stage (embedding) and the last (targets) read the replica's
    samples; a middle stage reads nothing and gets placeholders of the right shape.
    """

    def __init__(self, cfg: C.Config, layout: distributed.Layout):
        from calm_megatron.data.loader import build_train_loader

        self.reads_data = layout.is_first_stage or layout.is_last_stage
        self.shape = (cfg.train.micro_batch_size, cfg.train.seq_len)
        self.loader = build_train_loader(cfg.data.train, batch_size=cfg.train.micro_batch_size,
                                         seed=cfg.run.seed, dp_rank=layout.dp_rank, dp_size=layout.dp,
                                         shuffle=cfg.data.shuffle, download_retry=cfg.data.download_retry,
                                         timeout_s=cfg.data.timeout_s, num_workers=cfg.data.num_workers,
                                         reads_data=self.reads_data, weights=cfg.data.train_weights or None,
                                         cache_dir=cfg.data.cache_dir or None,
                                         cache_limit=cfg.data.cache_limit or None)
        self._iter: Optional[Iterator] = None

    def __next__(self) -> torch.Tensor:
        if not self.reads_data:
            return torch.zeros(self.shape, dtype=torch.long, device=distributed.device())
        if self._iter is None:
            self._iter = iter(self.loader)
        return next(self._iter)["tokens"].to(distributed.device())

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)
        self._iter = None


def eval_batches(cfg: C.Config, layout: distributed.Layout) -> Iterator[torch.Tensor]:
    from calm_megatron.data.loader import iter_eval_batches

    for batch in iter_eval_batches(cfg.data.valid, batch_size=cfg.train.micro_batch_size,
                                   dp_rank=layout.dp_rank, dp_size=layout.dp,
                                   max_batches=cfg.train.eval_batches or None, cache_dir=cfg.data.cache_dir or None):
        yield batch["tokens"].to(distributed.device())


def _fault_injection_after_step(step: int, rank: int) -> None:
    """Test hooks (never set in real runs): deliver a real signal or a kill -9 after a given step.

    CALM_TEST_SIGNAL_AT_STEP=N sends SIGUSR1 to rank CALM_TEST_FAULT_RANK (default 0) after step N;
    CALM_TEST_KILL_AT_STEP=N kills that rank with SIGKILL after step N on the first torchrun attempt.
    """
    import signal

    if rank != int(os.environ.get("CALM_TEST_FAULT_RANK", "0")):
        return
    if os.environ.get("CALM_TEST_SIGNAL_AT_STEP") == str(step):
        os.kill(os.getpid(), signal.SIGUSR1)
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if os.environ.get("CALM_TEST_KILL_AT_STEP") == str(step) and first_attempt:
        os.kill(os.getpid(), signal.SIGKILL)


def _crash_hook(step: int):
    """Test hook: CALM_TEST_CRASH_IN_SAVE=N kills this process in the middle of saving step N."""
    target = os.environ.get("CALM_TEST_CRASH_IN_SAVE")
    if not target or int(target) != step:
        return None
    return lambda directory: os._exit(13)


class Trainer:
    """Owns one run of one stage on this rank."""

    def __init__(self, cfg: C.Config, layout: distributed.Layout, batches=None):
        self.cfg, self.layout = cfg, layout
        self.stage = stage_for(cfg)
        model = self.stage.build().to(distributed.device())
        self.params = self.stage.count_params(model)
        log.info("layout: %s | zero stage %d | %s | %s", layout.describe(), cfg.parallel.zero_stage,
                 cfg.train.precision, ", ".join(f"{k}={v:,}" for k, v in self.params.items()))
        if cfg.parallel.sequence_parallel and engine_lib.sync_sequence_parallel_grads(model):
            log.info("sequence parallel: TP-summed gradient hooks on the parameters Megatron marks")
        self.engine = engine_lib.create_engine(model, cfg, layout.dp, self.stage.no_decay)
        self.accum_steps = C.grad_accum_steps(cfg, layout.dp)
        self.pipeline = None
        if layout.pp > 1:  # Megatron's 1F1B schedule owns the micro-batches of a step
            from calm_megatron.training.pipeline import PipelineRunner

            self.pipeline = PipelineRunner(self.engine, cfg.train.micro_batch_size, self.accum_steps, cfg.train.seq_len)
        self.batches = batches if batches is not None else TrainData(cfg, layout)
        self.tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_len
        self.step = 0
        self.losses: Dict[int, float] = {}
        self._resume()
        from calm_megatron.training.memory import log_rank_memory

        log_rank_memory(self.engine, layout, "after engine init")

    def _resume(self) -> None:
        cfg = self.cfg
        if cfg.checkpoint.load:
            directory = checkpoint.resolve_step(cfg.checkpoint.load)
        else:
            directory = checkpoint.find_resume_step(cfg.save_dir)
        if directory is None:
            return
        weights_only = bool(cfg.checkpoint.load) and cfg.checkpoint.finetune
        state = checkpoint.load(directory, self.engine, cfg, self.layout, weights_only=weights_only)
        if weights_only:
            log.info("fine-tuning from the weights of %s (optimizer, schedule and data start fresh)", directory)
            return
        self.step = state["step"]
        self.losses = {int(k): v for k, v in state.get("losses", {}).items()}
        if state.get("loader") is not None and hasattr(self.batches, "load_state_dict"):
            self.batches.load_state_dict(state["loader"])
        log.info("resumed from %s at step %d", directory, self.step)

    def forward(self, engine, tokens, **kwargs):
        return engine(tokens, **kwargs)

    def sample_ids(self, micro: int, size: int) -> List[int]:
        """Global indices of the samples in micro-batch `micro` of the current step on this DP rank.

        The same at every layout: step, then data-parallel rank, then micro-batch order, as the global
        batch is split (the CALM stage derives its noise from them).
        """
        t = self.cfg.train
        first = (self.step * t.global_batch_size + self.layout.dp_rank * (t.global_batch_size // self.layout.dp)
                 + micro * t.micro_batch_size)
        return list(range(first, first + size))

    def micro_batches(self) -> Iterator[Tuple[torch.Tensor, dict]]:
        """The micro-batches of one step with their forward kwargs.

        Under pipeline parallelism they are all read before the schedule starts: the first and the
        last stage read the same samples, and Streaming's readers of one replica must iterate
        together (the last stage would otherwise wait for activations while the first stage's loader
        waits for it).
        """
        def with_kwargs(micro: int, batch: torch.Tensor):
            return batch, self.stage.forward_kwargs(self.sample_ids(micro, batch.size(0)))

        if self.pipeline is not None:  # read now, not when the schedule first asks
            return iter([with_kwargs(m, next(self.batches)) for m in range(self.accum_steps)])
        return (with_kwargs(m, next(self.batches)) for m in range(self.accum_steps))

    def train_step(self) -> engine_lib.StepResult:
        module = self.engine.module
        metrics = lambda output, tokens: self.stage.train_metrics(module, output, tokens)  # noqa: E731
        if self.pipeline is not None:
            return self.pipeline.train_step(self.micro_batches(), metrics)
        return engine_lib.train_step(self.engine, self.micro_batches(), self.accum_steps, self.forward, metrics)

    def evaluate(self) -> Dict[str, float]:
        """Held-out metrics, drawn from a private RNG so that training's random streams are untouched."""
        if not self.cfg.data.valid:
            return {}
        if self.layout.pp > 1:  # BrierLM samples on whole models; no pipelined evaluation yet
            log.warning("evaluation is skipped under pipeline parallelism (parallel.pp=%d): score the saved "
                        "checkpoints with tools/eval_brier.py (any layout, one process)", self.layout.pp)
            return {}
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.cfg.run.seed + 1)
            return self.stage.evaluate(self.engine.module, eval_batches(self.cfg, self.layout))

    def trainer_state(self) -> dict:
        loader = self.batches.state_dict() if hasattr(self.batches, "state_dict") else None
        return {"step": self.step, "tokens_seen": self.step * self.tokens_per_step,
                "lr_scheduler": self.engine.lr_scheduler.state_dict(), "loader": loader,
                "layout": {"tp": self.layout.tp, "pp": self.layout.pp, "dp": self.layout.dp},
                "losses": self.losses}

    def save(self) -> Path:
        return checkpoint.save(self.trainer_state(), self.engine, self.cfg, self.layout, self.stage.export,
                               fault_hook=_crash_hook(self.step))

    def fit(self) -> Dict[str, float]:
        """Train to `train.steps` (from the resumed step) with periodic eval and checkpoints.

        Returns the run summary; `summary["preempted"]` is set when a signal or the time budget
        stopped the run after saving.
        """
        cfg = self.cfg
        monitor = monitor_lib.Monitor(cfg, self.layout.rank, self.tokens_per_step, start_step=self.step,
                                      world_size=self.layout.world_size)
        stop = StopRequest(cfg.train.exit_after_minutes)
        self.initial_eval: Dict[str, float] = {}
        if cfg.train.eval_at_start and self.step == 0:
            self.initial_eval = self.evaluate()
            monitor.event(0, self.initial_eval, "eval")
        while self.step < cfg.train.steps:
            result = self.train_step()
            self.step += 1
            self.losses[self.step] = result.loss
            _fault_injection_after_step(self.step, self.layout.rank)
            monitor.step(self.step, {"loss": result.loss, **result.metrics, "lr": result.lr,
                                     "grad_norm": result.grad_norm})
            if self.step == cfg.train.steps:
                break
            if stop.agreed():
                self.save()
                monitor.close()
                return {"preempted": True, "step": self.step}
            if cfg.train.eval_interval and self.step % cfg.train.eval_interval == 0:
                monitor.event(self.step, self.evaluate(), "eval")
            if cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0:
                self.save()
        return self._finish(monitor)

    def _finish(self, monitor) -> Dict[str, float]:
        cfg = self.cfg
        last_eval = self.evaluate()
        monitor.event(self.step, last_eval, "eval")
        saved = self.save()
        log.info("checkpoint: %s | memory: %s", saved, monitor_lib.memory_summary())
        summary = {"stage": cfg.run.stage, "steps": self.step, "first_loss": self.losses.get(1),
                   "final_loss": self.losses.get(self.step),
                   "tokens_seen": self.step * self.tokens_per_step,
                   "train_wall_seconds": round(monitor.elapsed(), 2), "checkpoint": str(saved),
                   "preempted": False, **self.params, **last_eval,
                   **{f"{k}_at_init": v for k, v in self.initial_eval.items()}}
        monitor.close()
        if self.layout.rank == 0:
            out = Path(cfg.out_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / "train_summary.json").write_text(json.dumps(summary, indent=1))
            (out / "losses.json").write_text(json.dumps(self.losses))
        return summary
