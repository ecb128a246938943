"""CALM's energy-based generative head (calm-spec 2.4) and the energy loss (calm-spec 2.5).

The head is the reference ``MLPGenerator``, built from Megatron tensor-parallel linears in
column -> row pairs (norms replicated), so its math is the same at every TP size:

    eps ~ U(-0.5, 0.5)^noise_size
    e = LN(W_n eps),  c = LN(W_h h)                      (c is shared by every block)
    block:  u = SiLU(Lin_{d->d}(SiLU(Lin_{2d->d}([LN(e); c]))))
            g, v = Lin_{d->2d}(u).split(d);  e <- e + Lin_{d->d}(SiLU(g) * v)
    z = Lin_{d->l}(SiLU(Lin_{d->d}(LN(e))))               (last Linear: weight and bias start at 0)

The reference's Lin_{d->2d} is held as two column-parallel d->d linears (``gate``: its first d
outputs, ``value``: the last d), so that a TP shard holds matching gate and value columns; the
function and the parameter count are unchanged. All linears have biases; LayerNorm eps is 1e-6.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, copy_to_tensor_model_parallel_region
from megatron.core.utils import init_method_normal
from torch import nn
from torch.utils.checkpoint import checkpoint

from calm_megatron.config import ModelConfig
from calm_megatron.models.backbone import without_sequence_parallel

HEAD_NORM_EPS = 1e-6
# Elements of the largest [N, M, positions, l] difference tensor the loss builds at once (fp32).
LOSS_CHUNK_ELEMENTS = 1 << 25


class _Linears:
    """Builders of the head's TP linears with the config's init (N(0, init_std), zero bias)."""

    def __init__(self, config: ModelParallelConfig, init_std: float):
        self.config, self.init = config, init_method_normal(init_std)

    def column(self, n_in: int, n_out: int, gather_output: bool = False) -> ColumnParallelLinear:
        return ColumnParallelLinear(n_in, n_out, config=self.config, init_method=self.init, bias=True,
                                    gather_output=gather_output)

    def row(self, n_in: int, n_out: int, init=None) -> RowParallelLinear:
        return RowParallelLinear(n_in, n_out, config=self.config, init_method=init or self.init, bias=True,
                                 input_is_parallel=True, skip_bias_add=False)

    def norm(self, size: int) -> nn.LayerNorm:
        return nn.LayerNorm(size, eps=HEAD_NORM_EPS, dtype=self.config.params_dtype)


class EnergyBlock(nn.Module):
    """One residual block: fuse [LN(e); c] through two linears, then a SwiGLU update of e."""

    def __init__(self, d: int, linears: _Linears):
        super().__init__()
        self.norm = linears.norm(d)
        self.fuse_in = linears.column(2 * d, d)  # Lin_{2d->d}, output split over TP
        self.fuse_out = linears.row(d, d)  # Lin_{d->d}, all-reduced
        self.gate = linears.column(d, d)  # Lin_{d->2d}[:d]
        self.value = linears.column(d, d)  # Lin_{d->2d}[d:]
        self.out = linears.row(d, d)  # Lin_{d->d}

    def condition(self, c: torch.Tensor) -> torch.Tensor:
        """The c half of ``fuse_in`` plus its bias, ``[..., d/tp]``: once per position, shared by its samples."""
        d = c.size(-1)
        c = copy_to_tensor_model_parallel_region(c)  # the input-gradient all-reduce ColumnParallelLinear does
        return F.linear(c, self.fuse_in.weight[:, d:], self.fuse_in.bias)

    def forward(self, e: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """e ``[samples, rows, d]`` and this block's :meth:`condition` ``[1 or samples, rows, d/tp]``.

        Equal to the reference ``fuse_in([LN(e); c])``: the weight's columns split at d, so that the
        condition's product is not repeated for every sample.
        """
        x = copy_to_tensor_model_parallel_region(self.norm(e))
        u = F.silu(F.linear(x, self.fuse_in.weight[:, :e.size(-1)]) + condition)
        u = F.silu(self.fuse_out(u)[0])
        return e + self.out(F.silu(self.gate(u)[0]) * self.value(u)[0])[0]


class EnergyHead(nn.Module):
    """The generator z = G(h, eps): maps a backbone state and uniform noise to one latent sample."""

    def __init__(self, cfg: ModelConfig, config: ModelParallelConfig):
        super().__init__()
        d, self.noise_size, self.latent_size = cfg.hidden_size, cfg.noise_size, cfg.latent_size
        linears = _Linears(without_sequence_parallel(config), cfg.init_std)  # the head sees whole sequences
        self.noise_proj = linears.column(cfg.noise_size, d, gather_output=True)  # W_n
        self.noise_norm = linears.norm(d)
        self.hidden_proj = linears.column(d, d, gather_output=True)  # W_h
        self.hidden_norm = linears.norm(d)
        self.blocks = nn.ModuleList(EnergyBlock(d, linears) for _ in range(cfg.head_blocks))
        self.final_norm = linears.norm(d)
        self.final_fc1 = linears.column(d, d)
        self.final_fc2 = linears.row(d, cfg.latent_size, init=nn.init.zeros_)  # zero-initialised
        # With full recompute the N-fold head activations are recomputed per block in backward too.
        self.recompute_blocks = getattr(config, "recompute_granularity", None) == "full"

    def condition(self, h: torch.Tensor) -> torch.Tensor:
        """c = LN(W_h h), computed once per position and shared by all its samples."""
        rows = h.reshape(-1, h.size(-1))  # Megatron linears want 2-D (or 3-D) inputs
        return self.hidden_norm(self.hidden_proj(rows)[0]).view(*h.shape[:-1], -1)

    def draw_noise(self, shape, device, dtype, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """eps ~ U(-0.5, 0.5) of shape ``[*shape, noise_size]``."""
        return torch.rand(*shape, self.noise_size, device=device, dtype=dtype, generator=generator) - 0.5

    def generate(self, c: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Latents ``[S, ..., l]`` from conditions ``c [1 or S, ..., d]`` and noise ``[S, ..., noise_size]``.

        ``c`` broadcasts over the leading (sample) dim: each block's condition product is computed
        once per position, not once per sample.
        """
        lead = noise.shape[:-1]
        samples, rows = lead[0], noise[0].numel() // noise.size(-1)
        c = c.expand(c.size(0), *lead[1:], c.size(-1)).reshape(c.size(0), rows, c.size(-1))
        e = self.noise_norm(self.noise_proj(noise.reshape(samples * rows, -1).to(c.dtype))[0])
        e = e.view(samples, rows, -1)
        for block in self.blocks:
            condition = block.condition(c)
            if self.recompute_blocks and self.training and torch.is_grad_enabled():
                e = checkpoint(block, e, condition, use_reentrant=False)
            else:
                e = block(e, condition)
        z = self.final_fc2(F.silu(self.final_fc1(self.final_norm(e))[0]))[0]
        return z.view(*lead, self.latent_size)

    def forward(self, h: torch.Tensor, num_samples: int, noise: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``num_samples`` latents per position: h ``[..., d]`` -> ``[num_samples, ..., l]``.

        Each sample gets its own noise (``noise`` ``[num_samples, ..., noise_size]`` when given, else
        fresh from ``generator``/the default generator, which every TP rank must share).
        """
        if noise is None:
            noise = self.draw_noise((num_samples, *h.shape[:-1]), h.device, h.dtype, generator)
        elif noise.shape != (num_samples, *h.shape[:-1], self.noise_size):
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected "
                             f"{(num_samples, *h.shape[:-1], self.noise_size)}")
        return self.generate(self.condition(h).unsqueeze(0), noise)


def count_head_parameters(cfg: ModelConfig) -> int:
    """Closed-form parameter count of the energy head."""
    d, noise, latent = cfg.hidden_size, cfg.noise_size, cfg.latent_size
    inputs = (noise * d + d) + (d * d + d) + 2 * (2 * d)  # W_n, W_h and their LayerNorms
    block = 2 * d + (2 * d * d + d) + (d * d + d) + (2 * d * d + 2 * d) + (d * d + d)
    final = 2 * d + (d * d + d) + (d * latent + latent)
    return inputs + cfg.head_blocks * block + final


# --------------------------------------------------------------------------- energy loss

def _norm_pow(diff: torch.Tensor, alpha: float) -> torch.Tensor:
    """||diff||^alpha over the last dim, with a zero (not NaN) gradient where diff == 0.

    Computed as (sum diff^2)^(alpha/2) with the zero entries routed around the power, so neither
    the sqrt nor x^(alpha-1) is evaluated at 0 (at init all samples coincide).
    """
    squared = diff.pow(2).sum(-1)
    positive = squared > 0
    safe = torch.where(positive, squared, torch.ones_like(squared))
    return torch.where(positive, safe.pow(alpha / 2), torch.zeros_like(squared))


def _energy_terms(samples: torch.Tensor, targets: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-position loss of samples ``[N, c, l]`` against targets ``[M, c, l]`` -> ``[c]``."""
    n = samples.size(0)
    to_targets = _norm_pow(samples.unsqueeze(1) - targets.unsqueeze(0), alpha)  # [N, M, c]
    between = _norm_pow(samples.unsqueeze(1) - samples.unsqueeze(0), alpha)  # [N, N, c], 0 on diagonal
    return 2.0 * to_targets.mean(dim=(0, 1)) - between.sum(dim=(0, 1)) / (n * (n - 1))


def draw_targets(mu: torch.Tensor, log_sigma: Optional[torch.Tensor], num_targets: int,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``num_targets`` posterior draws z ~ N(mu, exp(log_sigma)^2): ``[M, P, l]`` in fp32."""
    mu = mu.float()
    if log_sigma is None:  # a deterministic autoencoder: every target is mu
        return mu.unsqueeze(0).expand(num_targets, *mu.shape)
    eps = torch.randn(num_targets, *mu.shape, device=mu.device, dtype=torch.float32, generator=generator)
    return mu + log_sigma.float().exp() * eps


def energy_loss(samples: torch.Tensor, mu: torch.Tensor, log_sigma: Optional[torch.Tensor],
                num_targets: int, alpha: float = 1.0, generator: Optional[torch.Generator] = None,
                targets: Optional[torch.Tensor] = None,
                chunk_elements: int = LOSS_CHUNK_ELEMENTS) -> torch.Tensor:
    """The energy-score loss per position (calm-spec 2.5), in fp32: samples ``[N, P, l]`` -> ``[P]``.

    L_i = 2/(N M) sum_{n,m} ||z_m - z~_n||^a - 1/(N(N-1)) sum_{n!=k} ||z~_n - z~_k||^a, with targets
    z_m ~ N(mu_i, sigma_i^2) drawn fresh (or ``targets`` ``[M, P, l]``). Positions are processed in
    chunks of about ``chunk_elements`` difference entries; under autograd each chunk is recomputed in
    backward, so memory stays at one chunk however long the context is. ``log_sigma=None`` means a
    deterministic autoencoder (every target is mu).
    """
    n, positions, latent = samples.shape
    if n < 2:
        raise ValueError(f"the energy loss needs at least 2 samples per position, got N={n}")
    if mu.shape != (positions, latent):
        raise ValueError(f"mu has shape {tuple(mu.shape)}, expected {(positions, latent)}")
    if targets is not None and targets.shape[1:] != (positions, latent):
        raise ValueError(f"targets have shape {tuple(targets.shape)}, expected [M, {positions}, {latent}]")
    m = targets.size(0) if targets is not None else num_targets
    chunk = max(1, chunk_elements // (n * max(m, n) * latent))
    samples = samples.float()
    recompute = torch.is_grad_enabled() and samples.requires_grad
    losses = []
    for start in range(0, positions, chunk):
        stop = min(start + chunk, positions)
        if targets is not None:
            chunk_targets = targets[:, start:stop].float()
        else:
            sigma_chunk = None if log_sigma is None else log_sigma[start:stop]
            chunk_targets = draw_targets(mu[start:stop], sigma_chunk, num_targets, generator)
        chunk_samples = samples[:, start:stop]
        if recompute:
            losses.append(checkpoint(_energy_terms, chunk_samples, chunk_targets, alpha, use_reentrant=False))
        else:
            losses.append(_energy_terms(chunk_samples, chunk_targets, alpha))
    return torch.cat(losses)


# --------------------------------------------------------------------------- layout-independent randomness

_MASK64 = (1 << 64) - 1


def stream_seed(sample_seed: int, stream: int) -> int:
    """A generator seed for random stream ``stream`` of one sample (splitmix64 of the pair)."""
    x = (int(sample_seed) * 0x9E3779B97F4A7C15 + (int(stream) + 1) * 0xD1B54A32D192ED03) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) & ((1 << 63) - 1)


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def seeded_noise(sample_seeds, num_samples: int, steps: int, noise_size: int, device, dtype) -> torch.Tensor:
    """The head's U(-0.5, 0.5) noise ``[num_samples, B, steps, noise_size]``, a function of each sample's seed.

    Sample b's noise comes from its own generator (stream 0 of ``sample_seeds[b]``), so it is the same
    whatever micro-batch, data-parallel rank or pipeline stage the sample lands on.
    """
    device = torch.device(device)
    per_sample = [torch.rand(num_samples, steps, noise_size, device=device, dtype=torch.float32,
                             generator=_generator(device, stream_seed(seed, 0))) - 0.5
                  for seed in sample_seeds]
    return torch.stack(per_sample, dim=1).to(dtype)


def loss_block(num_samples: int, num_targets: int, latent_size: int,
               chunk_elements: int = LOSS_CHUNK_ELEMENTS) -> int:
    """Positions per unit of :func:`seeded_energy_loss` (one chunk of :func:`energy_loss`)."""
    return max(1, chunk_elements // (num_samples * max(num_targets, num_samples) * latent_size))


def seeded_energy_loss(samples: torch.Tensor, mu: torch.Tensor, log_sigma: Optional[torch.Tensor], sample_seeds,
                       num_targets: int, alpha: float = 1.0,
                       chunk_elements: int = LOSS_CHUNK_ELEMENTS) -> torch.Tensor:
    """:func:`energy_loss` per position ``[B, S]`` of samples ``[N, B, S, l]``, split over tensor-parallel ranks.

    The positions are cut into units (one sample, one block of :func:`loss_block` positions); unit
    (b, k) draws its posterior targets from stream 1+k of ``sample_seeds[b]``, so the draws do not
    depend on the layout. Each unit is computed by one TP rank only (round robin) and the result is
    all-reduced: the loss is computed once per position, not once per TP rank. The samples enter
    through ``copy_to_tensor_model_parallel_region``, whose backward sums the per-rank gradients, so
    every rank ends with the full gradient of the samples.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import (
        copy_to_tensor_model_parallel_region,
        reduce_from_tensor_model_parallel_region,
    )

    n, batch, steps, latent = samples.shape
    if len(sample_seeds) != batch:
        raise ValueError(f"{len(sample_seeds)} sample seeds for a batch of {batch}")
    tp = parallel_state.get_tensor_model_parallel_world_size() if parallel_state.model_parallel_is_initialized() else 1
    rank = parallel_state.get_tensor_model_parallel_rank() if tp > 1 else 0
    if tp > 1:
        samples = copy_to_tensor_model_parallel_region(samples)
    block = loss_block(n, num_targets, latent, chunk_elements)
    rows, unit = [], 0
    for b, seed in enumerate(sample_seeds):
        pieces = []
        for start in range(0, steps, block):
            stop = min(start + block, steps)
            if unit % tp == rank:
                sigma = None if log_sigma is None else log_sigma[b, start:stop]
                gen = _generator(samples.device, stream_seed(seed, 1 + start // block))
                pieces.append(energy_loss(samples[:, b, start:stop], mu[b, start:stop], sigma, num_targets, alpha,
                                          generator=gen, chunk_elements=chunk_elements))
            else:  # zero, but on the graph: every rank's backward must reach the gradient all-reduce
                pieces.append(samples[:, b, start:stop].sum(dim=(0, 2)).float() * 0.0)
            unit += 1
        rows.append(torch.cat(pieces))
    per_position = torch.stack(rows)
    return reduce_from_tensor_model_parallel_region(per_position) if tp > 1 else per_position
