"""Process groups, Megatron-Core parallel state, the DeepSpeed mpu adapter, seeds and teardown.

Ranks come from torchrun (RANK/WORLD_SIZE/LOCAL_RANK) or from Slurm (SLURM_PROCID/SLURM_NTASKS/
SLURM_LOCALID, one srun task per rank). NCCL on GPU, gloo on CPU; on CPU the Megatron-Core shims of
:mod:`calm_megatron.cpu_shims` are applied and DeepSpeed is kept from JIT-compiling anything.
"""
from __future__ import annotations

import datetime
import importlib
import importlib.util
import logging
import os
import random
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job, as the launcher said."""
    rank: int
    world_size: int
    local_rank: int
    launcher: str  # torchrun | slurm | single


@dataclass(frozen=True)
class Layout:
    """This rank's coordinates in the (tp, pp, dp) grid."""
    rank: int
    world_size: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def describe(self) -> str:
        return (f"world={self.world_size} tp={self.tp} pp={self.pp} dp={self.dp} "
                f"(rank {self.rank}: tp_rank={self.tp_rank} pp_rank={self.pp_rank} dp_rank={self.dp_rank})")


def launch_env() -> LaunchEnv:
    """Read rank and world size from torchrun or Slurm variables (a single process otherwise)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), "torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_STEP_ID" in env:
        return LaunchEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]),
                         int(env.get("SLURM_LOCALID", 0)), "slurm")
    return LaunchEnv(0, 1, 0, "single")


def device() -> torch.device:
    """The device of this rank: its local GPU, or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _prepare_cpu_runtime() -> None:
    """Keep DeepSpeed on its CPU accelerator without JIT builds; make CPU math fast and exact."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # DeepSpeed's TorchBackend builds a shared-memory comm op (a C++ JIT build of minutes) that only
    # inference all-reduce uses. `deepspeed.comm.torch` as an attribute is the torch module itself.
    ds_comm_torch = importlib.import_module("deepspeed.comm.torch")
    ds_comm_torch.build_shm_op = lambda: None
    # Denormals after a few updates make CPU steps ~50x slower (platform notes).
    torch.set_flush_denormal(True)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _init_process_group(env: LaunchEnv, timeout_minutes: int) -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        if env.world_size > 1:
            raise RuntimeError("MASTER_PORT is not set: launch several ranks with torchrun or srun")
        os.environ["MASTER_PORT"] = str(_free_port())  # a lone process needs no agreed port
    os.environ["RANK"], os.environ["WORLD_SIZE"] = str(env.rank), str(env.world_size)
    os.environ["LOCAL_RANK"] = str(env.local_rank)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
    timeout = datetime.timedelta(minutes=timeout_minutes)
    store, _, _ = next(dist.rendezvous("env://", rank=env.rank, world_size=env.world_size, timeout=timeout))
    # torchrun keeps one store across --max-restarts attempts; without a per-attempt prefix the
    # restarted ranks read the dead attempt's addresses for Megatron's groups and cannot connect.
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"calm_attempt_{attempt}", store)
    dist.init_process_group(backend=backend, store=store, rank=env.rank, world_size=env.world_size,
                            timeout=timeout)


def fused_kernels() -> str:
    """Which optional fused-kernel libraries are importable (apex, Transformer Engine)."""
    found = {name: importlib.util.find_spec(name) is not None for name in ("apex", "transformer_engine")}
    active = [name for name, ok in found.items() if ok]
    return ("fused kernels from " + " + ".join(active)) if active else \
        "apex / Transformer Engine not installed: local PyTorch kernels"


def init(tp: int = 1, pp: int = 1, seed: int = 1234, timeout_minutes: int = 10,
         init_deepspeed: bool = True) -> Layout:
    """Create the process group, Megatron-Core's parallel state and seeded RNGs; return the layout.

    The config must already be validated (world size = tp * pp * dp) before this is called.
    """
    env = launch_env()
    if not torch.cuda.is_available():
        _prepare_cpu_runtime()
    from megatron.core import parallel_state
    from calm_megatron import cpu_shims

    cpu_shims.apply()
    if not dist.is_initialized():
        _init_process_group(env, timeout_minutes)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                             distributed_timeout_minutes=timeout_minutes)
    layout = current_layout()
    log.info("parallel runtime: %s backend, %s", dist.get_backend(), fused_kernels())
    seed_everything(seed, layout)
    if init_deepspeed:
        import deepspeed

        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
    return layout


def current_layout() -> Layout:
    """The layout of the initialised Megatron-Core parallel state."""
    from megatron.core import parallel_state as ps

    return Layout(rank=dist.get_rank(), world_size=dist.get_world_size(),
                  tp=ps.get_tensor_model_parallel_world_size(), pp=ps.get_pipeline_model_parallel_world_size(),
                  dp=ps.get_data_parallel_world_size(), tp_rank=ps.get_tensor_model_parallel_rank(),
                  pp_rank=ps.get_pipeline_model_parallel_rank(), dp_rank=ps.get_data_parallel_rank())


def seed_everything(seed: int, layout: Optional[Layout] = None) -> None:
    """Seed Python, NumPy and torch, and Megatron's TP-aware tracker (TP ranks differ, DP ranks agree).

    Following Megatron, pipeline stages get distinct default seeds (seed + 100 * pp_rank) so that
    stage-local randomness (dropout) is independent across stages.
    """
    from megatron.core import tensor_parallel

    stage_seed = seed + 100 * (layout.pp_rank if layout else 0)
    random.seed(stage_seed)
    np.random.seed(stage_seed % 2 ** 32)
    torch.manual_seed(stage_seed)
    tensor_parallel.model_parallel_cuda_manual_seed(stage_seed)


class MegatronMpu:
    """The mpu object DeepSpeed expects, over Megatron-Core's parallel_state.

    DeepSpeed uses old Megatron names: "model parallel rank/world size" means the tensor-parallel
    rank/size (it counts replicated parameters once per TP group when computing grad norms), while
    norms are all-reduced over the model-parallel group, which must span TP x PP.
    """

    def __getattr__(self, name):
        from megatron.core import parallel_state

        return getattr(parallel_state, name)

    def get_model_parallel_rank(self) -> int:
        from megatron.core import parallel_state

        return parallel_state.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        from megatron.core import parallel_state

        return parallel_state.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        from megatron.core import parallel_state

        return parallel_state.get_model_parallel_group()

    def get_data_parallel_group_ranks(self) -> List[int]:
        from megatron.core import parallel_state

        return dist.get_process_group_ranks(parallel_state.get_data_parallel_group())


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def teardown() -> None:
    """Destroy Megatron-Core's state and the process group explicitly (avoids gloo aborts at exit)."""
    from megatron.core import parallel_state

    if dist.is_initialized():
        dist.barrier()
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(value: float, group=None) -> float:
    """Mean of a Python float over a group (the data-parallel group by default)."""
    from megatron.core import parallel_state

    group = group if group is not None else parallel_state.get_data_parallel_group()
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=device())
    dist.all_reduce(tensor, group=group)
    return tensor.item() / dist.get_world_size(group)
