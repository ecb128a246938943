"""Small patches that let Megatron-Core 0.16.1 run on CPU (gloo). Applied only when CUDA is absent.

Each patch names the Megatron-Core code it covers. Nothing here changes numerics: it only routes
device placement and RNG state to the CPU where Megatron-Core hard-codes CUDA.
"""
from __future__ import annotations

import contextlib

import torch

_APPLIED = False


def _cpu_rng_tracker_class():
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """Megatron's TP-aware RNG tracker with named states kept for the CPU generator.

        Covers `CudaRNGStatesTracker.add/fork` (read/write CUDA RNG state). Forking swaps the CPU
        generator's state, so dropout inside a TP region draws from the TP-rank seed: masks differ
        across TP ranks and agree across DP ranks, as on GPU.
        """

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.seeds_.add(seed)
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outer_state = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer_state)

    return CpuRNGStatesTracker


def apply() -> None:
    """Install the CPU shims once; a no-op on machines with CUDA."""
    global _APPLIED
    if _APPLIED or torch.cuda.is_available():
        return
    from megatron.core.tensor_parallel import random as mrandom

    # tensor_parallel.mappings (_gather_along_*, _reduce_scatter_*), layers (sequence-parallel
    # all-gather buffers), utils.GlobalMemoryBuffer: `device=torch.cuda.current_device()`.
    torch.cuda.current_device = lambda: torch.device("cpu")  # type: ignore[assignment]
    # pipeline_parallel.schedules and p2p_communication call torch.cuda.synchronize().
    torch.cuda.synchronize = lambda device=None: None  # type: ignore[assignment]
    # tensor_parallel.random: _get/_set_cuda_rng_state (used by fork and activation recompute).
    mrandom._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    # tensor_parallel.random.get_cuda_rng_tracker / model_parallel_cuda_manual_seed: the tracker.
    mrandom._CUDA_RNG_STATE_TRACKER = _cpu_rng_tracker_class()()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    _apply_schedule_shims()
    _APPLIED = True


class _CpuDeviceTorch:
    """The `torch` module as seen by one Megatron-Core module, with `device="cuda"` routed to the CPU.

    Every attribute is torch's own; only the factory functions that Megatron calls with a
    hard-coded `device="cuda"` are wrapped.
    """

    _FACTORIES = ("zeros", "ones", "empty", "tensor", "full")

    def __getattr__(self, name):
        value = getattr(torch, name)
        if name in self._FACTORIES:
            def factory(*args, device=None, **kwargs):
                if device == "cuda" or (isinstance(device, torch.device) and device.type == "cuda"):
                    device = "cpu"
                return value(*args, device=device, **kwargs)
            return factory
        return value


def _apply_schedule_shims() -> None:
    """Pipeline schedules on CPU.

    pipeline_parallel.schedules: `forward_backward_no_pipelining`,
    `forward_backward_pipelining_without_interleaving` and `..._with_interleaving` build
    `total_num_tokens = torch.zeros([], dtype=torch.int, device="cuda")`; the module's `torch` is
    replaced by a view that puts such tensors on the CPU (p2p_communication already goes through
    the patched `torch.cuda.current_device`, and `torch.cuda.synchronize` is a no-op above).
    """
    from megatron.core.pipeline_parallel import schedules

    schedules.torch = _CpuDeviceTorch()
