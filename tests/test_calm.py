"""CALM, its energy head and loss, the shared backbone and the AR baseline (CPU, one rank)."""
from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from calm_megatron import config as C

REPO = Path(__file__).resolve().parents[1]
CALM_TINY = str(REPO / "configs/calm/tiny.yaml")
AR_TINY = str(REPO / "configs/ar/tiny.yaml")

PAPER_COUNTS = {  # calm-spec 5.1 recounts; CALM without its autoencoder, vocab 128257
    "calm/m.yaml": 371.7e6, "calm/l.yaml": 735.2e6, "calm/xl.yaml": 1.83e9,
    "ar/s.yaml": 281.9e6, "ar/m.yaml": 465.0e6, "ar/l.yaml": 847.0e6,
}


# --------------------------------------------------------------------------- helpers

def tiny_config(path: str = CALM_TINY, *overrides: str) -> C.Config:
    return C.load(path, list(overrides))


def build_tiny_calm(cfg: C.Config, seed: int = 0):
    from calm_megatron.models.autoencoder import build_autoencoder
    from calm_megatron.models.calm import build_calm

    torch.manual_seed(seed)
    return build_calm(cfg.model, build_autoencoder(cfg.autoencoder))


def random_tokens(cfg: C.Config, batch: int, chunks: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.model.vocab_size, (batch, chunks * cfg.model.chunk_size), generator=generator)


def brute_force_energy_loss(samples, targets, alpha):
    """calm-spec 2.5 written out as Python loops over samples and targets, per position."""
    n, positions, _ = samples.shape
    m = targets.shape[0]
    losses = []
    for i in range(positions):
        to_targets = sum(torch.linalg.vector_norm(targets[j, i] - samples[k, i]) ** alpha
                         for k in range(n) for j in range(m))
        between = sum(torch.linalg.vector_norm(samples[a, i] - samples[b, i]) ** alpha
                      for a in range(n) for b in range(n) if a != b)
        losses.append(2.0 / (n * m) * to_targets - between / (n * (n - 1)))
    return torch.stack(losses)


def reference_llama(backbone, x: torch.Tensor, positions: torch.Tensor, cfg) -> torch.Tensor:
    """HF-Llama math in plain torch on the Megatron backbone's weights: x [B, S, d] -> [B, S, d]."""
    heads, groups = cfg.num_attention_heads, cfg.num_query_groups or cfg.num_attention_heads
    d, hd = cfg.hidden_size, cfg.hidden_size // cfg.num_attention_heads

    def rms(t, weight):
        return weight * (t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps))

    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    angles = torch.cat([positions[:, None] * inv_freq] * 2, dim=-1)  # [S, hd]

    def rope(t):  # [B, h, S, hd], rotate-half convention
        half = torch.cat([-t[..., hd // 2:], t[..., :hd // 2]], dim=-1)
        return t * angles.cos() + half * angles.sin()

    b, s, _ = x.shape
    for layer in backbone.decoder.layers:
        attn = layer.self_attention
        qkv = (rms(x, layer.input_layernorm.weight) @ attn.linear_qkv.weight.t()).view(b, s, groups, -1, hd)
        q = qkv[:, :, :, :heads // groups].reshape(b, s, heads, hd).transpose(1, 2)
        k = qkv[:, :, :, -2].transpose(1, 2).repeat_interleave(heads // groups, dim=1)
        v = qkv[:, :, :, -1].transpose(1, 2).repeat_interleave(heads // groups, dim=1)
        scores = rope(q) @ rope(k).transpose(-1, -2) / math.sqrt(hd)
        scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
        context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, heads * hd)
        x = x + context @ attn.linear_proj.weight.t()
        gate, up = (rms(x, layer.pre_mlp_layernorm.weight) @ layer.mlp.linear_fc1.weight.t()).chunk(2, dim=-1)
        x = x + (F.silu(gate) * up) @ layer.mlp.linear_fc2.weight.t()
    return rms(x, backbone.decoder.final_layernorm.weight)


# --------------------------------------------------------------------------- parameter counts

@pytest.mark.parametrize("name", sorted(PAPER_COUNTS))
def test_paper_configs_match_the_paper_parameter_counts(name):
    from calm_megatron.models.ar import count_parameters_ar
    from calm_megatron.models.calm import count_parameters_calm

    cfg = C.load(str(REPO / "configs" / name))
    C.validate(cfg, world_size=8, check_files=False)
    count = (count_parameters_calm(cfg.model).total_excluding_autoencoder if cfg.run.stage == "calm"
             else count_parameters_ar(cfg.model).total)
    assert cfg.model.vocab_size == 128257
    assert abs(count - PAPER_COUNTS[name]) / PAPER_COUNTS[name] < 0.002, count


def test_closed_form_counts_equal_built_tiny_models(megatron_single):
    from calm_megatron.models.ar import build_ar, count_parameters_ar
    from calm_megatron.models.calm import count_parameters_calm

    cfg = tiny_config()
    calm = build_tiny_calm(cfg)
    built = {name.split(".")[0]: 0 for name, _ in calm.named_parameters()}
    for name, param in calm.named_parameters():
        built[name.split(".")[0]] += param.numel()
    expected = count_parameters_calm(cfg.model)
    assert built["backbone"] == expected.backbone and built["head"] == expected.head
    assert built["embedding"] + built["input_compression"] == expected.embedding + expected.input_compression
    assert sum(p.numel() for p in calm.trainable_parameters()) == expected.total_excluding_autoencoder
    for groups in (0, 2):  # MHA and GQA
        ar_cfg = tiny_config(AR_TINY, f"model.num_query_groups={groups}").model
        assert sum(p.numel() for p in build_ar(ar_cfg).parameters()) == count_parameters_ar(ar_cfg).total


def test_count_params_tool_prints_calm_counts(megatron_single):
    import importlib.util

    spec = importlib.util.spec_from_file_location("count_params", REPO / "tools/count_params.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert tool.main([CALM_TINY]) == 0
    values = dict(line.split("=") for line in out.getvalue().split())
    from calm_megatron.models.autoencoder import count_parameters
    from calm_megatron.models.calm import count_parameters_calm

    cfg = tiny_config()
    excluding = count_parameters_calm(cfg.model).total_excluding_autoencoder
    assert int(values["params_excluding_autoencoder"]) == excluding
    assert int(values["params_total"]) == excluding + count_parameters(cfg.autoencoder)


# --------------------------------------------------------------------------- energy loss

@pytest.mark.parametrize("alpha", [1.0, 1.5, 0.5])
def test_energy_loss_equals_brute_force_double_loop(alpha):
    from calm_megatron.models.energy_head import energy_loss

    g = torch.Generator().manual_seed(0)
    samples = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)
    targets = torch.randn(6, 3, 5, generator=g, dtype=torch.float64)
    mu = torch.zeros(3, 5)
    expected = brute_force_energy_loss(samples, targets, alpha).float()
    got = energy_loss(samples, mu, None, num_targets=6, alpha=alpha, targets=targets)
    assert got.dtype == torch.float32 and got.shape == (3,)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # Chunking over positions (one position per chunk) changes neither values nor gradients.
    leaf = samples.float().requires_grad_(True)
    whole = energy_loss(leaf, mu, None, 6, alpha, targets=targets)
    (grad_whole,) = torch.autograd.grad(whole.sum(), leaf)
    chunked = energy_loss(leaf, mu, None, 6, alpha, targets=targets, chunk_elements=1)
    (grad_chunked,) = torch.autograd.grad(chunked.sum(), leaf)
    torch.testing.assert_close(chunked, whole)
    torch.testing.assert_close(grad_chunked, grad_whole)


def test_energy_loss_draws_targets_from_the_posterior():
    from calm_megatron.models.energy_head import energy_loss

    g = torch.Generator().manual_seed(1)
    samples, mu = torch.randn(3, 4, 2, generator=g), torch.randn(4, 2, generator=g)
    log_sigma = torch.randn(4, 2, generator=g)
    drawn = energy_loss(samples, mu, log_sigma, 5, 1.0, generator=torch.Generator().manual_seed(7))
    eps = torch.randn(5, 4, 2, generator=torch.Generator().manual_seed(7))
    given = energy_loss(samples, mu, log_sigma, 5, 1.0, targets=mu + log_sigma.exp() * eps)
    torch.testing.assert_close(drawn, given)


@pytest.mark.parametrize("alpha", [1.0, 1.5, 0.75])
def test_energy_loss_gradient_is_finite_when_all_samples_coincide(alpha):
    from calm_megatron.models.energy_head import energy_loss

    samples = torch.zeros(8, 6, 16, requires_grad=True)  # the zero-initialised head at step 0
    mu, log_sigma = torch.randn(6, 16), torch.full((6, 16), -1.0)
    loss = energy_loss(samples, mu, log_sigma, 10, alpha).mean()
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(samples.grad).all()
    assert samples.grad.abs().sum() > 0  # the target term still pulls the samples


# --------------------------------------------------------------------------- the head

def test_head_starts_at_zero_and_noise_is_injectable(megatron_single):
    cfg = tiny_config()
    calm = build_tiny_calm(cfg)
    head = calm.head
    assert head.final_fc2.weight.abs().sum() == 0 and head.final_fc2.bias.abs().sum() == 0
    h = torch.randn(2, 3, cfg.model.hidden_size)
    samples = calm.sample_latents(h, 5)
    assert samples.shape == (5, 2, 3, cfg.model.latent_size) and samples.abs().max() == 0
    with torch.no_grad():
        head.final_fc2.weight.normal_(0, 0.1)
    noise = torch.rand(5, 2, 3, cfg.model.noise_size) - 0.5
    a, b = calm.sample_latents(h, 5, noise), calm.sample_latents(h, 5, noise.clone())
    assert torch.equal(a, b)
    assert not torch.allclose(a[0], a[1])  # every sample gets its own noise
    chunks = calm.sample_chunks(h, 2)
    assert chunks.shape == (2, 2, 3, cfg.model.chunk_size) and chunks.dtype == torch.long


# --------------------------------------------------------------------------- backbone

def test_backbone_is_llama_with_chunk_index_positions_and_gqa(megatron_single):
    cfg = tiny_config(CALM_TINY, "model.num_query_groups=2", "model.rope_theta=500.0")
    calm = build_tiny_calm(cfg)
    tokens = random_tokens(cfg, batch=2, chunks=9)
    with torch.no_grad():
        h = calm.hidden_states(tokens)
        inputs = calm.embed_chunks(tokens.view(2, 9, -1)[:, :-1]).transpose(0, 1)  # [B, 8, d]
        chunk_positions = torch.arange(8, dtype=torch.float32)
        expected = reference_llama(calm.backbone, inputs, chunk_positions, cfg.model)
        token_positions = reference_llama(calm.backbone, inputs, chunk_positions * cfg.model.chunk_size, cfg.model)
    assert h.shape == (2, 8, cfg.model.hidden_size)
    torch.testing.assert_close(h, expected, atol=1e-5, rtol=1e-5)
    assert (h - token_positions).abs().max() > 1e-3


def test_sdpa_core_attention_equals_megatron_dot_product_attention(megatron_single):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from calm_megatron.models.backbone import SDPAttention, transformer_config

    config = transformer_config(tiny_config(CALM_TINY, "model.num_query_groups=2").model)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(10, 2, heads, 32, generator=g) for heads in (4, 2, 2))  # [s, b, heads, hd], GQA
    causal = torch.ones(10, 10, dtype=torch.bool).triu(1)[None, None]  # Megatron's default mask is CUDA-only
    expected = DotProductAttention(config, 1, AttnMaskType.causal, "self")(q, k, v, causal)
    got = SDPAttention(config, 1, AttnMaskType.causal, "self")(q, k, v, None)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_backbone_is_causal_over_chunks(megatron_single):
    cfg = tiny_config()
    calm = build_tiny_calm(cfg)
    tokens = random_tokens(cfg, batch=2, chunks=8)
    changed = tokens.clone()
    k = cfg.model.chunk_size
    changed[:, 5 * k:6 * k] = (changed[:, 5 * k:6 * k] + 1) % cfg.model.vocab_size  # chunk 5
    with torch.no_grad():
        before, after = calm.hidden_states(tokens), calm.hidden_states(changed)
    torch.testing.assert_close(before[:, :5], after[:, :5], atol=0, rtol=0)
    assert (before[:, 5:] - after[:, 5:]).abs().amax(dim=-1).min() > 0
    assert calm.hidden_states(tokens, include_last_chunk=True).shape[1] == 8


# --------------------------------------------------------------------------- CALM forward and the frozen AE

def test_calm_forward_is_the_energy_loss_of_next_chunk_posteriors(megatron_single):
    from calm_megatron.models.energy_head import energy_loss

    cfg = tiny_config()
    calm = build_tiny_calm(cfg)
    with torch.no_grad():
        calm.head.final_fc2.weight.normal_(0, 0.1)
    tokens = random_tokens(cfg, batch=2, chunks=6)
    m = cfg.model
    noise = torch.rand(m.num_samples, 2, 5, m.noise_size) - 0.5
    torch.manual_seed(3)
    out = calm(tokens, noise=noise)
    assert out.samples.shape == (m.num_samples, 2, 5, m.latent_size) and out.per_position_loss.shape == (2, 5)
    torch.testing.assert_close(out.samples, calm.sample_latents(calm.hidden_states(tokens), m.num_samples, noise))
    mu, log_sigma = calm.autoencoder.encode(tokens.view(2, 6, -1)[:, 1:])  # targets: chunks 1..L-1
    torch.manual_seed(3)
    expected = energy_loss(out.samples.flatten(1, 2), mu.flatten(0, 1), log_sigma.flatten(0, 1),
                           m.num_targets, m.energy_alpha).view(2, 5)
    torch.testing.assert_close(out.per_position_loss, expected)
    torch.testing.assert_close(out.loss, expected.mean())


def test_full_recompute_gives_the_same_gradients(megatron_single):
    from calm_megatron.models.autoencoder import build_autoencoder
    from calm_megatron.models.calm import build_calm

    grads = {}
    for recompute in ("none", "full"):
        cfg = tiny_config(CALM_TINY, f"parallel.recompute={recompute}")
        torch.manual_seed(0)
        calm = build_calm(cfg.model, build_autoencoder(cfg.autoencoder), parallel=cfg.parallel).train()
        assert calm.head.recompute_blocks == (recompute == "full")
        assert calm.config.recompute_granularity == (None if recompute == "none" else recompute)
        with torch.no_grad():
            calm.head.final_fc2.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
        torch.manual_seed(2)
        calm(random_tokens(cfg, batch=2, chunks=6)).loss.backward()
        grads[recompute] = {n: p.grad.clone() for n, p in calm.trainable_named_parameters()}
    for name, grad in grads["none"].items():
        torch.testing.assert_close(grads["full"][name], grad, msg=name)


def test_autoencoder_inside_calm_is_frozen(megatron_single):
    from calm_megatron.models.calm import no_weight_decay

    cfg = tiny_config()
    calm = build_tiny_calm(cfg)
    ae_before = {name: p.detach().clone() for name, p in calm.autoencoder.named_parameters()}
    trainable_before = {name: p.detach().clone() for name, p in calm.trainable_named_parameters()}
    assert all(not name.startswith("autoencoder.") for name in trainable_before)
    assert any(key.startswith("autoencoder.") for key in calm.state_dict())
    decay = [p for n, p in calm.trainable_named_parameters() if not no_weight_decay(n, p)]
    plain = [p for n, p in calm.trainable_named_parameters() if no_weight_decay(n, p)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": plain, "weight_decay": 0.0}],
                                  lr=1e-2)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not in_optimizer & {id(p) for p in calm.autoencoder.parameters()}
    calm.train()
    assert not calm.autoencoder.training and calm.backbone.training
    tokens = random_tokens(cfg, batch=2, chunks=8)
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        loss = calm(tokens).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    for name, p in calm.autoencoder.named_parameters():
        assert torch.equal(p, ae_before[name]) and p.grad is None and not p.requires_grad, name
    changed = [n for n, p in calm.trainable_named_parameters() if not torch.equal(p, trainable_before[n])]
    assert any(n.startswith("head.") for n in changed) and any(n.startswith("backbone.") for n in changed)


def test_incompatible_autoencoder_is_rejected_naming_both_values(megatron_single):
    from calm_megatron.models.autoencoder import build_autoencoder
    from calm_megatron.models.calm import build_calm, check_autoencoder_compatible

    cfg = tiny_config()
    for key, value in (("latent_size", 24), ("chunk_size", 8), ("vocab_size", 512)):
        ae_cfg = C.load(CALM_TINY, [f"autoencoder.{key}={value}"]).autoencoder
        with pytest.raises(ValueError, match=f"model.{key}={getattr(cfg.model, key)} but autoencoder.{key}={value}"):
            check_autoencoder_compatible(cfg.model, ae_cfg)
    with pytest.raises(ValueError, match="autoencoder.latent_size=24"):
        build_calm(cfg.model, build_autoencoder(C.load(CALM_TINY, ["autoencoder.latent_size=24"]).autoencoder))


# --------------------------------------------------------------------------- AR baseline

def test_ar_loss_is_plain_cross_entropy_of_its_logits(megatron_single):
    from calm_megatron.models.ar import build_ar

    cfg = tiny_config(AR_TINY)
    torch.manual_seed(0)
    model = build_ar(cfg.model)
    tokens = random_tokens(cfg, batch=2, chunks=6)
    out = model(tokens)
    vocab = cfg.model.vocab_size
    assert out.logits.shape == (2, tokens.size(1), vocab)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, vocab).float(), tokens[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(model.logits(tokens), out.logits.detach())
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    # Causal: the logits at position t do not depend on tokens after t.
    changed = tokens.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % vocab
    torch.testing.assert_close(model.logits(changed)[:, :10], out.logits[:, :10].detach(), atol=0, rtol=0)


def test_build_model_dispatches_on_stage(megatron_single):
    from calm_megatron.models import build_model
    from calm_megatron.models.ar import ARModel
    from calm_megatron.models.autoencoder import build_autoencoder
    from calm_megatron.models.calm import CALM

    cfg = tiny_config()
    assert isinstance(build_model(cfg, build_autoencoder(cfg.autoencoder)), CALM)
    assert isinstance(build_model(tiny_config(AR_TINY)), ARModel)
    with pytest.raises(ValueError, match="autoencoder"):
        build_model(cfg)


def test_weight_decay_exemptions():
    from calm_megatron.models.calm import no_weight_decay

    assert no_weight_decay("head.blocks.0.fuse_in.bias", torch.zeros(4))
    assert no_weight_decay("backbone.decoder.final_layernorm.weight", torch.zeros(4))
    assert not no_weight_decay("embedding.weight", torch.zeros(4, 4))
    assert not no_weight_decay("head.blocks.0.fuse_in.weight", torch.zeros(4, 4))


def test_tiny_configs_share_one_backbone():
    calm, ar = tiny_config().model, tiny_config(AR_TINY).model
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_attention_heads"):
        assert getattr(calm, key) == getattr(ar, key)
    C.validate(tiny_config(), world_size=1, check_files=False)
    C.validate(tiny_config(AR_TINY), world_size=1, check_files=False)
    assert tiny_config().autoencoder == C.load(str(REPO / "configs/ae/tiny.yaml")).autoencoder  # stage 1's AE
    assert tiny_config().autoencoder.latent_size == calm.latent_size
