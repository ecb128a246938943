"""Console log lines, the rank-0 progress bar, Weights & Biases, throughput and memory."""
from __future__ import annotations

import logging
import os
import time
from typing import Dict

import psutil
import torch

from calm_megatron import config as C

log = logging.getLogger("calm_megatron")


def setup_logging(rank: int) -> None:
    """INFO on rank 0, WARNING elsewhere; every line carries the rank."""
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s [rank{rank}] %(levelname)s %(message)s",
                        datefmt="%H:%M:%S", force=True)
    for noisy in ("DeepSpeed", "deepspeed", "megatron", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def memory_summary() -> str:
    """Resident memory of this process, and GPU memory where there is a GPU."""
    rss = psutil.Process(os.getpid()).memory_info().rss / 2 ** 30
    text = f"rss={rss:.2f}GiB"
    if torch.cuda.is_available():
        text += f" gpu_alloc={torch.cuda.memory_allocated() / 2 ** 30:.2f}GiB " \
                f"gpu_peak={torch.cuda.max_memory_allocated() / 2 ** 30:.2f}GiB"
    return text


def _format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class Monitor:
    """Tracks throughput and reports each logged step to the console, the progress bar and W&B."""

    def __init__(self, cfg: C.Config, rank: int, tokens_per_step: int, start_step: int = 0, world_size: int = 1):
        from calm_megatron import flops

        self.cfg, self.rank, self.tokens_per_step = cfg, rank, tokens_per_step
        # Model FLOPs per device and per second of each token/s (calm-spec 5.2), and the device peak.
        self.flops_per_token_per_device = flops.training_flops_per_token(cfg) / world_size
        self.peak_flops = flops.peak_flops_per_second(cfg.train.peak_tflops)
        self.start_time = self.window_time = time.time()
        self.window_step = self.start_step = start_step
        self.bar = None
        self.wandb_run = None
        if rank == 0:
            self._start_wandb()
            if cfg.train.progress_bar:
                from tqdm import tqdm

                self.bar = tqdm(total=cfg.train.steps, initial=start_step, desc=cfg.run.stage,
                                dynamic_ncols=True, leave=False)

    def _start_wandb(self) -> None:
        mode = os.environ.get("WANDB_MODE") or self.cfg.logging.wandb_mode
        if mode == "disabled":
            return
        import wandb

        os.makedirs(self.cfg.out_dir, exist_ok=True)
        self.wandb_run = wandb.init(project=self.cfg.logging.wandb_project, name=self.cfg.run.name,
                                    dir=self.cfg.out_dir, mode=mode, config=C.to_dict(self.cfg))
        log.info("W&B %s run in %s", mode, self.wandb_run.dir)

    def _write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        else:
            log.info(line)

    def step(self, step: int, values: Dict[str, float]) -> None:
        """Called after every optimizer step (1-based `step`); logs every `log_interval` steps."""
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{values.get('loss', float('nan')):.4f}", refresh=False)
        if self.rank != 0 or (step % self.cfg.train.log_interval and step != self.cfg.train.steps):
            return
        now = time.time()
        tokens_per_s = (step - self.window_step) * self.tokens_per_step / max(now - self.window_time, 1e-9)
        per_step = (now - self.start_time) / max(step - self.start_step, 1)
        self.window_step, self.window_time = step, now
        values = dict(values, tokens_per_s=tokens_per_s, **self.utilisation(tokens_per_s))
        parts = [f"step {step}/{self.cfg.train.steps}"] + \
                [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items()] + \
                [f"ETA {_format_eta(per_step * (self.cfg.train.steps - step))}"]
        self._write(" | ".join(parts))
        if self.wandb_run is not None:
            self.wandb_run.log(values, step=step)

    def utilisation(self, tokens_per_s: float) -> Dict[str, float]:
        """Achieved model TFLOP/s per device and, where the peak is known, MFU."""
        achieved = self.flops_per_token_per_device * tokens_per_s
        out = {"tflops_per_device": achieved / 1e12}
        if self.peak_flops:
            out["mfu"] = achieved / self.peak_flops
        return out

    def event(self, step: int, values: Dict[str, float], prefix: str) -> None:
        """An evaluation or other one-off measurement."""
        if self.rank != 0:
            return
        self._write(f"{prefix} @ step {step}: " + ", ".join(f"{k}={v:.6g}" for k, v in values.items()))
        if self.wandb_run is not None:
            self.wandb_run.log({f"{prefix}/{k}": v for k, v in values.items()}, step=step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()

    def elapsed(self) -> float:
        return time.time() - self.start_time

