"""Stop-and-save agreed by all ranks: SIGTERM / SIGUSR1 on any rank, or a wall-time budget.

A signal handler only sets a flag (installed at the very start of the entry point, so a signal that
arrives while the model is still being built is not lost); at each step boundary the flags are
all-reduced (MAX) so every rank takes the same decision, then the trainer saves and exits with
EXIT_REQUEUE, which launchers treat as "requeue me" (after Megatron's dist_signal_handler).
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
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_received: Optional[str] = None
_installed = False


def _handle(signum, frame) -> None:
    global _received
    _received = signal.Signals(signum).name  # idempotent: a second TERM/USR1 changes nothing


def install_handlers() -> None:
    """Catch SIGTERM and SIGUSR1 from now on (idempotent)."""
    global _installed
    if not _installed:
        for sig in SIGNALS:
            signal.signal(sig, _handle)
        _installed = True


def received_signal() -> Optional[str]:
    return _received


class StopRequest:
    """The signal flag plus the wall-time budget, agreed across ranks at step boundaries."""

    def __init__(self, exit_after_minutes: float = 0.0):
        install_handlers()
        self.deadline = time.time() + exit_after_minutes * 60 if exit_after_minutes > 0 else None

    def agreed(self) -> str:
        """The reason to stop now ('' to go on); the same on every rank (one all-reduce)."""
        local = 1 if _received else 2 if self.deadline and time.time() >= self.deadline else 0
        flag = torch.tensor([local], dtype=torch.int64)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        reason = REASONS[int(flag.item())]
        if reason:
            log.warning("stopping: %s%s; saving a checkpoint, then exiting with code %d (requeue)", reason,
                        f" ({_received} received here)" if _received else "", EXIT_REQUEUE)
        return reason
