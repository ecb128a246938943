"""How much can the energy loss tell a good next-chunk model from one that knows nothing?

For a frozen autoencoder and held-out blocks, this scores two stand-in "models" with CALM's own
energy loss (calm-spec 2.5) at every chunk start, against the encoder's posterior of the true chunk:

- ``reference``: chunks drawn from a given next-chunk sampler (e.g. the autoregressive baseline,
  K tokens sampled one by one), encoded and drawn from their posteriors;
- ``marginal``: chunks taken from random chunk positions of the same blocks (the marginal
  distribution of chunks: what a model that ignores its context can at best learn).

``gap = 1 - reference / marginal`` is the headroom the loss offers a CALM on this autoencoder: the
best a CALM of the reference's quality can gain over the marginal. A small gap means the latent
geometry puts likely and unlikely continuations about equally far apart, so the head gets little
signal (``tools/energy_gap.py``; see README "What to expect" of the demo).
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, Optional

import torch

from calm_megatron.models.energy_head import draw_targets, energy_loss

# (contexts [B, t] tokens, n) -> n sampled next chunks per row [B, n, K]
NextChunkSampler = Callable[[torch.Tensor, int], torch.Tensor]


def ar_next_chunks(logits_fn: Callable[[torch.Tensor], torch.Tensor], chunk_size: int,
                   generator: Optional[torch.Generator] = None) -> NextChunkSampler:
    """A sampler drawing K tokens one by one (T=1) from a baseline's ``logits_fn(tokens) -> [B, t, V]``."""
    def sample(contexts: torch.Tensor, n: int) -> torch.Tensor:
        rows = contexts.repeat_interleave(n, dim=0)
        for _ in range(chunk_size):
            probs = logits_fn(rows)[:, -1].float().softmax(-1)
            rows = torch.cat([rows, torch.multinomial(probs, 1, generator=generator)], dim=1)
        return rows[:, -chunk_size:].view(contexts.shape[0], n, chunk_size)
    return sample


def _posterior(autoencoder, chunks: torch.Tensor):
    """(mu, log_sigma) of chunks ``[..., K]``; log_sigma is None for a deterministic autoencoder."""
    mu, log_sigma = autoencoder.encode(chunks)
    return mu, (log_sigma if autoencoder.ae_config.variational else None)


@torch.no_grad()
def energy_gap(autoencoder, blocks: Iterable[torch.Tensor], reference: NextChunkSampler, num_samples: int = 8,
               num_targets: int = 100, generator: Optional[torch.Generator] = None) -> Dict[str, float]:
    """Mean energy loss of ``reference`` and of marginal chunks at every chunk start 1..L-1 of ``blocks``."""
    k = autoencoder.ae_config.chunk_size
    totals = {"reference": 0.0, "marginal": 0.0}
    positions = 0
    for tokens in blocks:
        batch, length = tokens.shape
        chunks = tokens.view(batch, length // k, k)
        for i in range(1, chunks.shape[1]):
            mu, log_sigma = _posterior(autoencoder, chunks[:, i])
            drawn = reference(tokens[:, :i * k], num_samples)  # [B, N, K]
            pick = torch.randint(0, batch * chunks.shape[1], (num_samples, batch), generator=generator)
            shuffled = chunks.reshape(-1, k)[pick]  # [N, B, K]: chunks from random positions
            for name, sample_chunks in (("reference", drawn.transpose(0, 1)), ("marginal", shuffled)):
                z = draw_targets(*_posterior(autoencoder, sample_chunks), 1, generator)[0]  # one draw each
                totals[name] += float(energy_loss(z, mu, log_sigma, num_targets, generator=generator).sum())
            positions += batch
    if not positions:
        raise ValueError("energy_gap: no chunk start to score (blocks need at least 2 chunks)")
    reference_loss, marginal_loss = totals["reference"] / positions, totals["marginal"] / positions
    return {"reference_loss": reference_loss, "marginal_loss": marginal_loss,
            "gap": 1.0 - reference_loss / marginal_loss, "positions": positions}
