"""Shared pytest fixtures. Distributed tests launch their own torchrun jobs (see tests/dist_helpers.py)."""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def megatron_single():
    """A one-process gloo group with Megatron-Core parallel state (tp=1, pp=1) for model tests."""
    import torch.distributed as dist
    from calm_megatron import distributed

    if not dist.is_initialized():
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(free_port())
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            os.environ.pop(key, None)
        distributed.init(tp=1, pp=1, seed=1234, init_deepspeed=False)
    yield distributed.current_layout()
