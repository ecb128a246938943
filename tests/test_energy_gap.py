"""The energy-loss headroom diagnostic (calm_megatron/metrics/energy_gap.py, tools/energy_gap.py)."""
from __future__ import annotations

import pytest
import torch

from calm_megatron import config as C
from calm_megatron.metrics.energy_gap import ar_next_chunks, energy_gap
from tests.conftest import REPO

K = 4


def tiny_autoencoder(variational: bool):
    from calm_megatron.models.autoencoder import build_autoencoder

    cfg = C.load(str(REPO / "configs/ae/tiny.yaml"), ["autoencoder.hidden_size=64", "autoencoder.intermediate_size=128",
                                                     "autoencoder.latent_size=16", "autoencoder.vocab_size=512",
                                                     f"autoencoder.variational={str(variational).lower()}"])
    torch.manual_seed(0)
    return build_autoencoder(cfg.autoencoder).eval()


def true_next_chunks(tokens: torch.Tensor):
    """A sampler that knows the block: every draw is the chunk that really follows."""
    def sample(contexts: torch.Tensor, n: int) -> torch.Tensor:
        t = contexts.shape[1]
        return tokens[:, t:t + K].unsqueeze(1).expand(-1, n, -1)
    return sample


def test_a_model_that_knows_the_next_chunk_scores_zero_on_a_deterministic_autoencoder(megatron_single):
    autoencoder = tiny_autoencoder(variational=False)
    tokens = torch.randint(0, 512, (4, 8 * K), generator=torch.Generator().manual_seed(1))
    result = energy_gap(autoencoder, [tokens], true_next_chunks(tokens), generator=torch.Generator().manual_seed(2))
    # samples == targets == mu: every distance is 0; random chunks are not (7 starts x 4 rows)
    assert result["reference_loss"] == 0.0 and result["marginal_loss"] > 0.0
    assert result["gap"] == 1.0 and result["positions"] == 28


def test_a_context_free_sampler_scores_like_the_marginal(megatron_single):
    autoencoder = tiny_autoencoder(variational=True)
    tokens = torch.randint(0, 512, (16, 16 * K), generator=torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(4)

    def random_chunks(contexts: torch.Tensor, n: int) -> torch.Tensor:
        pick = torch.randint(0, tokens.numel() // K, (contexts.shape[0], n), generator=generator)
        return tokens.reshape(-1, K)[pick]

    result = energy_gap(autoencoder, [tokens], random_chunks, generator=generator)
    assert result["positions"] == 16 * 15
    assert abs(result["gap"]) < 0.03, result  # the same distribution on both sides


def test_ar_next_chunks_samples_token_by_token():
    vocab = 7

    def logits_fn(rows: torch.Tensor) -> torch.Tensor:  # all mass on (last token + 1) mod vocab
        nxt = (rows + 1) % vocab
        return torch.nn.functional.one_hot(nxt, vocab).float() * 1e4

    sample = ar_next_chunks(logits_fn, K, torch.Generator().manual_seed(0))
    out = sample(torch.tensor([[0, 1, 5], [3, 3, 6]]), 2)
    assert out.shape == (2, 2, K)
    assert out[0, 0].tolist() == [6, 0, 1, 2] and out[1, 1].tolist() == [0, 1, 2, 3]


def test_energy_gap_needs_two_chunks(megatron_single):
    autoencoder = tiny_autoencoder(variational=True)
    tokens = torch.randint(0, 512, (2, K))
    with pytest.raises(ValueError, match="no chunk start"):
        energy_gap(autoencoder, [tokens], true_next_chunks(tokens))
