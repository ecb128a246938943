"""CALM, the energy-head continuous autoregressive LM, in the reference CALM release's layout.

Shipped next to exported weights and loaded with ``trust_remote_code=True``: imports only torch and
transformers (the autoencoder's modeling file comes with it). Parameter names and shapes are those
of the reference ``EnergyTransformer`` (calm-spec sections 2 and 4):

    transformer.*           a Llama backbone over chunk positions 0..L-1 (its embed_tokens is CALM's
                            own input table, not the autoencoder's)
    embed_proj.{0,2,3}      K token embeddings -> Linear(K*d, 2d) -> SiLU -> Linear(2d, d) -> LayerNorm
    mlp_generator.*         the energy head (also reachable as ``generative_head``, as in the reference,
                            so its state dict lists the head under both names)
    ae_model.*              the frozen autoencoder, whose config is read from ``config.ae_path``

``forward(input_ids, noise=...)`` returns the backbone's hidden states and head latents for fixed
noise; ``generate`` samples chunk by chunk with likelihood-free temperature sampling: the exact
Algorithm 1 (``sample_exact``) for any T in (0, 1], or the batch approximation (Algorithm 2,
``sample_batch_approx``) for T = 1/n. The sampler functions at the end of this file are copies of
calm-megatron's ``calm_megatron/sampling.py``.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.models.llama.modeling_llama import LlamaModel
from transformers.utils import ModelOutput

from .configuration_autoencoder import AutoencoderConfig
from .configuration_calm import CALMConfig
from .modeling_autoencoder import Autoencoder

HEAD_NORM_EPS = 1e-6


class ResBlock(nn.Module):
    """e <- e + down_proj(SiLU(g) * v), (g, v) = linears([LN(e); c]) split in halves."""

    def __init__(self, hidden_size: int):
        super().__init__()
        d = hidden_size
        self.in_ln = nn.LayerNorm(d, eps=HEAD_NORM_EPS)
        self.linears = nn.Sequential(nn.Linear(2 * d, d), nn.SiLU(), nn.Linear(d, d), nn.SiLU(), nn.Linear(d, 2 * d))
        self.down_proj = nn.Linear(d, d)

    def forward(self, noise_state: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        gate, value = self.linears(torch.cat([self.in_ln(noise_state), condition], dim=-1)).chunk(2, dim=-1)
        return noise_state + self.down_proj(F.silu(gate) * value)


class FinalLayer(nn.Module):
    """z = Linear(d, l)(SiLU(Linear(d, d)(LN(e))))."""

    def __init__(self, hidden_size: int, latent_size: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(hidden_size, eps=HEAD_NORM_EPS)
        self.linears = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.SiLU(),
                                     nn.Linear(hidden_size, latent_size))

    def forward(self, noise_state: torch.Tensor) -> torch.Tensor:
        return self.linears(self.in_ln(noise_state))


class MLPGenerator(nn.Module):
    """The energy head: a latent sample z = G(h, eps) from a hidden state and uniform noise."""

    def __init__(self, config: CALMConfig):
        super().__init__()
        d = config.hidden_size
        self.noise_embd = nn.Linear(config.noise_size, d)
        self.hidden_embd = nn.Linear(d, d)
        self.norm_noise = nn.LayerNorm(d, eps=HEAD_NORM_EPS)
        self.norm_hidden = nn.LayerNorm(d, eps=HEAD_NORM_EPS)
        self.mlp_blocks = nn.ModuleList(ResBlock(d) for _ in range(config.num_mlp_layers))
        self.final_layer = FinalLayer(d, config.latent_size)

    def forward(self, hidden: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """hidden [..., d] and noise [..., noise_size] (same leading dims) -> latents [..., l]."""
        condition = self.norm_hidden(self.hidden_embd(hidden))
        state = self.norm_noise(self.noise_embd(noise.to(hidden.dtype)))
        for block in self.mlp_blocks:
            state = block(state, condition)
        return self.final_layer(state)


@dataclass
class CALMOutput(ModelOutput):
    """``last_hidden_state`` [B, L, d] (state i has seen chunks <= i and predicts chunk i+1);
    ``latents`` [N, B, L, l] head samples when noise or num_samples was given."""
    last_hidden_state: Optional[torch.Tensor] = None
    latents: Optional[torch.Tensor] = None
    past_key_values: Optional[object] = None


def _autoencoder_config(config: CALMConfig) -> AutoencoderConfig:
    """The autoencoder config named by ``config.ae_path``: a folder relative to this model's, a path, or a hub id."""
    path = config.ae_path
    if not path:
        raise ValueError("CALMConfig.ae_path is empty: it must name the autoencoder folder (or pass ae_config=)")
    base = getattr(config, "_name_or_path", "") or ""
    candidates = [os.path.join(base, path)] if base and not os.path.isabs(path) else []
    for candidate in candidates + [path]:
        if os.path.isfile(os.path.join(candidate, "config.json")):
            return AutoencoderConfig.from_pretrained(candidate)
    return AutoencoderConfig.from_pretrained(path)


class CALMPreTrainedModel(PreTrainedModel):
    config_class = CALMConfig
    base_model_prefix = "calm"
    _no_split_modules = ["LlamaDecoderLayer", "ResBlock", "AELayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _tied_weights_keys = [r"^generative_head\.", r"^ae_model\.decoder\.lm_head_weight$"]

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()


class EnergyTransformer(CALMPreTrainedModel):
    """CALM with the energy head over a frozen chunk autoencoder (see the module docstring)."""

    def __init__(self, config: CALMConfig, ae_config: Optional[AutoencoderConfig] = None):
        super().__init__(config)
        ae_config = ae_config if ae_config is not None else _autoencoder_config(config)
        for key in ("patch_size", "latent_size", "vocab_size"):
            if getattr(ae_config, key) != getattr(config, key):
                raise ValueError(f"the autoencoder at {config.ae_path} has {key}={getattr(ae_config, key)}, "
                                 f"the CALM config {getattr(config, key)}")
        K, d = config.patch_size, config.hidden_size
        self.ae_model = Autoencoder(ae_config)
        self.ae_model.requires_grad_(False)
        self.transformer = LlamaModel(config)
        self.embed_proj = nn.Sequential(nn.Linear(K * d, 2 * d), nn.SiLU(), nn.Linear(2 * d, d),
                                        nn.LayerNorm(d, eps=HEAD_NORM_EPS))
        self.mlp_generator = MLPGenerator(config)
        self.generative_head = self.mlp_generator  # the reference registers the head under both names
        self.post_init()
        with torch.no_grad():  # the head starts out predicting 0 (calm-spec 2.6)
            self.mlp_generator.final_layer.linears[2].weight.zero_()
            self.mlp_generator.final_layer.linears[2].bias.zero_()

    def get_input_embeddings(self):
        return self.transformer.embed_tokens

    # ----------------------------------------------------------------- pieces

    def embed_chunks(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, L*K] -> backbone inputs [B, L, d]: K embeddings concatenated, then embed_proj."""
        batch, length = input_ids.shape
        K = self.config.patch_size
        if length % K:
            raise ValueError(f"CALM reads whole chunks: {length} tokens is not a multiple of K={K}")
        embedded = self.transformer.embed_tokens(input_ids).reshape(batch, length // K, K * self.config.hidden_size)
        return self.embed_proj(embedded)

    def draw_noise(self, shape, device, dtype, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """eps ~ U(-0.5, 0.5) of shape [*shape, noise_size]."""
        return torch.rand(*shape, self.config.noise_size, device=device, dtype=dtype, generator=generator) - 0.5

    def sample_latents(self, hidden: torch.Tensor, num_samples: Optional[int] = None,
                       noise: Optional[torch.Tensor] = None,
                       generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Head samples [N, ..., l] for hidden states [..., d]; noise [N, ..., noise_size] fixes them."""
        if noise is None:
            num_samples = num_samples or self.config.num_samples
            noise = self.draw_noise((num_samples, *hidden.shape[:-1]), hidden.device, hidden.dtype, generator)
        expanded = hidden.unsqueeze(0).expand(noise.shape[0], *hidden.shape)
        return self.mlp_generator(expanded, noise)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [..., l] -> token ids [..., K] by the frozen autoencoder's argmax."""
        return self.ae_model.decode(latents.unsqueeze(-2)).argmax(-1)

    def forward(self, input_ids: torch.Tensor, noise: Optional[torch.Tensor] = None,
                num_samples: Optional[int] = None, past_key_values=None, use_cache: Optional[bool] = None,
                generator: Optional[torch.Generator] = None, return_dict: Optional[bool] = None, **kwargs):
        """Hidden states of the chunks of ``input_ids`` [B, L*K], and head latents if noise/num_samples given."""
        out = self.transformer(inputs_embeds=self.embed_chunks(input_ids), past_key_values=past_key_values,
                               use_cache=use_cache, return_dict=True)
        hidden = out.last_hidden_state
        latents = None
        if noise is not None or num_samples:
            latents = self.sample_latents(hidden, num_samples, noise, generator)
        output = CALMOutput(last_hidden_state=hidden, latents=latents, past_key_values=out.past_key_values)
        return output if return_dict is not False else output.to_tuple()

    # ----------------------------------------------------------------- generation

    def _sample_chunk(self, hidden: torch.Tensor, temperature: float, sampler: str, num_candidates: int,
                      max_calls: int, on_cap: str, generator: Optional[torch.Generator]) -> torch.Tensor:
        """One next chunk [B, K] for each last hidden state [B, d], at temperature T."""
        def draw(index: torch.Tensor) -> torch.Tensor:
            return self.decode_latents(self.sample_latents(hidden[index], 1, generator=generator))[0]

        if split_inverse_temperature(temperature) == (1, 0.0):
            return draw(torch.arange(hidden.shape[0], device=hidden.device))
        if sampler == "batch":
            candidates = self.decode_latents(self.sample_latents(hidden, num_candidates, generator=generator))
            return sample_batch_approx(candidates.transpose(0, 1), temperature, generator=generator)
        if sampler != "exact":
            raise ValueError(f"sampler must be 'exact' or 'batch', got {sampler!r}")
        return sample_exact(draw, temperature, hidden.shape[0], max_calls=max_calls, generator=generator,
                            on_cap=on_cap, device=hidden.device).chunks

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 64, temperature: float = 1.0,
                 sampler: str = "exact", num_candidates: int = 200, max_calls: int = 10_000,
                 on_cap: str = "fallback", eos_token_id: Optional[int] = None, pad_token_id: Optional[int] = None,
                 generator: Optional[torch.Generator] = None, **unused) -> torch.Tensor:
        """Continue ``input_ids`` [B, T] by whole chunks of K tokens; returns [B, T' + n*K].

        The prompt is right-padded with PAD to a multiple of K, as the reference does (the pads are
        part of the context). Each step feeds the last chunk through the backbone (KV cache) and draws
        the next chunk at ``temperature``: T = 1 is one head sample decoded by the autoencoder's argmax;
        T < 1 uses ``sampler="exact"`` (Algorithm 1, any T in (0, 1]; ``max_calls``/``on_cap`` bound the
        cost per sequence) or ``"batch"`` (Algorithm 2 over ``num_candidates`` draws, T = 1/n).
        A sequence that produced EOS is filled with PAD from then on; generation stops when every
        sequence has, or after ``max_new_tokens`` (rounded up to whole chunks).
        """
        K = self.config.patch_size
        eos = self.config.eos_token_id if eos_token_id is None else eos_token_id
        pad = self.config.pad_token_id if pad_token_id is None else pad_token_id
        check_temperature(temperature)
        if input_ids.shape[1] % K:
            if pad is None:
                raise ValueError(f"the prompt length {input_ids.shape[1]} is not a multiple of K={K} and the "
                                 "config has no pad_token_id to pad it with")
            fill = input_ids.new_full((input_ids.shape[0], K - input_ids.shape[1] % K), pad)
            input_ids = torch.cat([input_ids, fill], dim=1)
        out = self(input_ids, use_cache=True)
        cache, hidden = out.past_key_values, out.last_hidden_state[:, -1]
        pieces = [input_ids]
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for _ in range(math.ceil(max_new_tokens / K)):
            chunk = self._sample_chunk(hidden, temperature, sampler, num_candidates, max_calls, on_cap, generator)
            if eos is not None:
                if pad is not None:
                    chunk = torch.where(finished[:, None], torch.full_like(chunk, pad), chunk)
                finished |= (chunk == eos).any(-1)
            pieces.append(chunk)
            if eos is not None and bool(finished.all()):
                break
            out = self(chunk, past_key_values=cache, use_cache=True)
            cache, hidden = out.past_key_values, out.last_hidden_state[:, -1]
        return torch.cat(pieces, dim=1)


# ----------------------------------------------------------------------------------------------------
# Likelihood-free temperature sampling over whole K-token chunks (calm-spec section 4).
# Copied verbatim from calm-megatron's calm_megatron/sampling.py (its tests check that they stay equal).
# ----------------------------------------------------------------------------------------------------

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
