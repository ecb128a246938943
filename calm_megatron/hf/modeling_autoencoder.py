"""The CALM chunk autoencoder in the reference CALM release's layout (calm-spec section 1).

Shipped next to exported weights and loaded with ``trust_remote_code=True``: imports only torch and
transformers. Parameter names and shapes are those of the reference ``Autoencoder``:

    encoder.embed_tokens, encoder.encoder_layers.{i}.{layernorm, mlp.{gate,up,down}_proj},
    encoder.squeeze_layer, encoder.norm, encoder.hidden_to_latent,
    decoder.latent_to_hidden, decoder.decoder_layers.{i}.*, decoder.expand_layer, decoder.norm,
    decoder.lm_head_weight (the very tensor of encoder.embed_tokens.weight: tied in code)

Layers 0..n/2-1 run on each token before the squeeze (encoder) / after the latent projection
(decoder), the rest after the squeeze / expand. There is no attention: every chunk of K tokens is
encoded on its own.
"""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm
from transformers.utils import ModelOutput

from .configuration_autoencoder import AutoencoderConfig


class AELayer(nn.Module):
    """x + SwiGLU-MLP(RMSNorm(x)), position-wise."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states + self.mlp(self.layernorm(hidden_states))


class Encoder(nn.Module):
    """Token ids [B, T] (T a multiple of K) -> [B, T/K, 2l] = [mean; log_std] of each chunk's latent."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        d, K = config.hidden_size, config.patch_size
        self.patch_size, self.hidden_size = K, d
        self.embed_tokens = nn.Embedding(config.vocab_size, d)
        self.encoder_layers = nn.ModuleList(AELayer(config) for _ in range(config.num_encoder_layers))
        self.squeeze_layer = nn.Linear(K * d, d)
        self.norm = LlamaRMSNorm(d, eps=config.rms_norm_eps)
        self.hidden_to_latent = nn.Linear(d, 2 * config.latent_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        batch, length = input_ids.shape
        if length % self.patch_size:
            raise ValueError(f"the encoder needs a multiple of K={self.patch_size} tokens, got {length}")
        half = len(self.encoder_layers) // 2
        hidden = self.embed_tokens(input_ids)
        for layer in self.encoder_layers[:half]:
            hidden = layer(hidden)
        hidden = self.squeeze_layer(hidden.reshape(batch, length // self.patch_size, self.patch_size * self.hidden_size))
        for layer in self.encoder_layers[half:]:
            hidden = layer(hidden)
        return self.hidden_to_latent(self.norm(hidden))


class Decoder(nn.Module):
    """Latents [..., L, l] -> logits [..., L*K, V] through the tied embedding (``lm_head_weight``)."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        d, K = config.hidden_size, config.patch_size
        self.patch_size, self.hidden_size = K, d
        self.latent_to_hidden = nn.Linear(config.latent_size, d)
        self.decoder_layers = nn.ModuleList(AELayer(config) for _ in range(config.num_decoder_layers))
        self.expand_layer = nn.Linear(d, K * d)
        self.norm = LlamaRMSNorm(d, eps=config.rms_norm_eps)
        self.lm_head_weight = None  # set by Autoencoder to encoder.embed_tokens.weight

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        lead, steps = latents.shape[:-2], latents.shape[-2]
        half = len(self.decoder_layers) // 2
        hidden = self.latent_to_hidden(latents.to(self.latent_to_hidden.weight.dtype))
        for layer in self.decoder_layers[:half]:
            hidden = layer(hidden)
        hidden = self.expand_layer(hidden).reshape(*lead, steps * self.patch_size, self.hidden_size)
        for layer in self.decoder_layers[half:]:
            hidden = layer(hidden)
        return F.linear(self.norm(hidden), self.lm_head_weight)


@dataclass
class AutoencoderOutput(ModelOutput):
    """``logits`` [B, T, V]; ``latent_mean``/``latent_log_std`` [B, T/K, l]; ``loss`` when labels are given."""
    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    latent_mean: Optional[torch.Tensor] = None
    latent_log_std: Optional[torch.Tensor] = None


class AutoencoderPreTrainedModel(PreTrainedModel):
    config_class = AutoencoderConfig
    base_model_prefix = "autoencoder"
    _no_split_modules = ["AELayer"]
    _tied_weights_keys = ["decoder.lm_head_weight"]

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, LlamaRMSNorm):
            module.weight.data.fill_(1.0)


class Autoencoder(AutoencoderPreTrainedModel):
    """The chunk VAE: ``encoder`` (ids -> [mean; log_std]) and ``decoder`` (z -> logits), tied embedding."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__(config)
        if config.hidden_act != "silu" or config.mlp_bias:
            raise ValueError("the CALM autoencoder uses SiLU MLPs without bias (hidden_act='silu', mlp_bias=False)")
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self._tie_weights()
        self.post_init()

    def _tie_weights(self):
        """The decoder's output projection is the encoder's embedding (the reference ties in code).

        A state dict may carry the table under either name or both; when only
        ``decoder.lm_head_weight`` was loaded, the embedding takes that tensor instead.
        """
        embedding, head = self.encoder.embed_tokens, getattr(self.decoder, "lm_head_weight", None)
        if head is not None and embedding.weight.is_meta and not head.is_meta:
            embedding.weight = head
        else:
            self.decoder.lm_head_weight = embedding.weight

    def get_input_embeddings(self):
        return self.encoder.embed_tokens

    def encode(self, input_ids: torch.Tensor):
        """(mean, log_std), each [B, T/K, l]."""
        return self.encoder(input_ids).chunk(2, dim=-1)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Logits [..., L*K, V] of latents [..., L, l]."""
        return self.decoder(latents)

    @torch.no_grad()
    def reconstruct(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Deterministic reconstruction: z = mean, argmax."""
        mean, _ = self.encode(input_ids)
        return self.decode(mean).argmax(-1)

    def forward(self, input_ids: torch.Tensor, noise: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, return_dict: Optional[bool] = None, **kwargs):
        """Logits of the chunks of ``input_ids`` [B, T] decoded from z = mean + exp(log_std) * noise.

        ``noise`` [B, T/K, l] fixes the reparameterisation (None: z = mean, the deterministic decode).
        With ``labels`` the loss is the reference objective without its training-only dropouts:
        K * token CE + kl_weight * mean over chunks of sum_i clamp(KL_i, min=kl_clamp).
        """
        mean, log_std = self.encode(input_ids)
        latents = mean if noise is None else mean.float() + torch.exp(log_std.float()) * noise.float()
        logits = self.decode(latents)
        loss = None
        if labels is not None:
            K = self.config.patch_size
            ce = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1))
            kl = 0.5 * (mean.float().pow(2) + torch.exp(2 * log_std.float()) - 1 - 2 * log_std.float())
            loss = ce * K + self.config.kl_weight * kl.clamp(min=self.config.kl_clamp).sum(-1).mean()
        output = AutoencoderOutput(loss=loss, logits=logits, latent_mean=mean, latent_log_std=log_std)
        return output if return_dict is not False else output.to_tuple()
