"""Model FLOPs per token (calm_megatron/flops.py) against the paper's table and against torch's own
FLOP counter run on the real tiny models."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from calm_megatron import config as C, flops

REPO = Path(__file__).resolve().parents[1]

# calm-spec 5.2, Table 1: inference FLOPs per token (1e8) at the 2048-position context.
PAPER_INFERENCE = {"calm/m.yaml": 2.9, "calm/l.yaml": 4.6, "calm/xl.yaml": 9.4,
                   "ar/s.yaml": 4.4, "ar/m.yaml": 7.9, "ar/l.yaml": 15.0}


@pytest.mark.parametrize("name", sorted(PAPER_INFERENCE))
def test_inference_flops_match_the_paper_table(name):
    cfg = C.load(str(REPO / "configs" / name), [])
    got = flops.inference_flops_per_token(cfg, context=2048) / 1e8
    assert got == pytest.approx(PAPER_INFERENCE[name], rel=0.05)


def test_training_flops_ratio_paper_m_is_about_three():
    calm = flops.training_flops_per_token(C.load(str(REPO / "configs/calm/m.yaml"), ["train.seq_len=8192"]))
    ar = flops.training_flops_per_token(C.load(str(REPO / "configs/ar/m.yaml"), ["train.seq_len=2048"]))
    # Table 1: 11.9e20 (Transformer-M) vs 3.7e20 (CALM-M) over the same tokens.
    assert ar / calm == pytest.approx(11.9 / 3.7, rel=0.08)


def attention_flops(cfg: C.Config, positions: int, context: int) -> int:
    """The attention term of calm-spec 5.2, which torch's counter cannot see on CPU (it has no formula for
    the CPU flash-attention kernel that SDPA dispatches to)."""
    return positions * 4 * cfg.model.num_layers * context * cfg.model.hidden_size


def counted_forward_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            fn()
    return counter.get_total_flops()


def test_ar_forward_flops_equal_torch_flop_counter(megatron_single):
    from calm_megatron.models.ar import build_ar

    cfg = C.load(str(REPO / "configs/ar/tiny.yaml"), [])
    batch, T = 2, 64
    model = build_ar(cfg.model).eval()
    tokens = torch.randint(0, cfg.model.vocab_size, (batch, T))
    counted = counted_forward_flops(lambda: model.logits(tokens))
    expected = batch * T * flops.inference_flops_per_token(cfg, context=T)
    assert counted + attention_flops(cfg, batch * T, T) == pytest.approx(expected, rel=0.01)
    train_cfg = C.load(str(REPO / "configs/ar/tiny.yaml"), [f"train.seq_len={T}"])
    assert flops.training_flops_per_token(train_cfg) * batch * T == pytest.approx(3 * expected, rel=1e-9)


def test_autoencoder_forward_flops_equal_torch_flop_counter(megatron_single):
    from calm_megatron.models.autoencoder import build_autoencoder

    cfg = C.load(str(REPO / "configs/ae/tiny.yaml"), [])
    ae_cfg, chunks = cfg.autoencoder, 40
    model = build_autoencoder(ae_cfg).eval()
    tokens = torch.randint(0, ae_cfg.vocab_size, (chunks, ae_cfg.chunk_size))
    encoder = counted_forward_flops(lambda: model.encoder(tokens))
    assert encoder == pytest.approx(chunks * flops.ae_encoder_flops_per_chunk(ae_cfg), rel=0.01)
    latents = torch.randn(chunks, ae_cfg.latent_size)
    decoder = counted_forward_flops(lambda: model.decode(latents))
    assert decoder == pytest.approx(chunks * flops.ae_decoder_flops_per_chunk(ae_cfg), rel=0.01)


def test_calm_forward_flops_equal_torch_flop_counter(megatron_single):
    from calm_megatron.models.autoencoder import build_autoencoder
    from calm_megatron.models.calm import build_calm

    batch, T = 2, 64
    cfg = C.load(str(REPO / "configs/calm/tiny.yaml"), [f"train.seq_len={T}"])
    model = build_calm(cfg.model, build_autoencoder(cfg.autoencoder))
    tokens = torch.randint(0, cfg.model.vocab_size, (batch, T))
    counted = counted_forward_flops(lambda: model(tokens))
    chunks, m = T // cfg.model.chunk_size, cfg.model
    parts = flops.calm_flops_per_chunk(cfg, chunks, m.num_samples)
    expected = batch * (chunks - 1) * (parts["backbone"] + parts["head"] + parts["ae_encoder"])
    # Norm weights and biases are counted as matmul parameters: a ~1% overestimate at these tiny widths.
    assert counted + attention_flops(cfg, batch * (chunks - 1), chunks) == pytest.approx(expected, rel=0.02)


def test_monitor_logs_model_tflops_and_mfu_per_device():
    from calm_megatron.training.monitor import Monitor

    cfg = C.load(str(REPO / "configs/calm/tiny.yaml"), ["train.peak_tflops=100"])
    monitor = Monitor(cfg, rank=1, tokens_per_step=1024, world_size=2)
    got = monitor.utilisation(tokens_per_s=5000.0)
    per_device = flops.training_flops_per_token(cfg) * 5000.0 / 2
    assert got["tflops_per_device"] == pytest.approx(per_device / 1e12, rel=1e-12)
    assert got["mfu"] == pytest.approx(per_device / 100e12, rel=1e-12)
    cpu = Monitor(C.load(str(REPO / "configs/calm/tiny.yaml"), []), rank=1, tokens_per_step=1024)
    assert "mfu" not in cpu.utilisation(5000.0)  # no known peak on a CPU: no MFU
