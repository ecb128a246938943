"""Numerical check of an export: the written HF folder, reloaded through transformers, against our model.

Our model is built from the checkpoint's own tensors (the shard reader, not the HF name mapping), the
HF model is loaded from the folder with ``trust_remote_code=True`` (CALM, autoencoder: our shipped
modeling code) or as a stock ``LlamaForCausalLM`` (baseline). On fixed random inputs we compare
- autoencoder: latent mean/log-std and logits with fixed reparameterisation noise;
- CALM: backbone hidden states, head latents with fixed head noise, and the frozen autoencoder's
  logits (inside the CALM and in the separate autoencoder folder);
- baseline: logits, and KL(ours || HF) of the next-token distributions.
An output passes when max|ours - hf| <= TOLERANCE * max(1, max|ours|) (fp32 arithmetic on both sides;
for a bf16 export our weights are rounded to bf16 first, so both sides hold the same numbers).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import torch

TOLERANCE = 1e-5
KL_TOLERANCE = 1e-6


class ValidationError(AssertionError):
    """The exported folder does not reproduce our model."""


def _compare(name: str, ours: torch.Tensor, theirs: torch.Tensor, results: Dict[str, float]) -> None:
    ours, theirs = ours.detach().float(), theirs.detach().float()
    if ours.shape != theirs.shape:
        raise ValidationError(f"{name}: shape {tuple(theirs.shape)} from the HF folder, {tuple(ours.shape)} from ours")
    diff = (ours - theirs).abs().max().item()
    results[name] = diff
    scale = max(1.0, ours.abs().max().item())
    if not diff <= TOLERANCE * scale:  # also catches NaN
        raise ValidationError(f"{name}: max |ours - hf| = {diff:.3e} exceeds {TOLERANCE:g} x {scale:.3g}")


def _load_remote(folder: Path):
    from calm_megatron.hf._compat import import_transformers

    transformers = import_transformers()
    return transformers.AutoModel.from_pretrained(str(folder), trust_remote_code=True,
                                                  dtype=torch.float32).eval()


def _check_autoencoder(ours_ae, hf_ae, cfg, generator, results, label) -> None:
    ids = torch.randint(0, cfg.vocab_size, (2, cfg.chunk_size * 4), generator=generator)
    noise = torch.randn(2, 4, cfg.latent_size, generator=generator)
    with torch.no_grad():
        mu, log_sigma = ours_ae.encode(ids.view(2, 4, cfg.chunk_size))
        ours_logits = ours_ae(ids, noise=noise).logits
        out = hf_ae(ids, noise=noise)
    _compare(f"{label}latent_mean", mu, out.latent_mean, results)
    _compare(f"{label}latent_log_std", log_sigma, out.latent_log_std, results)
    _compare(f"{label}logits", ours_logits, out.logits, results)


def validate_export(checkpoint: str, folder: str, seed: int = 0) -> Dict[str, float]:
    """Compare the HF folder with the checkpoint's model; returns max abs differences, raises ValidationError."""
    from calm_megatron.hf.loading import build_model, copy_into, ensure_runtime
    from calm_megatron.hf.shards import CheckpointReader

    ensure_runtime()
    folder = Path(folder)
    reader = CheckpointReader(checkpoint)
    ours = build_model(reader.kind, reader.model_cfg, reader.ae_cfg)
    copy_into(ours, ((name, reader.tensor(name)) for name in reader.params), str(reader.step))
    ours.eval()
    exported = _exported_dtype(folder)
    if exported == torch.bfloat16:
        with torch.no_grad():
            for param in ours.parameters():
                param.copy_(param.bfloat16().float())
    generator = torch.Generator().manual_seed(seed)
    results: Dict[str, float] = {}
    if reader.kind == "ae":
        _check_autoencoder(ours, _load_remote(folder), reader.ae_cfg, generator, results, "")
    elif reader.kind == "calm":
        _check_calm(ours, _load_remote(folder), reader.model_cfg, generator, results)
        _check_autoencoder(ours.autoencoder, _load_remote(folder / "autoencoder"), reader.ae_cfg, generator,
                           results, "autoencoder_folder.")
    else:
        _check_ar(ours, folder, reader.model_cfg, generator, results)
    return results


def _exported_dtype(folder: Path) -> torch.dtype:
    import json

    config = json.loads((folder / "config.json").read_text())
    name = config.get("torch_dtype") or config.get("dtype") or "float32"
    return getattr(torch, name)


def _check_calm(ours, hf, cfg, generator, results) -> None:
    steps = max(2, min(8, cfg.max_position_embeddings))
    ids = torch.randint(0, cfg.vocab_size, (2, steps * cfg.chunk_size), generator=generator)
    noise = torch.rand(4, 2, steps, cfg.noise_size, generator=generator) - 0.5
    with torch.no_grad():
        hidden = ours.hidden_states(ids, include_last_chunk=True)
        latents = ours.sample_latents(hidden, 4, noise)
        out = hf(ids, noise=noise)
    _compare("hidden_states", hidden, out.last_hidden_state, results)
    _compare("latents", latents, out.latents, results)
    _check_autoencoder(ours.autoencoder, hf.ae_model, ours.autoencoder.ae_config, generator, results, "ae_model.")


def _check_ar(ours, folder: Path, cfg, generator, results) -> None:
    from calm_megatron.hf._compat import import_transformers

    transformers = import_transformers()
    hf = transformers.LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    length = max(2, min(16, cfg.max_position_embeddings))
    ids = torch.randint(0, cfg.vocab_size, (2, length), generator=generator)
    with torch.no_grad():
        ours_logits = ours.logits(ids)
        hf_logits = hf(ids).logits
    _compare("logits", ours_logits, hf_logits, results)
    log_p, log_q = ours_logits.float().log_softmax(-1), hf_logits.float().log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()
    results["kl"] = kl
    if not abs(kl) <= KL_TOLERANCE:
        raise ValidationError(f"KL(ours || hf) = {kl:.3e} exceeds {KL_TOLERANCE:g}")
