"""Model FLOPs per token: the yardstick of throughput comparisons and MFU (calm-spec 5.2).

Conventions (those of the paper's accounting, reproduced in calm-spec 5.2):
- 2 FLOPs per multiply-accumulate of every matmul; parameter counts stand in for matmul sizes (norms
  and biases are a rounding error);
- attention scores and weighted values cost 4 * layers * context * d per position, at the full
  context (as the paper counts it, causal masking not discounted);
- training = 3x the forward (the backward costs two forwards) for the trained parts; the frozen
  autoencoder encoder of CALM runs forward only (it makes the targets);
- recomputation is not counted: model FLOPs, not hardware FLOPs.
"""
from __future__ import annotations

from calm_megatron import config as C

# Dense bf16 peak of the GPUs we know, TFLOP/s (no sparsity); matched against the device name.
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
                   "A10": 125.0, "V100": 125.0}


def _ae_layer_flops(ae: C.AutoencoderConfig) -> int:
    return 2 * 3 * ae.hidden_size * ae.intermediate_size  # SwiGLU gate, up, down


def ae_encoder_flops_per_chunk(ae: C.AutoencoderConfig) -> int:
    """Forward FLOPs of the AE encoder for one chunk of K tokens (token-wise layers, squeeze, chunk layers)."""
    d, K, half = ae.hidden_size, ae.chunk_size, ae.num_encoder_layers // 2
    layer = _ae_layer_flops(ae)
    return K * half * layer + 2 * K * d * d + half * layer + 2 * d * 2 * ae.latent_size


def ae_decoder_flops_per_chunk(ae: C.AutoencoderConfig) -> int:
    """Forward FLOPs of the AE decoder for one chunk, including the K x vocab logits of the tied output."""
    d, K, half = ae.hidden_size, ae.chunk_size, ae.num_decoder_layers // 2
    layer = _ae_layer_flops(ae)
    return 2 * ae.latent_size * d + half * layer + 2 * d * K * d + K * half * layer + 2 * K * d * ae.vocab_size


def backbone_flops_per_position(m: C.ModelConfig, context: int) -> int:
    """Forward FLOPs of the Transformer backbone at one position: matmuls plus attention over `context`."""
    from calm_megatron.models.backbone import count_backbone_parameters

    matmul_params = count_backbone_parameters(m) - (2 * m.num_layers + 1) * m.hidden_size  # minus norm weights
    return 2 * matmul_params + 4 * m.num_layers * context * m.hidden_size


def calm_flops_per_chunk(cfg: C.Config, context: int, head_samples: int) -> dict:
    """Forward FLOPs of the CALM parts at one chunk position, by part."""
    from calm_megatron.models.calm import count_parameters_calm

    m = cfg.model
    counts = count_parameters_calm(m)
    # Once per position for all samples: the head's hidden projection and each block's condition half
    # of its fuse-in linear (models/energy_head.py).
    shared = (1 + m.head_blocks) * (m.hidden_size * m.hidden_size + m.hidden_size)
    return {"backbone": backbone_flops_per_position(m, context) + 2 * counts.input_compression,
            "head": 2 * (shared + head_samples * (counts.head - shared)),
            "ae_encoder": ae_encoder_flops_per_chunk(cfg.autoencoder),
            "ae_decoder": ae_decoder_flops_per_chunk(cfg.autoencoder)}


def training_flops_per_token(cfg: C.Config) -> float:
    """Model FLOPs of one training token (forward + backward) for the stage `cfg.run.stage`."""
    stage, T = cfg.run.stage, cfg.train.seq_len
    if stage == "ae":
        ae = cfg.autoencoder
        return 3 * (ae_encoder_flops_per_chunk(ae) + ae_decoder_flops_per_chunk(ae)) / ae.chunk_size
    m = cfg.model
    if stage == "ar":
        return 3 * (backbone_flops_per_position(m, T) + 2 * m.vocab_size * m.hidden_size)
    if stage == "calm":
        chunks = T // m.chunk_size
        parts = calm_flops_per_chunk(cfg, chunks, m.num_samples)
        N, M, l = m.num_samples, m.num_targets, m.latent_size
        loss = 3 * 3 * (N * M + N * N) * l  # pairwise distances, forward + backward
        predicted = chunks - 1  # inputs are chunks 0..L-2, targets chunks 1..L-1
        # The frozen encoder makes the targets (chunks 1..L-1), forward only.
        per_sequence = predicted * (3 * (parts["backbone"] + parts["head"]) + loss + parts["ae_encoder"])
        return per_sequence / T
    raise ValueError(f"training_flops_per_token: unknown stage {stage!r} (ae | calm | ar)")


def inference_flops_per_token(cfg: C.Config, context: int, head_samples: int = 1) -> float:
    """Forward FLOPs of generating one token at `context` positions of the backbone (calm-spec 5.2):
    for CALM one backbone step, `head_samples` head and AE-decoder passes, all divided by K."""
    m = cfg.model
    if cfg.run.stage == "ar":
        return backbone_flops_per_position(m, context) + 2 * m.vocab_size * m.hidden_size
    parts = calm_flops_per_chunk(cfg, context, head_samples)
    return (parts["backbone"] + parts["head"] + head_samples * parts["ae_decoder"]) / m.chunk_size


def peak_flops_per_second(configured_tflops: float = 0.0) -> float:
    """Peak FLOP/s of one device: the configured value, else the table entry for this GPU; 0 when unknown
    (CPUs, unlisted GPUs), in which case MFU is not reported."""
    if configured_tflops > 0:
        return configured_tflops * 1e12
    import torch

    if not torch.cuda.is_available():
        return 0.0
    name = torch.cuda.get_device_name()
    for key, tflops in GPU_PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return 0.0
