"""KV-cached generation for CALM (calm-spec 2.7) and for the autoregressive baseline.

CALM, one step per chunk of K tokens::

    last chunk's K tokens -> CALM embedding + input compression -> backbone step (KV cache)
    -> energy head draw(s) -> frozen AE decoder, argmax -> K new tokens -> fed back

Temperature (calm-spec 4, through :mod:`calm_megatron.sampling`): T = 1 is one plain draw;
``sampler="batch"`` is Algorithm 2 over ``num_samples`` (N) head draws for T = 1/n;
``sampler="exact"`` is Algorithm 1 with head + decoder as the black-box sampler, any T in (0, 1].
The baseline draws token by token from softmax(logits / T), optionally nucleus (top-p) filtered.

Prompts whose length is not a multiple of K (``prompt_mode``):

* ``"force"`` (default): the prompt's whole chunks are fed; its last P mod K tokens become the
  forced start of the first generated chunk, which is drawn from the model *conditioned* on that
  start (rejection: draws whose first tokens differ are discarded, up to ``max_prefix_draws`` per
  sequence; past that cap the start overwrites a plain draw, counted in ``fallbacks``). Every
  backbone input is then a real chunk of text, as in training, where chunks straddle document
  boundaries and a block may start anywhere in a document, and the continuation follows the
  prompt's last token directly. A prompt shorter than K is left-padded to one chunk, as ``"left"``.
* ``"left"``: left-pad with PAD to a multiple of K.
* ``"pad"``: the reference ``generate()``: right-pad with PAD and feed the pads as part of the
  prompt (PAD never occurs in CALM's training data, and the continuation starts after the pads).

Both models stop a sequence at EOS (not returned) or after ``max_new_tokens`` token positions, or
when the context (``max_position_embeddings`` positions: chunks for CALM, tokens for the baseline)
is full; PAD tokens are stripped from the output. Prompts are batched: all sequences share one
static KV cache (Megatron-Core's ``StaticInferenceContext``); the cache is filled with the shortest
prompt at once, then one position per step, each longer prompt's own tokens being fed until it
has been read (Megatron's static-batching scheme), so no sequence ever attends to padding.

``use_cache=False`` recomputes the backbone over the whole sequence at every step with the same
random draws: the reference the KV-cached path is tested against.

The AE argmax over the vocabulary is exact and faster than fp32 logits: bf16 logits with a
rigorous rounding-error bound select the few candidates that can be the maximum, which are then
rescored in float64 (:class:`ChunkDecoder`). Single process, TP = PP = 1
(:func:`load_model_for_inference` merges sharded checkpoints).
"""
from __future__ import annotations

import math
import time
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from calm_megatron.sampling import (batch_approx_distribution, check_temperature, chunk_counts,
                                    inverse_temperature_integer, sample_batch_approx, sample_exact,
                                    split_inverse_temperature)

PROMPT_MODES = ("force", "left", "pad")
SAMPLERS = ("batch", "exact")


@dataclass
class GenerationResult:
    """What :func:`generate_calm` / :func:`generate_ar` return."""
    tokens: List[List[int]]  # new tokens per prompt: prompt, PAD and EOS excluded
    finish_reasons: List[str]  # per prompt: "eos" | "length" | "context"
    seconds: float  # wall time of the generation loop (model loading excluded)
    steps: int = 0  # backbone forward calls (prefill included)
    head_draws: int = 0  # CALM: latents drawn from the energy head
    decoded_fraction: float = 1.0  # CALM: share of drawn latents' token positions that were decoded
    fallbacks: int = 0  # prefix-conditioning / Algorithm 1 cap fallbacks

    @property
    def num_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def tokens_per_second(self) -> float:
        return self.num_tokens / max(self.seconds, 1e-9)


# --------------------------------------------------------------------------- shared plumbing

def _check_common(prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float) -> List[List[int]]:
    check_temperature(temperature)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if len(prompts) == 0:
        raise ValueError("no prompt given")
    out = []
    for i, prompt in enumerate(prompts):
        ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError(f"prompt {i} is empty")
        out.append(ids)
    return out


def _check_single_rank(model) -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized() and (ps.get_tensor_model_parallel_world_size() > 1
                                               or ps.get_pipeline_model_parallel_world_size() > 1):
        raise ValueError("generation runs at TP=1, PP=1 (load_model_for_inference merges sharded checkpoints)")
    if not (model.pre_process and model.post_process):
        raise ValueError("generation needs the whole model on one pipeline stage")


class _Stream:
    """Per-sequence output bookkeeping: emitted tokens, EOS, the token budget."""

    def __init__(self, batch: int, max_new_tokens: int, eos_id: Optional[int], pad_id: Optional[int]):
        self.tokens: List[List[int]] = [[] for _ in range(batch)]
        self.positions = [0] * batch  # generated token positions, PAD included
        self.reasons: List[Optional[str]] = [None] * batch
        self.done = torch.zeros(batch, dtype=torch.bool)
        self.max_new, self.eos, self.pad = max_new_tokens, eos_id, pad_id
        if max_new_tokens == 0:
            self.done[:] = True
            self.reasons = ["length"] * batch

    def emit(self, row: int, ids: Sequence[int]) -> None:
        for token in ids:
            if self.positions[row] >= self.max_new:
                break
            self.positions[row] += 1
            if self.eos is not None and token == self.eos:
                self._finish(row, "eos")
                return
            if self.pad is None or token != self.pad:
                self.tokens[row].append(int(token))
        if self.positions[row] >= self.max_new:
            self._finish(row, "length")

    def _finish(self, row: int, reason: str) -> None:
        self.done[row] = True
        self.reasons[row] = reason

    def close(self) -> List[str]:
        return [reason or "context" for reason in self.reasons]


class _BackboneRunner:
    """Backbone output at the last fed position, KV-cached or recomputed from scratch."""

    def __init__(self, backbone, embed: Callable[[torch.Tensor], torch.Tensor], batch: int, max_len: int,
                 use_cache: bool):
        from megatron.core.inference.contexts import StaticInferenceContext

        self.backbone, self.embed, self.use_cache = backbone, embed, use_cache
        self.context = StaticInferenceContext(batch, max_len) if use_cache else None
        self.calls = 0

    def _run(self, units: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.context is None:
            return self.backbone(self.embed(units))[-1]
        out = self.backbone(self.embed(units), inference_context=self.context)
        self.context.sequence_len_offset += units.size(1)
        self.context.enable_decode_mode()  # the prompt's first part is in the cache
        return out[-1]

    def step(self, units: torch.Tensor, new: int) -> torch.Tensor:
        """units ``[B, t, ...]``: everything fed so far, of which the last ``new`` are new -> ``h [B, d]``."""
        return self._run(units[:, -new:] if self.use_cache else units)


def _decode_loop(runner: _BackboneRunner, buffer: torch.Tensor, forced_until: torch.Tensor, start: int,
                 limit: int, stream: _Stream, choose: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]):
    """The generation loop shared by CALM (units = chunks) and the baseline (units = tokens).

    ``buffer [B, limit, ...]`` holds the prompts (each row forced until ``forced_until``) and
    receives the chosen units; ``choose(h_rows, rows, t)`` returns the units at position t of the
    sequences in ``rows`` (and emits their tokens into ``stream``).
    """
    if start >= limit or stream.done.all():
        return
    h = runner.step(buffer[:, :start], start)
    t = start
    while t < limit:
        need = (forced_until <= t) & ~stream.done
        if need.any():
            rows = need.nonzero().squeeze(1)
            buffer[rows, t] = choose(h[rows.to(h.device)], rows, t).to(buffer.device)
        t += 1
        if stream.done.all() or t >= limit:
            break
        h = runner.step(buffer[:, :t], 1)


# --------------------------------------------------------------------------- exact argmax of the AE

class ChunkDecoder:
    """The frozen AE decoder with an exact argmax over the vocabulary (TP = 1).

    ``fast=True``: bf16 logits x_b . E_b (fp32 accumulation) differ from the exact x . E_v by at most
    ``c ||x|| ||E_v||`` with c = 3.1 u + d 2^-23 (u = 2^-8: both inputs and the output rounded to
    bf16, fp32 sums), so every token within 2 c ||x|| max_v ||E_v|| of the bf16 maximum is rescored
    in float64 and the best (lowest id on ties) is returned: the argmax of the exact logits of the
    fp32 weights. The candidates come from one top-``top_k`` pass over the bf16 logits (a wider row
    is masked in full); a row with more than ``max_candidates`` candidates is scored in full fp32.
    """

    def __init__(self, autoencoder, fast: bool = True, max_candidates: int = 256, row_block: int = 256,
                 top_k: int = 16):
        if autoencoder.num_padded_local:
            raise ValueError("ChunkDecoder runs at TP=1 (no vocabulary padding)")
        self.ae, self.decoder = autoencoder, autoencoder.decoder
        self.chunk_size = autoencoder.ae_config.chunk_size
        self.weight = autoencoder.output_weight.detach()
        self.fast, self.max_candidates, self.row_block, self.top_k = fast, max_candidates, row_block, top_k
        if fast:
            self.weight_bf16 = self.weight.to(torch.bfloat16)
            self.max_norm = float(self.weight.float().norm(dim=1).max())
            self.bound = 3.1 * 2.0 ** -8 + self.weight.shape[1] * 2.0 ** -23

    def token_states(self, z: torch.Tensor) -> torch.Tensor:
        """Latents ``[R, l]`` -> pre-expansion-layer token states ``[R, K, d]`` (the per-latent part)."""
        from calm_megatron.models.autoencoder import _run

        dec = self.decoder
        h = _run(dec.layers_before_expand, dec.latent_to_hidden(z.to(self.weight.dtype)))
        return dec.expand(h).view(z.shape[0], self.chunk_size, -1)

    def finish_tokens(self, states: torch.Tensor) -> torch.Tensor:
        """Token states ``[R, d]`` -> token ids ``[R]`` (per-token layers, norm, argmax)."""
        from calm_megatron.models.autoencoder import _run

        if states.shape[0] == 0:
            return torch.zeros(0, dtype=torch.long, device=states.device)
        return self.argmax(self.decoder.norm(_run(self.decoder.layers_after_expand, states)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents ``[..., l]`` -> token ids ``[..., K]``."""
        lead = z.shape[:-1]
        states = self.token_states(z.reshape(-1, z.shape[-1]))
        return self.finish_tokens(states.reshape(-1, states.shape[-1])).view(*lead, self.chunk_size)

    def argmax(self, x: torch.Tensor) -> torch.Tensor:
        """argmax_v x . E_v for rows ``x [R, d]``."""
        if not self.fast:
            return F.linear(x, self.weight).argmax(-1)
        return torch.cat([self._argmax_block(x[i:i + self.row_block]) for i in range(0, x.shape[0], self.row_block)])

    def _argmax_block(self, x: torch.Tensor) -> torch.Tensor:
        with _fp32_accumulation():
            approx = F.linear(x.to(torch.bfloat16), self.weight_bf16)  # [r, V]
        # One top-k pass instead of max + compare + count + nonzero over the [r, V] logits: a row whose
        # k-th largest lies below its threshold has every candidate among its top k.
        top_values, top_ids = approx.topk(min(self.top_k, approx.shape[-1]), dim=-1)
        threshold = self._threshold(top_values[:, 0].float(), x)
        result = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
        covered = top_values[:, -1] < threshold
        rows = covered.nonzero().squeeze(1)
        if rows.numel():
            hit_rows, hit_cols = (top_values[rows] >= threshold[rows, None]).nonzero(as_tuple=True)
            result[rows] = self._rescore(x[rows], hit_rows, top_ids[rows][hit_rows, hit_cols])
        rows = (~covered).nonzero().squeeze(1)
        if rows.numel():
            result[rows] = self._argmax_wide(x[rows], approx[rows], threshold[rows])
        return result

    def _threshold(self, top: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per row, the bf16 value below which no token can hold the exact maximum."""
        threshold = top - 2.0 * self.bound * self.max_norm * x.float().norm(dim=-1)
        # round down to bf16 (a relative 2^-7 step covers the rounding), so no candidate is lost
        return (threshold - threshold.abs() * 2.0 ** -7 - 1e-30).to(torch.bfloat16)

    def _argmax_wide(self, x: torch.Tensor, approx: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        """Rows with more than top_k candidates: rescore them all, or the whole row in fp32 past max_candidates."""
        mask = approx >= threshold[:, None]
        heavy = mask.sum(-1) > self.max_candidates
        result = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
        if heavy.any():
            result[heavy] = F.linear(x[heavy], self.weight).argmax(-1)
        light = (~heavy).nonzero().squeeze(1)
        if light.numel():
            rows, cols = mask[light].nonzero(as_tuple=True)
            result[light] = self._rescore(x[light], rows, cols)
        return result

    def _rescore(self, x: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The float64 argmax over each row's candidates (``ids`` of row ``rows``); lowest id on ties."""
        exact = (x[rows].double() * self.weight[ids].double()).sum(-1)
        best_value = torch.full((x.shape[0],), -math.inf, dtype=torch.float64, device=x.device)
        best_value.scatter_reduce_(0, rows, exact, "amax")
        winners = exact == best_value[rows]
        best = torch.full((x.shape[0],), self.weight.shape[0], dtype=torch.long, device=x.device)
        best.scatter_reduce_(0, rows[winners], ids[winners], "amin")
        return best


_DECODERS: "weakref.WeakKeyDictionary" = None


def chunk_decoder(autoencoder, fast: bool = True) -> ChunkDecoder:
    """A cached :class:`ChunkDecoder` of ``autoencoder`` (rebuilt when its output weight changed)."""
    global _DECODERS
    if _DECODERS is None:
        _DECODERS = weakref.WeakKeyDictionary()
    weight = autoencoder.output_weight
    key = (fast, weight.data_ptr(), weight._version, weight.dtype, weight.device)
    cached = _DECODERS.get(autoencoder)
    if cached is None or cached[0] != key:
        cached = (key, ChunkDecoder(autoencoder, fast=fast))
        _DECODERS[autoencoder] = cached
    return cached[1]


class _fp32_accumulation:
    """On CUDA, forbid reduced-precision (bf16) reductions inside bf16 GEMMs for the bound to hold."""

    def __enter__(self):
        self.saved = torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = self.saved


# --------------------------------------------------------------------------- CALM chunk sampling

class _ChunkSampler:
    """Next-chunk draws for backbone states: energy head (noise from ``generator``) + AE decoder."""

    def __init__(self, model, decoder: ChunkDecoder, generator: torch.Generator, max_prefix_draws: int):
        self.model, self.decoder, self.generator = model, decoder, generator
        self.max_prefix_draws = max_prefix_draws
        self.head_draws = self.positions_decoded = self.fallbacks = self.prefix_fallbacks = 0

    def latents(self, h: torch.Tensor, n: int) -> torch.Tensor:
        """``n`` head samples per state: h ``[M, d]`` -> ``[M, n, l]``."""
        head = self.model.head
        noise = head.draw_noise((n, h.shape[0]), h.device, h.dtype, self.generator)
        self.head_draws += n * h.shape[0]
        return head(h, n, noise).transpose(0, 1)

    def draw(self, h: torch.Tensor, n: int) -> torch.Tensor:
        """``n`` plain draws per state -> chunks ``[M, n, K]``."""
        z = self.latents(h, n)
        self.positions_decoded += z.shape[0] * n * self.decoder.chunk_size
        return self.decoder.decode(z)

    def draw_with_prefix(self, h: torch.Tensor, n: int, prefix: torch.Tensor, length: torch.Tensor,
                         overwrite: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``n`` draws per state conditioned on the chunk starting with ``prefix[m, :length[m]]``.

        Rejection in rounds of ``max(4n, 64)`` draws per unfinished state, up to ``max_prefix_draws``
        draws in all; a state that runs out, or is marked in ``overwrite``, gets plain draws with the
        prefix written over their start. Returns the chunks ``[M, n, K]`` and the states that ran out.
        """
        m, k = h.shape[0], self.decoder.chunk_size
        out = torch.zeros(m, n, k, dtype=torch.long, device=h.device)
        filled = torch.zeros(m, dtype=torch.long, device=h.device)
        free = torch.arange(k, device=h.device)[None, None, :] >= length[:, None, None]
        direct = ((length == 0) | overwrite).nonzero().squeeze(1)
        if direct.numel():
            out[direct] = self.draw(h[direct], n)
            filled[direct] = n
        spent = 0
        while bool((filled < n).any()) and spent < self.max_prefix_draws:
            rows = (filled < n).nonzero().squeeze(1)
            pool = min(max(4 * n, 64), self.max_prefix_draws - spent)
            cand = self.draw(h[rows], pool)  # [R, pool, K]
            match = ((cand == prefix[rows, None, :]) | free[rows]).all(-1)
            rank = match.cumsum(1)
            take = match & (rank <= (n - filled[rows])[:, None])
            r, slot = take.nonzero(as_tuple=True)
            out[rows[r], filled[rows][r] + rank[r, slot] - 1] = cand[r, slot]
            filled[rows] += take.sum(1)
            spent += pool
        short = filled < n
        if short.any():  # plain draws in the slots left empty
            idx = short.nonzero().squeeze(1)
            missing = torch.arange(n, device=h.device)[None, :] >= filled[idx, None]
            out[idx] = torch.where(missing[..., None], self.draw(h[idx], n), out[idx])
        forced = (short | overwrite) & (length > 0)  # (matched draws already start with the prefix)
        out[forced] = torch.where(free[forced], out[forced], prefix[forced, None, :])
        return out, short

    def select_batch_approx(self, h: torch.Tensor, num_samples: int, temperature: float) -> torch.Tensor:
        """Algorithm 2 over ``num_samples`` head draws per state, decoding only what it needs.

        Token j of a draw is decoded only while its first j tokens equal those of another draw
        of the same state: a draw with a unique prefix is a chunk seen once, which Algorithm 2 can
        pick only when every chunk of the pool is unique (uniformly), and then only the picked
        draw is decoded in full. Undecoded tokens hold a distinct negative id per draw, so the
        counts and the selection probabilities are exactly those over fully decoded chunks.
        """
        z = self.latents(h, num_samples)  # [M, N, l]
        m, n, k = z.shape[0], num_samples, self.decoder.chunk_size
        states = self.decoder.token_states(z.reshape(m * n, -1))  # [M*N, K, d]
        placeholder = -1 - torch.arange(n, device=h.device)
        tokens = placeholder[None, :, None].expand(m, n, k).clone()
        need = torch.ones(m, n, dtype=torch.bool, device=h.device)
        for j in range(k):
            if j > 0:
                need &= chunk_counts(tokens[:, :, :j]) >= 2
            flat = need.reshape(-1).nonzero().squeeze(1)
            tokens.view(m * n, k)[flat, j] = self.decoder.finish_tokens(states[flat, j])
            self.positions_decoded += int(flat.numel())
        probs = batch_approx_distribution(tokens, temperature)
        slot = torch.multinomial(probs, 1, generator=self.generator).squeeze(1)
        chosen = tokens[torch.arange(m, device=h.device), slot]  # [M, K]
        for row in (chosen < 0).any(-1).nonzero().squeeze(1).tolist():  # a unique chunk picked
            missing = (chosen[row] < 0).nonzero().squeeze(1)
            chosen[row, missing] = self.decoder.finish_tokens(states[row * n + slot[row], missing])
            self.positions_decoded += int(missing.numel())
        return chosen


def _calm_next_chunks(sampler: _ChunkSampler, h: torch.Tensor, prefix: torch.Tensor, length: torch.Tensor,
                      temperature: float, algorithm: str, num_samples: int, max_sampler_calls: int,
                      on_cap: str) -> torch.Tensor:
    """The next chunk ``[M, K]`` of each state under the temperature/sampler settings."""
    constrained = bool((length > 0).any())
    overwrite = torch.zeros(h.shape[0], dtype=torch.bool, device=h.device)  # conditioning given up

    def draws(index: torch.Tensor, n: int) -> torch.Tensor:
        if not constrained:
            return sampler.draw(h[index], n)
        chunks, short = sampler.draw_with_prefix(h[index], n, prefix[index], length[index], overwrite[index])
        sampler.prefix_fallbacks += int(short.sum())
        overwrite[index[short]] = True
        return chunks

    every = torch.arange(h.shape[0], device=h.device)
    if split_inverse_temperature(temperature) == (1, 0.0):  # T = 1: one plain draw
        return draws(every, 1)[:, 0]
    if algorithm == "batch":
        if constrained:
            return sample_batch_approx(draws(every, num_samples), temperature, sampler.generator)
        return sampler.select_batch_approx(h, num_samples, temperature)
    result = sample_exact(lambda index: draws(index, 1)[:, 0], temperature, h.shape[0],
                          max_calls=max_sampler_calls, generator=sampler.generator, on_cap=on_cap,
                          device=h.device)
    sampler.fallbacks += int(result.fell_back.sum())
    return result.chunks


@dataclass
class _CALMPrompts:
    chunks: torch.Tensor  # [B, max_chunks, K]: the fed prompt chunks, PAD elsewhere
    full_chunks: torch.Tensor  # [B]: prompt chunks fed as they are
    prefix: torch.Tensor  # [B, K]: forced start of the first generated chunk
    prefix_len: torch.Tensor  # [B]


def _plan_calm_prompts(prompts: List[List[int]], k: int, max_chunks: int, mode: str, pad_id: int) -> _CALMPrompts:
    batch = len(prompts)
    chunks = torch.full((batch, max_chunks, k), pad_id, dtype=torch.long)
    full = torch.zeros(batch, dtype=torch.long)
    prefix = torch.zeros(batch, k, dtype=torch.long)
    prefix_len = torch.zeros(batch, dtype=torch.long)
    for i, ids in enumerate(prompts):
        if math.ceil(len(ids) / k) > max_chunks:
            raise ValueError(f"prompt {i} has {len(ids)} tokens, longer than the context of {max_chunks * k} "
                             f"tokens ({max_chunks} chunks of K={k})")
        rest = len(ids) % k
        if mode == "force" and len(ids) >= k:
            fed, tail = ids[:len(ids) - rest], ids[len(ids) - rest:]
            prefix[i, :rest] = torch.tensor(tail, dtype=torch.long)
            prefix_len[i] = rest
        elif mode == "pad":
            fed, tail = ids + [pad_id] * ((k - rest) % k), []
        else:  # left, and force with fewer than K tokens
            fed, tail = [pad_id] * ((k - rest) % k) + ids, []
        full[i] = len(fed) // k
        chunks[i, :full[i]] = torch.tensor(fed, dtype=torch.long).view(-1, k)
    return _CALMPrompts(chunks, full, prefix, prefix_len)


@torch.no_grad()
def generate_calm(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 1.0,
                  num_samples: int = 200, sampler: str = "batch", prompt_mode: str = "force",
                  eos_id: Optional[int] = None, pad_id: Optional[int] = None,
                  generator: Optional[torch.Generator] = None, use_cache: bool = True,
                  max_sampler_calls: int = 10_000, on_cap: str = "error", max_prefix_draws: int = 4096,
                  decoder: Optional[ChunkDecoder] = None) -> GenerationResult:
    """Continue each token prompt with up to ``max_new_tokens`` tokens from a CALM (module docstring).

    ``num_samples`` is N of Algorithm 2 (``sampler="batch"``, T = 1/n); ``sampler="exact"`` runs
    Algorithm 1 (``max_sampler_calls``/``on_cap`` as in :func:`sample_exact`). ``pad_id`` is needed
    by the padding prompt modes and is stripped from the output. Random draws (head noise,
    selections, Bernoulli factory) all come from ``generator``.
    """
    prompts = _check_common(prompts, max_new_tokens, temperature)
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if prompt_mode not in PROMPT_MODES:
        raise ValueError(f"prompt_mode must be one of {', '.join(PROMPT_MODES)}, got {prompt_mode!r}")
    if sampler == "batch":
        inverse_temperature_integer(temperature)  # T must be 1/n
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    k = model.chunk_size
    if pad_id is None:
        if any(len(p) % k and (prompt_mode != "force" or len(p) < k) for p in prompts):
            raise ValueError(f"prompt_mode={prompt_mode!r} pads these prompts to a multiple of K={k}: pass pad_id")
        pad_id = 0  # only fills unused buffer slots
    _check_single_rank(model)
    model.eval()
    started = time.perf_counter()
    device = next(model.parameters()).device
    generator = generator or torch.Generator(device=device).manual_seed(0)
    max_chunks = model.model_cfg.max_position_embeddings
    plan = _plan_calm_prompts(prompts, k, max_chunks, prompt_mode, pad_id)
    chunks = plan.chunks.to(device)
    needed = int((plan.full_chunks + (plan.prefix_len + max_new_tokens + k - 1) // k).max())
    limit = min(max_chunks, needed)
    stream = _Stream(len(prompts), max_new_tokens, eos_id, pad_id)
    decoder = decoder or chunk_decoder(model.autoencoder)
    draws = _ChunkSampler(model, decoder, generator, max_prefix_draws)
    runner = _BackboneRunner(model.backbone, model.embed_chunks, len(prompts), limit, use_cache)
    prefix, prefix_len = plan.prefix.to(device), plan.prefix_len.to(device)

    def choose(h: torch.Tensor, rows: torch.Tensor, t: int) -> torch.Tensor:
        first = (plan.full_chunks[rows] == t).to(device)
        length = torch.where(first, prefix_len[rows.to(device)], torch.zeros_like(first, dtype=torch.long))
        new = _calm_next_chunks(draws, h, prefix[rows.to(device)], length, temperature, sampler, num_samples,
                                max_sampler_calls, on_cap)
        for i, row in enumerate(rows.tolist()):
            stream.emit(row, new[i, int(length[i]):].tolist())
        return new

    _decode_loop(runner, chunks, plan.full_chunks, int(plan.full_chunks.min()), limit, stream, choose)
    if draws.prefix_fallbacks:
        warnings.warn(f"prompt_mode='force': for {draws.prefix_fallbacks} sequence(s) no draw among "
                      f"{max_prefix_draws} started with the prompt's last tokens; those tokens were written over "
                      f"the start of a plain draw instead", RuntimeWarning, stacklevel=2)
    decoded = draws.positions_decoded / max(draws.head_draws * k, 1)
    return GenerationResult(stream.tokens, stream.close(), time.perf_counter() - started, runner.calls,
                            draws.head_draws, decoded, draws.fallbacks + draws.prefix_fallbacks)


# --------------------------------------------------------------------------- the baseline

def _sample_tokens(logits: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
    """One token per row from softmax(logits / T), restricted to the top-p nucleus when top_p < 1."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # the smallest set reaching top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def lm_logits(model, h: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary fp32 logits ``[B, V]`` of the baseline's LM head for states ``h [B, d]`` (TP=1).

    Computed as ``(W h^T)^T``: the same products as ``h W^T``, and on CPU BLAS (MKL) often several
    times faster for a [V, d] weight and a few rows.
    """
    logits = torch.mm(model.output_layer.weight, h.t()).t()
    return logits[..., :model.model_cfg.vocab_size].float()


@torch.no_grad()
def generate_ar(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 1.0,
                top_p: float = 1.0, eos_id: Optional[int] = None, pad_id: Optional[int] = None,
                generator: Optional[torch.Generator] = None, use_cache: bool = True) -> GenerationResult:
    """Continue each prompt token by token from the baseline (KV-cached, batched; module docstring)."""
    prompts = _check_common(prompts, max_new_tokens, temperature)
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    _check_single_rank(model)
    model.eval()
    started = time.perf_counter()
    device = next(model.parameters()).device
    generator = generator or torch.Generator(device=device).manual_seed(0)
    context = model.model_cfg.max_position_embeddings
    for i, ids in enumerate(prompts):
        if len(ids) > context:
            raise ValueError(f"prompt {i} has {len(ids)} tokens, longer than the context of {context} tokens")
    lengths = torch.tensor([len(p) for p in prompts])
    limit = min(context, int(lengths.max()) + max_new_tokens)
    tokens = torch.full((len(prompts), max(limit, int(lengths.max()))), pad_id or 0, dtype=torch.long, device=device)
    for i, ids in enumerate(prompts):
        tokens[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    stream = _Stream(len(prompts), max_new_tokens, eos_id, pad_id)
    runner = _BackboneRunner(model.backbone, lambda t: model.embedding(t.t().contiguous()), len(prompts),
                             limit, use_cache)

    def choose(h: torch.Tensor, rows: torch.Tensor, t: int) -> torch.Tensor:
        new = _sample_tokens(lm_logits(model, h), temperature, top_p, generator)
        for i, row in enumerate(rows.tolist()):
            stream.emit(row, [int(new[i])])
        return new

    _decode_loop(runner, tokens, lengths, int(lengths.min()), limit, stream, choose)
    return GenerationResult(stream.tokens, stream.close(), time.perf_counter() - started, runner.calls)


# --------------------------------------------------------------------------- loading a checkpoint

@dataclass
class InferenceModel:
    """A model rebuilt from a checkpoint step for generation (TP=1, PP=1, eval mode)."""
    model: torch.nn.Module
    config: object  # calm_megatron.config.Config
    stage: str  # calm | ar
    step: Path
    tokenizer: object = None  # calm_megatron.data.tokenizer.Tokenizer, when one was found


def load_model_for_inference(path: str, tokenizer: Optional[str] = None, precision: str = "fp32",
                             device: Optional[torch.device] = None, verify: bool = True) -> InferenceModel:
    """Rebuild a CALM or baseline run for generation from a run dir, checkpoints dir, step dir or HF folder.

    The model is built at TP=1/PP=1 from the step's config.yaml (or the HF folder's config) and
    filled by :mod:`calm_megatron.hf.loading` (TP shards joined, PP stages merged; a CALM's frozen AE
    from the same shards). ``verify`` checks a step's manifest first. The tokenizer is ``tokenizer``
    or the run's own (None when neither exists). Initialises a one-process Megatron parallel state
    when none exists.
    """
    from calm_megatron import distributed
    from calm_megatron.data.tokenizer import load_tokenizer
    from calm_megatron.hf.loading import load_checkpoint_model, load_hf_model
    from calm_megatron.hf.source import is_hf_folder

    if is_hf_folder(path):
        loaded = load_hf_model(path, precision=precision)
    else:
        loaded = load_checkpoint_model(path, precision=precision, check_manifest=verify)
    if loaded.kind not in ("calm", "ar"):
        raise ValueError(f"{loaded.source} is a run.stage={loaded.kind!r} checkpoint; generation needs a calm "
                         f"or ar run")
    model = loaded.model.to(device or distributed.device()).eval()
    tok_path = tokenizer or loaded.tokenizer
    tok = load_tokenizer(tok_path) if tok_path else None
    vocab = loaded.config.model.vocab_size
    if tok is not None and tok.vocab_size != vocab:
        raise ValueError(f"tokenizer {tok.path} has {tok.vocab_size} ids but the model's vocabulary is {vocab}")
    return InferenceModel(model, loaded.config, loaded.kind, loaded.source, tok)


def generate(loaded: InferenceModel, prompts: Sequence[Sequence[int]], max_new_tokens: int, **options):
    """:func:`generate_calm` or :func:`generate_ar` by the loaded run's stage, with the tokenizer's EOS/PAD."""
    tok = loaded.tokenizer
    if tok is not None:
        options.setdefault("eos_id", tok.eos_id)
        options.setdefault("pad_id", tok.pad_id)
    if loaded.stage == "calm":
        options.pop("top_p", None)
        return generate_calm(loaded.model, prompts, max_new_tokens, **options)
    for key in ("num_samples", "sampler", "prompt_mode", "max_sampler_calls", "on_cap", "max_prefix_draws"):
        options.pop(key, None)
    return generate_ar(loaded.model, prompts, max_new_tokens, **options)
