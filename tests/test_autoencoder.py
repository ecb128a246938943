"""The chunk autoencoder against calm-spec section 1, recomputed by hand in plain torch."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from calm_megatron.config import AutoencoderConfig, load
from tests.conftest import REPO, free_port

SMALL = AutoencoderConfig(vocab_size=97, chunk_size=4, hidden_size=32, intermediate_size=48, latent_size=8,
                          num_encoder_layers=2, num_decoder_layers=2, dropout=0.25)
PAPER_PARAMS = 75_832_064  # 128257*512 embedding + 4 AELayers + squeeze/expand/latent linears + norms


def build(cfg: AutoencoderConfig = SMALL, seed: int = 0):
    from calm_megatron.models.autoencoder import build_autoencoder

    torch.manual_seed(seed)
    return build_autoencoder(cfg)


def batch(cfg: AutoencoderConfig = SMALL, B: int = 3, T: int = 16, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (B, T), generator=gen)
    noise = torch.randn(B, T // cfg.chunk_size, cfg.latent_size, generator=gen)
    return tokens, noise


# --------------------------------------------------------------------------- hand-written reference

def _rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _ae_layer(x, p, prefix, eps):
    h = _rms(x, p[f"{prefix}.norm.weight"], eps)
    gate = h @ p[f"{prefix}.mlp.gate_proj.weight"].T
    up = h @ p[f"{prefix}.mlp.up_proj.weight"].T
    return x + (F.silu(gate) * up) @ p[f"{prefix}.mlp.down_proj.weight"].T


def _linear(x, p, name):
    return x @ p[f"{name}.weight"].T + p[f"{name}.bias"]


def _stack(x, p, prefix, count, eps):
    for i in range(count):
        x = _ae_layer(x, p, f"{prefix}.{i}", eps)
    return x


def reference(model, tokens, noise, drop_rng_seed=None):
    """calm-spec 1.1-1.3 from the module's weights. With drop_rng_seed: DropToken then DropLatent."""
    cfg = model.ae_config
    p = {name: param.detach() for name, param in model.named_parameters()}
    B, T = tokens.shape
    K, d, eps = cfg.chunk_size, cfg.hidden_size, cfg.rms_norm_eps
    chunks = tokens.reshape(B, T // K, K)
    inputs = chunks
    if drop_rng_seed is not None:
        torch.manual_seed(drop_rng_seed)
        inputs = chunks.masked_fill(torch.rand(chunks.shape) < cfg.dropout, cfg.mask_token_id)
    E = p["encoder.embed_tokens.weight"]
    h = _stack(E[inputs], p, "encoder.layers_before_squeeze", cfg.num_encoder_layers // 2, eps)
    h = _linear(h.reshape(B, T // K, K * d), p, "encoder.squeeze")
    h = _stack(h, p, "encoder.layers_after_squeeze", cfg.num_encoder_layers // 2, eps)
    latent = _linear(_rms(h, p["encoder.norm.weight"], eps), p, "encoder.hidden_to_latent")
    mu, log_sigma = latent[..., :cfg.latent_size], latent[..., cfg.latent_size:]
    z = mu + torch.exp(log_sigma) * noise
    if drop_rng_seed is not None:
        keep = torch.empty_like(z).bernoulli_(1 - cfg.dropout)  # the mask F.dropout draws on CPU
        z = z * keep / (1 - cfg.dropout)
    h = _stack(_linear(z, p, "decoder.latent_to_hidden"), p, "decoder.layers_before_expand",
               cfg.num_decoder_layers // 2, eps)
    h = _linear(h, p, "decoder.expand").reshape(B, T // K, K, d)
    h = _stack(h, p, "decoder.layers_after_expand", cfg.num_decoder_layers // 2, eps)
    logits = _rms(h, p["decoder.norm.weight"], eps) @ E.T
    recon = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), chunks.reshape(-1)) * K
    kl_dims = 0.5 * (mu.pow(2) + torch.exp(2 * log_sigma) - 1 - 2 * log_sigma)
    kl = kl_dims.clamp(min=cfg.kl_clamp).sum(-1).mean()
    return recon + cfg.kl_weight * kl, recon, kl, logits.reshape(B, T, -1)


def assert_close(actual, expected, tol=1e-6):
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


# --------------------------------------------------------------------------- tests

def test_loss_matches_spec_by_hand(megatron_single):
    model = build().eval()
    tokens, noise = batch()
    out = model(tokens, noise=noise)
    loss, recon, kl, logits = reference(model, tokens, noise)
    assert_close(out.loss, loss)
    assert_close(out.recon_loss, recon)
    assert_close(out.kl_loss, kl)
    assert_close(out.logits, logits, tol=1e-5)
    assert out.logits.shape == (3, 16, SMALL.vocab_size)
    # The KL clamp is active at init: every dimension sits below lambda_KL = 0.5.
    assert out.kl_loss.item() == pytest.approx(SMALL.kl_clamp * SMALL.latent_size)


def test_loss_backward_reaches_every_parameter(megatron_single):
    model = build().eval()
    tokens, noise = batch()
    model(tokens, noise=noise).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_drop_token_and_drop_latent_only_in_training(megatron_single):
    model = build()
    tokens, noise = batch()
    model.eval()
    first, second = model(tokens, noise=noise), model(tokens, noise=noise)
    assert torch.equal(first.loss, second.loss)
    assert_close(first.loss, reference(model, tokens, noise)[0])

    model.train()
    torch.manual_seed(5)
    trained = model(tokens, noise=noise)
    expected = reference(model, tokens, noise, drop_rng_seed=5)
    assert_close(trained.loss, expected[0])  # ids masked with mask_token_id, labels unmasked, z dropped
    assert_close(trained.recon_loss, expected[1])
    assert not torch.allclose(trained.loss, first.loss)
    torch.manual_seed(6)
    assert not torch.allclose(model(tokens, noise=noise).loss, trained.loss)
    # encode/decode are dropout-free in any mode (the CALM stage calls them on a frozen AE).
    chunks = tokens.reshape(3, 4, 4)
    assert torch.equal(model.encode(chunks)[0], model.eval().encode(chunks)[0])


def test_tied_embedding_survives_an_optimizer_step(megatron_single):
    model = build().train()
    embedding = model.encoder.embed_tokens.weight
    assert model.output_weight is embedding
    vocab_sized = [n for n, p in model.named_parameters() if p.shape[0] == SMALL.vocab_size]
    assert vocab_sized == ["encoder.embed_tokens.weight"]  # no second (output) copy exists

    tokens, noise = batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = embedding.detach().clone()
    model(tokens).loss.backward()
    optimizer.step()
    assert not torch.equal(before, embedding.detach())
    assert model.output_weight.data_ptr() == embedding.data_ptr()
    model.eval()
    assert_close(model(tokens, noise=noise).loss, reference(model, tokens, noise)[0])  # logits use new E


def test_reconstruct_is_deterministic_argmax_of_mu(megatron_single):
    model = build().eval()
    tokens, _ = batch()
    ids = model.reconstruct(tokens)
    assert ids.shape == tokens.shape and ids.dtype == torch.long
    zero_noise = torch.zeros(3, 4, SMALL.latent_size)
    assert torch.equal(ids, model(tokens, noise=zero_noise).logits.argmax(-1))
    assert torch.equal(ids, model.reconstruct(tokens))
    with pytest.raises(ValueError, match="multiple of the chunk size"):
        model.reconstruct(tokens[:, :15])


def test_param_count_closed_form(megatron_single):
    from calm_megatron.models.autoencoder import build_autoencoder, count_parameters

    tiny = load(str(REPO / "configs/ae/tiny.yaml")).autoencoder
    other = replace(SMALL, chunk_size=2, num_encoder_layers=4, num_decoder_layers=2, latent_size=5)
    for cfg in (SMALL, tiny, other):
        model = build(cfg)
        assert count_parameters(cfg) == sum(p.numel() for p in model.parameters())
    paper = load(str(REPO / "configs/ae/k4_paper.yaml")).autoencoder
    with torch.device("meta"):
        meta = build_autoencoder(paper, perform_initialization=False)
    count = count_parameters(paper)
    print(f"k4_paper autoencoder parameters: {count:,}")
    assert count == sum(p.numel() for p in meta.parameters()) == PAPER_PARAMS
    assert abs(count - 75e6) / 75e6 < 0.02  # "about 75M" (calm-spec 1.1)


def test_no_weight_decay_excludes_biases_and_norms(megatron_single):
    from calm_megatron.models.autoencoder import no_weight_decay

    excluded = {n for n, p in build().named_parameters() if no_weight_decay(n, p)}
    assert "encoder.squeeze.bias" in excluded and "decoder.norm.weight" in excluded
    assert "encoder.layers_before_squeeze.0.norm.weight" in excluded
    assert all(n.endswith(("bias", "norm.weight")) for n in excluded)
    assert "encoder.embed_tokens.weight" not in excluded


def test_count_params_tool_prints_paper_count():
    result = subprocess.run([sys.executable, str(REPO / "tools/count_params.py"), "configs/ae/k4_paper.yaml"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"params_total={PAPER_PARAMS}" in result.stdout.splitlines()


_TP_WORKER = textwrap.dedent('''
    import sys, torch, torch.distributed as dist
    sys.path.insert(0, sys.argv[1])
    from megatron.core import parallel_state as ps
    from calm_megatron import distributed
    from calm_megatron.config import AutoencoderConfig
    from calm_megatron.models.autoencoder import build_autoencoder

    cfg = AutoencoderConfig(vocab_size=97, hidden_size=32, intermediate_size=48, latent_size=8, dropout=0.25)
    gen = torch.Generator().manual_seed(1)
    tokens, noise = torch.randint(0, 97, (3, 16), generator=gen), torch.randn(3, 4, 8, generator=gen)

    def gather(t, dim):
        tp = ps.get_tensor_model_parallel_world_size()
        parts = [torch.empty_like(t) for _ in range(tp)]
        dist.all_gather(parts, t.contiguous(), group=ps.get_tensor_model_parallel_group())
        return torch.cat(parts, dim)

    def run():
        torch.manual_seed(0)
        model = build_autoencoder(cfg).eval()
        out = model(tokens, noise=noise)
        out.loss.backward()
        torch.manual_seed(3)
        train_loss = model.train()(tokens).loss.detach()
        emb = model.encoder.embed_tokens.weight
        return dict(loss=out.loss.detach(), train_loss=train_loss, rec=model.reconstruct(tokens),
                    logits=gather(out.logits.detach(), -1)[..., :97], emb=gather(emb.detach(), 0)[:97],
                    emb_grad=gather(emb.grad, 0)[:97],
                    gate_grad=gather(model.decoder.layers_after_expand[0].mlp.gate_proj.weight.grad, 0),
                    expand_grad=model.decoder.expand.weight.grad)

    distributed.init(tp=2, pp=1, init_deepspeed=False)
    sharded = run()
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=1)
    full = run()
    for key in full:
        torch.testing.assert_close(sharded[key], full[key], rtol=1e-5, atol=1e-6, msg=key)
    distributed.teardown()
    print("TP2_MATCHES_TP1")
''')


def test_tensor_parallel_matches_single_rank(tmp_path: Path):
    """TP=2 (vocab 97 padded to 98) equals TP=1 with the same seed: loss, logits, argmax, grads."""
    script = tmp_path / "tp_worker.py"
    script.write_text(_TP_WORKER)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), str(script), str(REPO)]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("TP2_MATCHES_TP1") == 2
