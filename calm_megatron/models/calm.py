"""CALM: a Transformer over chunks of K tokens that predicts the next chunk's latent (calm-spec 2).

    tokens [B, T] -> chunks [B, L, K] (L = T / K)
    inputs  = chunks 0..L-2: CALM's own embedding of the K tokens -> concat K*d
              -> Linear(K*d, 2d) -> SiLU -> Linear(2d, d) -> LayerNorm            (calm-spec 2.2)
              -> backbone, RoPE position = chunk index                            (calm-spec 2.3)
    h_i  -> energy head, N samples per position (fresh noise each)               (calm-spec 2.4)
    targets = chunks 1..L-1 through the FROZEN autoencoder's encoder (no grad, eval mode)
              -> M draws from N(mu, sigma^2) -> energy loss, mean over positions  (calm-spec 2.5)

Layout: the backbone runs in Megatron's ``[chunks, batch, d]``; everything this module returns is
batch-first (``h [B, L-1, d]``, ``samples [N, B, L-1, l]``, ``per_position_loss [B, L-1]``).

Pipeline parallelism: the embedding and input compression live on the first stage, the head and
the frozen autoencoder on the last; on other stages ``forward`` returns the backbone's output
tensor for the schedule to send on.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import init_method_normal
from torch import nn

from calm_megatron.config import AutoencoderConfig, ModelConfig, ParallelConfig, autoencoder_mismatches
from calm_megatron.models.autoencoder import Autoencoder
from calm_megatron.models.backbone import (
    build_backbone,
    count_backbone_parameters,
    no_weight_decay,
    transformer_config,
    vocab_embedding,
    without_sequence_parallel,
)
from calm_megatron.models.energy_head import (
    EnergyHead,
    count_head_parameters,
    energy_loss,
    seeded_energy_loss,
    seeded_noise,
)

__all__ = ["CALM", "CALMOutput", "build_calm", "check_autoencoder_compatible", "count_parameters_calm",
           "no_weight_decay"]

COMPRESSION_NORM_EPS = 1e-6


@dataclass
class CALMOutput:
    """What :meth:`CALM.forward` returns on the last pipeline stage."""
    loss: torch.Tensor  # scalar: mean energy loss over all B * (L-1) positions (fp32)
    per_position_loss: torch.Tensor  # [B, L-1] (fp32)
    samples: torch.Tensor  # [N, B, L-1, l]: the head samples the loss used (BrierLM takes the first 2)


class InputCompression(nn.Module):
    """K token embeddings -> one d-wide backbone input: Linear(K*d, 2d) -> SiLU -> Linear(2d, d) -> LN."""

    def __init__(self, cfg: ModelConfig, config):
        super().__init__()
        d, init = cfg.hidden_size, init_method_normal(cfg.init_std)
        config = without_sequence_parallel(config)
        self.fc1 = tensor_parallel.ColumnParallelLinear(cfg.chunk_size * d, 2 * d, config=config, init_method=init,
                                                        bias=True, gather_output=False)
        self.fc2 = tensor_parallel.RowParallelLinear(2 * d, d, config=config, init_method=init, bias=True,
                                                     input_is_parallel=True, skip_bias_add=False)
        self.norm = nn.LayerNorm(d, eps=COMPRESSION_NORM_EPS, dtype=config.params_dtype)

    def forward(self, embedded_chunks: torch.Tensor) -> torch.Tensor:
        """``[rows, K*d]`` -> ``[rows, d]``."""
        return self.norm(self.fc2(F.silu(self.fc1(embedded_chunks)[0]))[0])


def check_autoencoder_compatible(model_cfg: ModelConfig, ae_cfg: AutoencoderConfig) -> None:
    """Raise ValueError when the frozen autoencoder does not fit the CALM (K, latent size, vocab)."""
    problems = autoencoder_mismatches(model_cfg, vars(ae_cfg), "autoencoder.")
    if problems:
        raise ValueError("the autoencoder does not match the CALM config: " + "; ".join(problems))


class CALM(MegatronModule):
    """The continuous autoregressive LM with an energy head and a frozen autoencoder. See module doc."""

    def __init__(self, cfg: ModelConfig, autoencoder: Optional[Autoencoder], config, pre_process: bool = True,
                 post_process: bool = True):
        super().__init__(config=config)
        self.model_cfg = cfg
        self.model_type = ModelType.encoder_or_decoder  # what Megatron's pipeline schedules look for
        self.pre_process, self.post_process = pre_process, post_process
        self.chunk_size = cfg.chunk_size
        if pre_process:
            self.embedding = vocab_embedding(cfg.vocab_size, cfg.hidden_size, config, cfg.init_std)
            self.input_compression = InputCompression(cfg, config)
        self.backbone = build_backbone(config, cfg.rope_theta, pre_process, post_process)
        if post_process:
            if autoencoder is None:
                raise ValueError("the last pipeline stage of a CALM needs the frozen autoencoder")
            check_autoencoder_compatible(cfg, autoencoder.ae_config)
            self.head = EnergyHead(cfg, config)
            autoencoder.requires_grad_(False)
            self.autoencoder = autoencoder.eval()

    # ----------------------------------------------------------- frozen autoencoder

    def train(self, mode: bool = True) -> "CALM":
        """Set train/eval mode; the frozen autoencoder always stays in eval mode."""
        super().train(mode)
        if self.post_process:
            self.autoencoder.eval()
        return self

    def trainable_named_parameters(self) -> Iterator[Tuple[str, nn.Parameter]]:
        """(name, parameter) of everything the optimizer updates: all but the frozen autoencoder."""
        return ((name, p) for name, p in self.named_parameters()
                if p.requires_grad and not name.startswith("autoencoder."))

    def trainable_parameters(self) -> List[nn.Parameter]:
        """The parameters the optimizer updates (the frozen autoencoder's are not among them)."""
        return [p for _, p in self.trainable_named_parameters()]

    @torch.no_grad()
    def posterior(self, target_chunks: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(mu, log_sigma) of the frozen encoder for chunks ``[..., K]``; log_sigma is None if not variational."""
        mu, log_sigma = self.autoencoder.encode(target_chunks)
        return mu, (log_sigma if self.autoencoder.ae_config.variational else None)

    # ----------------------------------------------------------- backbone

    def set_input_tensor(self, input_tensor) -> None:
        """Pipeline schedules hand the previous stage's output here."""
        self.backbone.set_input_tensor(input_tensor)

    def _chunks(self, tokens: torch.Tensor, min_chunks: int = 2) -> torch.Tensor:
        batch, length = tokens.shape
        if length % self.chunk_size or length < min_chunks * self.chunk_size:
            raise ValueError(f"CALM needs a token count that is a multiple of K={self.chunk_size} and at "
                             f"least {min_chunks} chunk(s), got {length}")
        return tokens.view(batch, length // self.chunk_size, self.chunk_size)

    def embed_chunks(self, chunks: torch.Tensor) -> torch.Tensor:
        """Chunks ``[B, S, K]`` -> backbone inputs ``[S, B, d]``."""
        batch, steps, k = chunks.shape
        embedded = self.embedding(chunks.transpose(0, 1).reshape(steps * batch, k))  # [S*B, K, d]
        return self.input_compression(embedded.reshape(steps * batch, -1)).view(steps, batch, -1)

    def _run_backbone(self, chunks: torch.Tensor) -> torch.Tensor:
        """Backbone over chunks ``[B, S, K]`` (embedded on the first stage): ``[S, B, d]`` on the last."""
        hidden = self.embed_chunks(chunks) if self.pre_process else None
        return self.backbone(hidden, seq_len=chunks.size(1))

    def hidden_states(self, tokens: torch.Tensor, include_last_chunk: bool = False) -> torch.Tensor:
        """Backbone outputs ``[B, L-1, d]`` for chunks 0..L-2 of tokens ``[B, T]`` (pp=1).

        Output i has seen chunks <= i and predicts chunk i+1. ``include_last_chunk=True`` also runs
        chunk L-1 (``[B, L, d]``), whose output predicts the chunk after the input (generation).
        """
        chunks = self._chunks(tokens, min_chunks=1 if include_last_chunk else 2)
        inputs = chunks if include_last_chunk else chunks[:, :-1]
        return self._run_backbone(inputs).transpose(0, 1)

    # ----------------------------------------------------------- head

    def sample_latents(self, h: torch.Tensor, num_samples: int, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``num_samples`` head samples per position: h ``[..., d]`` -> z ``[num_samples, ..., l]``."""
        return self.head(h, num_samples, noise)

    @torch.no_grad()
    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Latents ``[..., l]`` -> token ids ``[..., K]`` (frozen AE decoder, argmax over the full vocab)."""
        return self.autoencoder.predict(self.autoencoder.decode(z))

    @torch.no_grad()
    def sample_chunks(self, h: torch.Tensor, num_samples: int, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Sampled next chunks ``[num_samples, ..., K]`` (LongTensor) for states h ``[..., d]``."""
        return self.decode_latents(self.sample_latents(h, num_samples, noise))

    # ----------------------------------------------------------- training forward

    def forward(self, tokens: torch.Tensor, noise: Optional[torch.Tensor] = None,
                sample_seeds: Optional[Sequence[int]] = None):
        """Energy loss of tokens ``[B, T]`` (T = L*K): predict chunks 1..L-1 from chunks before them.

        ``noise`` ``[N, B, L-1, noise_size]`` fixes the head's noise (else fresh U(-0.5, 0.5), from the
        default generator that all TP ranks share). ``sample_seeds`` (one int per sample) instead makes
        the head noise and the posterior draws functions of each sample's seed (the same at every
        TP/PP/DP layout) and splits the energy loss over TP ranks (see ``seeded_energy_loss``).
        Returns :class:`CALMOutput` on the last pipeline stage and the backbone output ``[s, B, d]``
        on the others.
        """
        chunks = self._chunks(tokens)
        h = self._run_backbone(chunks[:, :-1])
        if not self.post_process:
            return h
        h = h.transpose(0, 1)  # [B, L-1, d]
        batch, steps = h.shape[:2]
        cfg = self.model_cfg
        if sample_seeds is not None and noise is None:
            noise = seeded_noise(sample_seeds, cfg.num_samples, steps, cfg.noise_size, h.device, h.dtype)
        samples = self.head(h, cfg.num_samples, noise)  # [N, B, L-1, l]
        mu, log_sigma = self.posterior(chunks[:, 1:])  # [B, L-1, l]
        if sample_seeds is not None:
            per_position = seeded_energy_loss(samples, mu, log_sigma, sample_seeds, cfg.num_targets, cfg.energy_alpha)
            return CALMOutput(loss=per_position.mean(), per_position_loss=per_position, samples=samples)
        flat_sigma = None if log_sigma is None else log_sigma.reshape(batch * steps, -1)
        per_position = energy_loss(samples.reshape(samples.size(0), batch * steps, -1),
                                   mu.reshape(batch * steps, -1), flat_sigma,
                                   self.model_cfg.num_targets, self.model_cfg.energy_alpha)
        per_position = per_position.view(batch, steps)
        return CALMOutput(loss=per_position.mean(), per_position_loss=per_position, samples=samples)


def build_calm(cfg: ModelConfig, autoencoder: Autoencoder, precision: str = "fp32", *,
               parallel: Optional[ParallelConfig] = None, perform_initialization: bool = True) -> CALM:
    """Build this rank's CALM around a (trained) autoencoder, which is frozen and kept in eval mode.

    TP/PP sizes come from Megatron's parallel state; ``parallel`` adds sequence parallelism and the
    recompute policy. The autoencoder becomes the ``autoencoder`` submodule on the last pipeline
    stage (its weights are saved in every CALM checkpoint) and is dropped on the others.
    """
    check_autoencoder_compatible(cfg, autoencoder.ae_config)
    parallel = parallel or ParallelConfig()
    config = transformer_config(cfg, precision, sequence_parallel=parallel.sequence_parallel,
                                recompute=parallel.recompute, perform_initialization=perform_initialization)
    pre, post = parallel_state.is_pipeline_first_stage(), parallel_state.is_pipeline_last_stage()
    return CALM(cfg, autoencoder if post else None, config, pre_process=pre, post_process=post)


class CALMParameterCount(NamedTuple):
    """Closed-form parameter counts of a CALM at TP=1 (the frozen autoencoder excluded)."""
    total_excluding_autoencoder: int
    embedding: int
    input_compression: int
    backbone: int
    head: int


def count_parameters_calm(cfg: ModelConfig) -> CALMParameterCount:
    """Parameter count of the CALM ``cfg`` describes, without its autoencoder (as the paper counts)."""
    d, k = cfg.hidden_size, cfg.chunk_size
    embedding = cfg.vocab_size * d
    compression = (k * d * 2 * d + 2 * d) + (2 * d * d + d) + 2 * d
    backbone = count_backbone_parameters(cfg)
    head = count_head_parameters(cfg)
    return CALMParameterCount(embedding + compression + backbone + head, embedding, compression, backbone, head)
