"""Likelihood-free temperature sampling over whole K-token chunks (calm-spec section 4).

The target is P_T(x) proportional to P(x)^(1/T) when only a black-box sampler of P is available.

* :func:`sample_exact` - Algorithm 1, exact for any T in (0, 1]: floor(1/T) identical draws, then a
  Bernoulli factory (Mendo 2019) for the fractional part of 1/T. Batched over sequences.
* :func:`sample_batch_approx` - Algorithm 2 for T = 1/n: from N candidate draws, pick among the
  chunks seen most often with weights C(count, m). Biased for finite N, asymptotically exact.
  :func:`batch_approx_distribution` returns its selection probabilities.

T = 1 is one plain draw in both.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, NamedTuple, Optional, Tuple

import torch

ChunkDraw = Callable[[torch.Tensor], torch.Tensor]
"""``sampler(batch_indices LongTensor[M]) -> LongTensor[M, K]``: one fresh chunk of P for each listed sequence."""

_INTEGER_TOLERANCE = 1e-9


def check_temperature(temperature: float) -> float:
    """Return ``temperature`` as a float; ValueError unless it lies in (0, 1]."""
    value = float(temperature)
    if not 0.0 < value <= 1.0:  # also rejects NaN
        raise ValueError(f"temperature must be in (0, 1], got {temperature!r}")
    return value


def split_inverse_temperature(temperature: float) -> Tuple[int, float]:
    """1/T = n + alpha with integer n >= 1 and alpha in [0, 1); 1/T within 1e-9 of an integer gives alpha 0."""
    inverse = 1.0 / check_temperature(temperature)
    nearest = round(inverse)
    if abs(inverse - nearest) <= _INTEGER_TOLERANCE * inverse:
        return int(nearest), 0.0
    whole = math.floor(inverse)
    return whole, inverse - whole


def inverse_temperature_integer(temperature: float) -> int:
    """n = 1/T for Algorithm 2; ValueError when T is not of the form 1/n."""
    whole, alpha = split_inverse_temperature(temperature)
    if alpha != 0.0:
        raise ValueError(f"batch approximation needs T = 1/n for an integer n, got T={temperature!r} "
                         f"(1/T = {1.0 / float(temperature):.6g}); use sample_exact for other T")
    return whole


class ExactSample(NamedTuple):
    """Output of :func:`sample_exact`."""
    chunks: torch.Tensor     # LongTensor[B, K], one sample of P^(1/T)/Z per sequence
    calls: torch.Tensor      # LongTensor[B], sampler draws spent on each sequence
    fell_back: torch.Tensor  # BoolTensor[B], True where the cap was hit and a plain T=1 draw was used


class _ExactState:
    """Per-sequence state of Algorithm 1, as tensors so that a round updates every sequence at once."""

    def __init__(self, batch_size: int, first_draw: torch.Tensor):
        device = first_draw.device
        self.chunks = torch.zeros(batch_size, first_draw.shape[-1], dtype=first_draw.dtype, device=device)
        self.anchor = torch.zeros_like(self.chunks)  # x*: the first draw of the current attempt
        self.stage1_draws = torch.zeros(batch_size, dtype=torch.int64, device=device)
        self.all_equal = torch.ones(batch_size, dtype=torch.bool, device=device)
        self.in_factory = torch.zeros(batch_size, dtype=torch.bool, device=device)
        self.factory_step = torch.ones(batch_size, dtype=torch.int64, device=device)  # i in Mendo's loop
        self.done = torch.zeros(batch_size, dtype=torch.bool, device=device)
        self.calls = torch.zeros(batch_size, dtype=torch.int64, device=device)
        self.fell_back = torch.zeros(batch_size, dtype=torch.bool, device=device)

    def accept(self, index: torch.Tensor, chunks: torch.Tensor) -> None:
        self.chunks[index] = chunks
        self.done[index] = True

    def advance(self, active: torch.Tensor, draws: torch.Tensor, whole: int, alpha: float,
                generator: Optional[torch.Generator]) -> None:
        """Consume one draw for each active sequence: a Stage 1 step or a Bernoulli-factory step."""
        in_factory = self.in_factory[active]
        self._factory_step(active[in_factory], draws[in_factory], alpha, generator)
        self._stage1_step(active[~in_factory], draws[~in_factory], whole, alpha)

    def _stage1_step(self, index: torch.Tensor, draws: torch.Tensor, whole: int, alpha: float) -> None:
        first = self.stage1_draws[index] == 0
        self.anchor[index[first]] = draws[first]
        same = (draws == self.anchor[index]).all(-1)
        self.all_equal[index] = torch.where(first, torch.ones_like(same), self.all_equal[index] & same)
        self.stage1_draws[index] += 1
        complete = index[self.stage1_draws[index] == whole]
        self.stage1_draws[complete] = 0  # a failed attempt restarts; a passed one leaves Stage 1
        passed = complete[self.all_equal[complete]]
        if alpha == 0.0:
            self.accept(passed, self.anchor[passed])
        else:
            self.in_factory[passed] = True
            self.factory_step[passed] = 1

    def _factory_step(self, index: torch.Tensor, draws: torch.Tensor, alpha: float,
                      generator: Optional[torch.Generator]) -> None:
        """Mendo's factory: a hit accepts x*; a miss restarts Stage 1 w.p. alpha/i, else i += 1."""
        hit = (draws == self.anchor[index]).all(-1)
        self.accept(index[hit], self.anchor[index[hit]])
        miss = index[~hit]
        gen_device = generator.device if generator is not None else miss.device
        uniform = torch.rand(miss.numel(), generator=generator, device=gen_device, dtype=torch.float64)
        restart = uniform.to(miss.device) < alpha / self.factory_step[miss].to(torch.float64)
        self.in_factory[miss[restart]] = False
        self.factory_step[miss[~restart]] += 1


def sample_exact(sampler: ChunkDraw, temperature: float, batch_size: int, *, max_calls: int = 10_000,
                 generator: Optional[torch.Generator] = None, on_cap: str = "error",
                 device: torch.device | str = "cpu") -> ExactSample:
    """Algorithm 1: an exact sample of P^(1/T)/Z for each of ``batch_size`` sequences, T in (0, 1].

    Each round calls ``sampler`` once with the indices (on ``device``) of the sequences still running;
    every sequence accepts independently. Stage 1 draws n = floor(1/T) chunks and goes on only if they
    are all equal (x*); for alpha = 1/T - n > 0, Stage 2 is Mendo's Bernoulli factory, which passes with
    probability P(x*)^alpha. E[calls] = (n + 1{alpha>0} sum_x P(x)^(1/T-1)) / sum_x P(x)^(1/T).
    ``generator`` drives only the factory's uniforms (the sampler owns its own randomness).

    A sequence that has spent ``max_calls`` calls without accepting raises RuntimeError when
    ``on_cap="error"``; with ``on_cap="fallback"`` it takes one plain T=1 draw instead (one more call,
    flagged in ``fell_back``, counted in a warning) - no longer an exact P_T sample.
    """
    whole, alpha = split_inverse_temperature(temperature)
    if on_cap not in ("error", "fallback"):
        raise ValueError(f"on_cap must be 'error' or 'fallback', got {on_cap!r}")
    if batch_size < 1 or max_calls < 1:
        raise ValueError(f"batch_size and max_calls must be >= 1, got {batch_size} and {max_calls}")
    active = torch.arange(batch_size, device=device)
    state: Optional[_ExactState] = None
    while active.numel() > 0:
        if state is not None:
            active = _apply_call_cap(state, active, sampler, max_calls, on_cap, temperature)
            if active.numel() == 0:
                break
        draws = sampler(active)
        if draws.dim() != 2 or draws.shape[0] != active.numel():
            raise ValueError(f"sampler returned shape {list(draws.shape)} for {active.numel()} sequences; "
                             f"expected [{active.numel()}, K]")
        if state is None:
            state = _ExactState(batch_size, draws.to(device))
        state.calls[active] += 1
        state.advance(active, draws.to(device), whole, alpha, generator)
        active = (~state.done).nonzero().squeeze(1)
    if state.fell_back.any():
        warnings.warn(f"sample_exact: {int(state.fell_back.sum())} of {batch_size} sequences reached "
                      f"max_calls={max_calls} at T={temperature} and fell back to a plain T=1 draw",
                      RuntimeWarning, stacklevel=2)
    return ExactSample(state.chunks, state.calls, state.fell_back)


def _apply_call_cap(state: _ExactState, active: torch.Tensor, sampler: ChunkDraw, max_calls: int,
                    on_cap: str, temperature: float) -> torch.Tensor:
    """Handle sequences that used up ``max_calls``; returns the sequences that keep running."""
    capped = state.calls[active] >= max_calls
    if not capped.any():
        return active
    if on_cap == "error":
        raise RuntimeError(
            f"sample_exact: {int(capped.sum())} of {state.done.numel()} sequences made max_calls={max_calls} "
            f"sampler calls at T={temperature} without accepting (the expected cost grows like 1/sum_x "
            f"P(x)^(1/T)); raise max_calls, raise T, pass on_cap='fallback', or use sample_batch_approx")
    index = active[capped]
    state.accept(index, sampler(index).to(state.chunks.device, state.chunks.dtype))
    state.calls[index] += 1
    state.fell_back[index] = True
    return active[~capped]


def _group_identical_chunks(candidates: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort each row's candidates so that equal chunks are adjacent.

    Returns ``order`` [B, N] (sorted slot -> original slot), ``is_first`` [B, N] (first sorted slot of
    each distinct chunk, which is its earliest original slot) and ``counts`` [B, N] (each sorted slot's
    chunk count). Stable sorts by the last token first, then the earlier ones (an LSD radix sort).
    """
    batch, num, chunk_size = candidates.shape
    order = torch.arange(num, device=candidates.device).expand(batch, num)
    for k in reversed(range(chunk_size)):
        key = candidates[..., k].gather(1, order)
        order = order.gather(1, torch.sort(key, dim=1, stable=True).indices)
    ordered = candidates.gather(1, order[..., None].expand(-1, -1, chunk_size))
    is_first = torch.ones(batch, num, dtype=torch.bool, device=candidates.device)
    is_first[:, 1:] = (ordered[:, 1:] != ordered[:, :-1]).any(-1)
    group = is_first.cumsum(1) - 1
    group_size = torch.zeros(batch, num, dtype=torch.int64, device=candidates.device)
    group_size.scatter_add_(1, group, torch.ones_like(group))
    return order, is_first, group_size.gather(1, group)


def chunk_counts(candidates: torch.Tensor) -> torch.Tensor:
    """For candidates ``[B, N, K]``: how many candidates of the same row equal each one, LongTensor [B, N]."""
    order, _, counts = _group_identical_chunks(candidates)
    return torch.zeros_like(counts).scatter_(1, order, counts)


def batch_approx_distribution(candidates: torch.Tensor, temperature: float) -> torch.Tensor:
    """Algorithm 2's selection probabilities over the N candidate slots, float64 [B, N].

    For T = 1/n: m = min(n, largest count c_x in the row); each distinct chunk with c_x >= m gets weight
    C(c_x, m), carried by its first slot (other slots get 0). Rows sum to 1.
    """
    whole = inverse_temperature_integer(temperature)
    if candidates.dim() != 3 or candidates.shape[1] < 1:
        raise ValueError(f"candidates must be [B, N, K] with N >= 1, got {list(candidates.shape)}")
    order, is_first, counts = _group_identical_chunks(candidates)
    counts = counts.to(torch.float64)
    level = counts.max(dim=1, keepdim=True).values.clamp(max=whole)  # the first non-empty m
    log_binomial = (torch.lgamma(counts + 1) - torch.lgamma(level + 1)
                    - torch.lgamma((counts - level).clamp(min=0) + 1))
    eligible = is_first & (counts >= level)
    log_weight = torch.where(eligible, log_binomial, torch.full_like(log_binomial, -math.inf))
    probs_sorted = torch.softmax(log_weight, dim=1)
    return torch.zeros_like(probs_sorted).scatter_(1, order, probs_sorted)


def sample_batch_approx(candidates: torch.Tensor, temperature: float,
                        generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Algorithm 2: one chunk per row from N candidate draws ``[B, N, K]`` at T = 1/n; returns [B, K].

    Biased for finite N, unbiased as N grows (calm-spec 4, Theorem 3). T = 1 returns the first
    candidate (a plain draw); T not of the form 1/n raises ValueError.
    """
    if inverse_temperature_integer(temperature) == 1:
        return candidates[:, 0]
    probs = batch_approx_distribution(candidates, temperature)
    slot = torch.multinomial(probs, 1, generator=generator)
    return candidates.gather(1, slot[..., None].expand(-1, -1, candidates.shape[-1])).squeeze(1)
