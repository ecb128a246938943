"""The chunk autoencoder of calm-spec section 1, built from Megatron-Core tensor-parallel layers.

K tokens <-> one latent vector z in R^l. Context-free: every chunk is encoded on its own, there is
no attention. Layout (the reference code, exactly):

    encoder: E[tokens] -> AELayer x n/2 (per token) -> flatten K*d -> squeeze Linear(K*d, d)
             -> AELayer x n/2 -> RMSNorm -> hidden_to_latent Linear(d, 2l) = [mu, log_sigma]
    decoder: latent_to_hidden Linear(l, d) -> AELayer x n/2 -> expand Linear(d, K*d)
             -> K token states -> AELayer x n/2 -> RMSNorm -> logits = h . E^T (E tied)

AELayer = x + SwiGLU-MLP(RMSNorm(x)); the MLP has separate gate/up (column parallel) and down
(row parallel) projections without bias. The embedding E is vocab-parallel and doubles as the
output projection, like Megatron's ``parallel_lm_logits``; the loss is ``vocab_parallel_cross_entropy``.

Posterior sampling. ``forward`` always samples z = mu + sigma * eps (train and eval alike), so the
eval loss estimates the same objective as the training loss, minus the robustness tricks;
DropToken and DropLatent run only in training mode (calm-spec 1.3). Deterministic decoding, z = mu,
is what ``reconstruct`` does (held-out reconstruction accuracy; the CALM stage uses
``encode``/``decode`` directly and samples its own targets from N(mu, sigma^2)).

Vocabulary padding: Megatron splits the vocabulary evenly over TP ranks, so a vocabulary that TP
does not divide (128257 at TP=2) is padded to a multiple of TP. The padded rows are zero, never
looked up, and their logits are -inf, so the loss, the argmax and the gradients equal the
unpadded model's; at TP=1 nothing is padded.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from calm_megatron.config import AutoencoderConfig

_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


# --------------------------------------------------------------------------- Megatron plumbing

def megatron_parallel_config(precision: str = "fp32", tp: Optional[int] = None,
                             use_cpu_initialization: Optional[bool] = None,
                             perform_initialization: bool = True):
    """A Megatron-Core ``ModelParallelConfig`` for tensor-parallel layers.

    ``tp`` defaults to the initialised parallel state; ``use_cpu_initialization`` defaults to
    "no CUDA". CPU initialisation draws the full master weight from the default torch generator on
    every rank and keeps this rank's slice, so the same seed gives the same full weights at any TP
    size. Sequence parallelism is off: the autoencoder's activations are per chunk and small.
    """
    from megatron.core import parallel_state
    from megatron.core.model_parallel_config import ModelParallelConfig

    if precision not in _PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {', '.join(_PRECISIONS)}")
    if tp is None:
        tp = parallel_state.get_tensor_model_parallel_world_size()
    if use_cpu_initialization is None:
        use_cpu_initialization = not torch.cuda.is_available()
    return ModelParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=False,
                               use_cpu_initialization=use_cpu_initialization,
                               perform_initialization=perform_initialization,
                               params_dtype=_PRECISIONS[precision], bf16=precision == "bf16",
                               gradient_accumulation_fusion=False)


def _normal_init(std: float) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda weight: nn.init.normal_(weight, mean=0.0, std=std)


def _embedding_init(std: float, vocab_size: int) -> Callable[[torch.Tensor], None]:
    """N(0, std) on the real rows, zeros on the TP padding (so padding never changes real weights)."""
    def init(weight: torch.Tensor) -> None:
        nn.init.normal_(weight[:vocab_size], mean=0.0, std=std)
        nn.init.zeros_(weight[vocab_size:])
    return init


def _replicated_linear(in_features: int, out_features: int, std: float, initialize: bool) -> nn.Linear:
    """A plain nn.Linear with bias, identical on every TP rank (same seed, same draws)."""
    layer = nn.Linear(in_features, out_features, bias=True)
    if initialize:
        with torch.no_grad():
            nn.init.normal_(layer.weight, mean=0.0, std=std)
            layer.bias.zero_()
    return layer


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """The vocabulary rounded up to a multiple of the TP size (Megatron splits it evenly)."""
    return -(-vocab_size // tp) * tp


def _tp_group():
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


def vocab_parallel_argmax(logits: torch.Tensor, vocab_start: int) -> torch.Tensor:
    """Global argmax over the full vocabulary from this rank's logits shard [..., V/tp].

    Local max and index, then an all-gather over the TP group; ties go to the lowest global id,
    exactly like ``torch.argmax`` over the unsharded logits.
    """
    local_max, local_idx = logits.max(dim=-1)
    local_idx = local_idx + vocab_start
    group = _tp_group()
    tp = dist.get_world_size(group)
    if tp == 1:
        return local_idx
    maxes = [torch.empty_like(local_max) for _ in range(tp)]
    idxs = [torch.empty_like(local_idx) for _ in range(tp)]
    dist.all_gather(maxes, local_max.contiguous(), group=group)
    dist.all_gather(idxs, local_idx.contiguous(), group=group)
    best_rank = torch.stack(maxes).argmax(dim=0, keepdim=True)  # first max: lowest rank, lowest id
    return torch.stack(idxs).gather(0, best_rank).squeeze(0)


# --------------------------------------------------------------------------- layers

class RMSNorm(nn.Module):
    """Llama RMSNorm: normalise in fp32, scale in the input dtype (weights start at one)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class SwiGLUMLP(nn.Module):
    """LlamaMLP, tensor parallel: down(silu(gate(x)) * up(x)); gate/up column-, down row-parallel."""

    def __init__(self, hidden: int, intermediate: int, std: float, mp_config):
        super().__init__()
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        group = _tp_group()
        column = dict(config=mp_config, init_method=_normal_init(std), bias=False, gather_output=False,
                      tp_group=group)
        self.gate_proj = ColumnParallelLinear(hidden, intermediate, **column)
        self.up_proj = ColumnParallelLinear(hidden, intermediate, **column)
        self.down_proj = RowParallelLinear(intermediate, hidden, config=mp_config, init_method=_normal_init(std),
                                           bias=False, input_is_parallel=True, skip_bias_add=False,
                                           tp_group=group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, hidden] (Megatron's weight-gradient path wants 2-D or 3-D inputs)."""
        gate, _ = self.gate_proj(x)
        up, _ = self.up_proj(x)
        out, _ = self.down_proj(F.silu(gate) * up)
        return out


class AELayer(nn.Module):
    """x + SwiGLU-MLP(RMSNorm(x)), applied to every position independently."""

    def __init__(self, cfg: AutoencoderConfig, mp_config):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLUMLP(cfg.hidden_size, cfg.intermediate_size, cfg.init_std, mp_config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


def _layer_stack(cfg: AutoencoderConfig, count: int, mp_config) -> nn.ModuleList:
    return nn.ModuleList(AELayer(cfg, mp_config) for _ in range(count))


def _run(layers: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    for layer in layers:
        x = layer(x)
    return x


class AEEncoder(nn.Module):
    """Token chunks [N, K] -> [N, 2l] = [mu, log_sigma]. Owns the (tied) vocab-parallel embedding."""

    def __init__(self, cfg: AutoencoderConfig, mp_config, padded_vocab: int, initialize: bool):
        super().__init__()
        from megatron.core.tensor_parallel import VocabParallelEmbedding

        d, K, std = cfg.hidden_size, cfg.chunk_size, cfg.init_std
        self.embed_tokens = VocabParallelEmbedding(padded_vocab, d, config=mp_config, tp_group=_tp_group(),
                                                   init_method=_embedding_init(std, cfg.vocab_size))
        self.layers_before_squeeze = _layer_stack(cfg, cfg.num_encoder_layers // 2, mp_config)
        # The squeeze/latent linears are small: replicated on every TP rank, not sharded.
        self.squeeze = _replicated_linear(K * d, d, std, initialize)
        self.layers_after_squeeze = _layer_stack(cfg, cfg.num_encoder_layers // 2, mp_config)
        self.norm = RMSNorm(d, cfg.rms_norm_eps)
        self.hidden_to_latent = _replicated_linear(d, 2 * cfg.latent_size, std, initialize)

    def forward(self, chunks: torch.Tensor) -> torch.Tensor:
        n, k = chunks.shape
        h = self.embed_tokens(chunks).reshape(n * k, -1)
        h = _run(self.layers_before_squeeze, h).reshape(n, -1)
        h = _run(self.layers_after_squeeze, self.squeeze(h))
        return self.hidden_to_latent(self.norm(h))


class AEDecoder(nn.Module):
    """Latents [N, l] -> token states [N*K, d] (the tied output projection lives in Autoencoder)."""

    def __init__(self, cfg: AutoencoderConfig, mp_config, initialize: bool):
        super().__init__()
        d, K, std = cfg.hidden_size, cfg.chunk_size, cfg.init_std
        # The latent/expand linears are small: replicated on every TP rank, not sharded.
        self.latent_to_hidden = _replicated_linear(cfg.latent_size, d, std, initialize)
        self.layers_before_expand = _layer_stack(cfg, cfg.num_decoder_layers // 2, mp_config)
        self.expand = _replicated_linear(d, K * d, std, initialize)
        self.layers_after_expand = _layer_stack(cfg, cfg.num_decoder_layers // 2, mp_config)
        self.norm = RMSNorm(d, cfg.rms_norm_eps)
        self.chunk_size, self.hidden_size = K, d

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = _run(self.layers_before_expand, self.latent_to_hidden(z))
        h = self.expand(h).reshape(-1, self.hidden_size)
        return self.norm(_run(self.layers_after_expand, h))


# --------------------------------------------------------------------------- the model

@dataclass
class AEOutput:
    """What one forward returns. Losses are scalars, identical on all TP ranks."""
    loss: torch.Tensor  # recon_loss + kl_weight * kl_loss (recon only if not variational)
    recon_loss: torch.Tensor  # CE averaged over tokens, times K (= per-chunk sum, averaged)
    kl_loss: torch.Tensor  # mean over chunks of sum_i clamp(KL_i, min=kl_clamp)
    logits: Optional[torch.Tensor]  # [B, T, V/tp], this rank's vocab shard (None if not asked)
    mu: torch.Tensor  # [B, T/K, l]
    log_sigma: torch.Tensor  # [B, T/K, l]


class Autoencoder(nn.Module):
    """The CALM chunk VAE (calm-spec 1). Build it with :func:`build_autoencoder`."""

    def __init__(self, cfg: AutoencoderConfig, mp_config):
        super().__init__()
        tp = mp_config.tensor_model_parallel_size
        initialize = mp_config.perform_initialization
        self.ae_config = cfg
        self.config = mp_config  # Megatron convention: modules expose their ModelParallelConfig
        self.encoder = AEEncoder(cfg, mp_config, padded_vocab_size(cfg.vocab_size, tp), initialize)
        self.decoder = AEDecoder(cfg, mp_config, initialize)
        embed = self.encoder.embed_tokens
        self.vocab_start = embed.vocab_start_index
        valid_local = max(0, min(cfg.vocab_size - embed.vocab_start_index, embed.num_embeddings_per_partition))
        self.num_padded_local = embed.num_embeddings_per_partition - valid_local

    # ----------------------------------------------------------- building blocks

    @property
    def output_weight(self) -> torch.Tensor:
        """The output projection: the encoder's input embedding shard itself (tied)."""
        return self.encoder.embed_tokens.weight

    def encode(self, chunks: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Token chunks [..., K] -> (mu, log_sigma), each [..., l]. No dropout of any kind."""
        K, l = self.ae_config.chunk_size, self.ae_config.latent_size
        if chunks.shape[-1] != K:
            raise ValueError(f"encode expects chunks of K={K} tokens, got shape {tuple(chunks.shape)}")
        lead = chunks.shape[:-1]
        latent = self.encoder(chunks.reshape(-1, K))
        mu, log_sigma = latent.split(l, dim=-1)
        return mu.reshape(*lead, l), log_sigma.reshape(*lead, l)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents [..., l] -> logits [..., K, V/tp] (this rank's vocabulary shard)."""
        from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

        lead = z.shape[:-1]
        h = self.decoder(z.reshape(-1, z.shape[-1]).to(self.output_weight.dtype))
        # As Megatron's parallel_lm_logits: h is replicated; its gradient is summed over TP ranks.
        logits = F.linear(copy_to_tensor_model_parallel_region(h, group=_tp_group()), self.output_weight)
        if self.num_padded_local:
            logits = logits.masked_fill(self._padding_mask(logits.device), float("-inf"))
        return logits.reshape(*lead, self.ae_config.chunk_size, -1)

    def _padding_mask(self, device: torch.device) -> torch.Tensor:
        size = self.encoder.embed_tokens.num_embeddings_per_partition
        return torch.arange(size, device=device) >= size - self.num_padded_local

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        """Token ids from logits shards [..., V/tp]: the argmax over the full vocabulary."""
        return vocab_parallel_argmax(logits, self.vocab_start)

    # ----------------------------------------------------------- training-only tricks

    def _drop_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """DropToken: replace a `dropout` fraction of the input ids with mask_token_id."""
        mask = torch.rand(tokens.shape, device=tokens.device) < self.ae_config.dropout
        return tokens.masked_fill(mask, self.ae_config.mask_token_id)

    def _training_tricks_on(self) -> bool:
        return self.training and self.ae_config.dropout > 0

    # ----------------------------------------------------------- forward and friends

    def _chunks(self, tokens: torch.Tensor) -> torch.Tensor:
        B, T = tokens.shape
        K = self.ae_config.chunk_size
        if T % K:
            raise ValueError(f"sequence length {T} is not a multiple of the chunk size K={K}")
        return tokens.reshape(B, T // K, K)

    def sample_latent(self, mu: torch.Tensor, log_sigma: torch.Tensor,
                      noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """z = mu + exp(log_sigma) * eps in fp32; eps ~ N(0, I) unless given (z = mu if not variational)."""
        mu = mu.float()
        if not self.ae_config.variational:
            return mu
        eps = noise.float() if noise is not None else torch.randn_like(mu)
        return mu + torch.exp(log_sigma.float()) * eps

    def kl_loss(self, mu: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
        """mean over chunks of sum_i clamp(0.5 (mu^2 + sigma^2 - 1 - 2 log sigma), min=kl_clamp)."""
        mu, log_sigma = mu.float(), log_sigma.float()
        kl = 0.5 * (mu.pow(2) + torch.exp(2 * log_sigma) - 1 - 2 * log_sigma)
        return kl.clamp(min=self.ae_config.kl_clamp).sum(-1).mean()

    def forward(self, tokens: torch.Tensor, noise: Optional[torch.Tensor] = None,
                return_logits: bool = True) -> AEOutput:
        """Loss of calm-spec 1.2 on tokens [B, T] (T a multiple of K).

        ``noise`` ([B, T/K, l]) fixes eps of the reparameterisation (tests). In training mode the
        input ids get DropToken and z gets DropLatent; the targets are always the unmasked ids.
        ``return_logits=False`` saves one logits-sized copy (the CE works in place on its input).
        """
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        cfg = self.ae_config
        chunks = self._chunks(tokens)
        inputs = self._drop_tokens(chunks) if self._training_tricks_on() else chunks
        mu, log_sigma = self.encode(inputs)
        z = self.sample_latent(mu, log_sigma, noise)
        if self._training_tricks_on():
            z = F.dropout(z, p=cfg.dropout, training=True)
        logits = self.decode(z)  # [B, L, K, V/tp]
        # vocab_parallel_cross_entropy subtracts the max and exponentiates in place on fp32 input.
        ce_input = logits.clone() if (return_logits and logits.dtype == torch.float32) else logits
        recon = vocab_parallel_cross_entropy(ce_input, chunks).mean() * cfg.chunk_size
        kl = self.kl_loss(mu, log_sigma)
        loss = recon + cfg.kl_weight * kl if cfg.variational else recon
        out_logits = logits.reshape(tokens.shape[0], tokens.shape[1], -1) if return_logits else None
        return AEOutput(loss=loss, recon_loss=recon, kl_loss=kl, logits=out_logits, mu=mu, log_sigma=log_sigma)

    @torch.no_grad()
    def reconstruct(self, tokens: torch.Tensor) -> torch.Tensor:
        """Deterministic reconstruction of tokens [B, T]: z = mu, decode, global argmax -> [B, T]."""
        mu, _ = self.encode(self._chunks(tokens))
        return self.predict(self.decode(mu)).reshape(tokens.shape)


# --------------------------------------------------------------------------- public helpers

def build_autoencoder(cfg: AutoencoderConfig, precision: str = "fp32", *,
                      perform_initialization: bool = True) -> Autoencoder:
    """Build the autoencoder on this rank (needs Megatron-Core's parallel state).

    Every linear and the embedding get N(0, init_std), biases zero, norms one (calm-spec 2.6).
    Weights are drawn on the CPU from the default generator in a fixed order, so the same seed
    gives the same full weights at any TP size; move the model to its device afterwards.
    ``perform_initialization=False`` skips the draws (e.g. building on the meta device to count).
    """
    if cfg.num_encoder_layers % 2 or cfg.num_decoder_layers % 2:
        raise ValueError("num_encoder_layers and num_decoder_layers must be even")
    mp_config = megatron_parallel_config(precision, use_cpu_initialization=True,
                                         perform_initialization=perform_initialization)
    model = Autoencoder(cfg, mp_config)
    return model.to(_PRECISIONS[precision])


def count_parameters(cfg: AutoencoderConfig) -> int:
    """Number of parameters of the (TP=1, unpadded) autoencoder, in closed form."""
    V, K, d, f, l = cfg.vocab_size, cfg.chunk_size, cfg.hidden_size, cfg.intermediate_size, cfg.latent_size
    ae_layer = 3 * d * f + d  # gate, up, down (no bias) + RMSNorm
    layers = (cfg.num_encoder_layers + cfg.num_decoder_layers) * ae_layer
    embedding = V * d  # tied: also the output projection
    encoder_linears = (K * d * d + d) + (d * 2 * l + 2 * l)  # squeeze, hidden_to_latent
    decoder_linears = (l * d + d) + (d * K * d + K * d)  # latent_to_hidden, expand
    final_norms = 2 * d
    return embedding + layers + encoder_linears + decoder_linears + final_norms


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """True for parameters excluded from weight decay: biases and norm weights (all 1-D tensors)."""
    return param.ndim < 2 or name.endswith(".bias")
