"""BrierLM of a model given as our checkpoint or as an HF folder (``tools/eval_brier.py``).

Both load into our model classes (TP=1, this process) and go through the same estimators as the
trainer's evaluation (``calm_megatron.metrics.evaluate``): a checkpoint and its export score alike.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from calm_megatron.hf.loading import LoadedModel, load_model


def held_out_blocks(data: str, batch_size: int, max_batches: Optional[int]):
    from calm_megatron.data.loader import iter_eval_batches

    for batch in iter_eval_batches(data, batch_size=batch_size, dp_rank=0, dp_size=1, max_batches=max_batches):
        yield batch["tokens"]


def held_out_data(loaded: LoadedModel, data: Optional[str] = None) -> str:
    """``data``, else the loaded run's own ``data.valid`` (an HF folder names none)."""
    if data:
        return data
    if loaded.source.joinpath("config.json").is_file():
        raise ValueError("an HF folder names no held-out data: pass --data")
    if not loaded.config.data.valid:
        raise ValueError(f"{loaded.source}: the run has no data.valid: pass --data")
    return loaded.config.data.valid


def evaluate_brier(path: str, data: Optional[str] = None, batch_size: int = 1, max_batches: Optional[int] = None,
                   seed: int = 1234, loaded: Optional[LoadedModel] = None) -> Dict[str, float]:
    """BrierLM (x100) and Brier-1..4 of the CALM or baseline at ``path`` on held-out MDS shards ``data``.

    ``data`` defaults to the checkpoint's ``data.valid``. Sampling draws from a generator seeded
    with ``seed`` (torch's default generator for CALM head noise, a private one for the baseline).
    """
    from calm_megatron.metrics.evaluate import ar_brierlm, calm_brierlm

    loaded = loaded or load_model(path)
    if loaded.kind == "ae":
        raise ValueError(f"{path} is an autoencoder: BrierLM scores language models (CALM or the baseline)")
    data = held_out_data(loaded, data)
    blocks = held_out_blocks(data, batch_size, max_batches)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if loaded.kind == "calm":
            result = calm_brierlm(loaded.model, blocks)
        else:
            result = ar_brierlm(loaded.model, blocks, generator=torch.Generator().manual_seed(seed))
    return dict(result, model=str(loaded.source), kind=loaded.kind, data=str(data))
