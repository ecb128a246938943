"""Stop-and-save agreed by all ranks: SIGTERM / SIGUSR1 on any rank, or a wall-time budget.

A signal handler only sets a flag; at each step boundary the flags are all-reduced (MAX) so every
rank takes the same decision, then the trainer saves and exits with EXIT_REQUEUE, which launchers
treat as "requeue me" (after Megatron's dist_signal_handler).
"""
from __future__ import annotations

import logging
import signal
import time
from typing import Optional

import torch
import torch.distributed as dist

log = logging.getLogger("calm_megatron")

EXIT_REQUEUE = 75  # EX_TEMPFAIL: saved a checkpoint, run me again with the same command
REASONS = ("", "signal", "time budget")


class StopRequest:
    """Catches SIGTERM and SIGUSR1 and watches the wall-time budget."""

    def __init__(self, exit_after_minutes: float = 0.0):
        self.deadline = time.time() + exit_after_minutes * 60 if exit_after_minutes > 0 else None
        self.signal_name: Optional[str] = None
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def agreed(self) -> str:
        """The reason to stop now ('' to go on); the same on every rank (one all-reduce)."""
        local = 1 if self.signal_name else 2 if self.deadline and time.time() >= self.deadline else 0
        flag = torch.tensor([local], dtype=torch.int64)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        reason = REASONS[int(flag.item())]
        if reason:
            log.warning("stopping: %s%s; saving a checkpoint, then exiting with code %d (requeue)", reason,
                        f" ({self.signal_name} received here)" if self.signal_name else "", EXIT_REQUEUE)
        return reason

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
