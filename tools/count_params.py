#!/usr/bin/env python
"""Print the parameter count of the model a config describes.

    tools/count_params.py CONFIG [section.key=value ...]

Prints ``key=value`` lines, ``params_total=N`` first. Each stage plugs in a counter in
``COUNTERS`` (stage -> function(cfg) -> {key: count}); the model is built on the meta device, so
no weights are allocated.
"""
from __future__ import annotations

import sys
from typing import Callable, Dict

import torch

from calm_megatron.config import Config, load


_OWNED_GROUP: list = []  # non-empty once this tool created the process group


def _one_rank_megatron_group() -> None:
    """A 1-rank gloo group with Megatron-Core parallel state (its layers need one to be built)."""
    import torch.distributed as dist
    from calm_megatron.hf.loading import ensure_runtime

    if not dist.is_initialized() and ensure_runtime():
        _OWNED_GROUP.append(True)


def _teardown_owned_group() -> None:
    """Destroy the group made here explicitly (avoids sporadic gloo aborts at interpreter exit)."""
    if _OWNED_GROUP:
        from calm_megatron import distributed

        distributed.teardown()
        _OWNED_GROUP.clear()


def _numel(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_autoencoder(cfg: Config) -> Dict[str, int]:
    """Stage ae: the chunk autoencoder, built on the meta device."""
    from calm_megatron.models.autoencoder import build_autoencoder

    _one_rank_megatron_group()
    with torch.device("meta"):
        model = build_autoencoder(cfg.autoencoder, perform_initialization=False)
    return {"params_total": _numel(model)}


def count_calm(cfg: Config) -> Dict[str, int]:
    """Stage calm: the CALM with its frozen autoencoder, built on the meta device."""
    from calm_megatron.models.autoencoder import build_autoencoder
    from calm_megatron.models.calm import build_calm

    _one_rank_megatron_group()
    with torch.device("meta"):
        autoencoder = build_autoencoder(cfg.autoencoder, perform_initialization=False)
        model = build_calm(cfg.model, autoencoder, perform_initialization=False)
    return {"params_total": _numel(model), "params_excluding_autoencoder": _numel(model) - _numel(autoencoder)}


def count_ar(cfg: Config) -> Dict[str, int]:
    """Stage ar: the autoregressive baseline, built on the meta device."""
    from calm_megatron.models.ar import build_ar

    _one_rank_megatron_group()
    with torch.device("meta"):
        model = build_ar(cfg.model, perform_initialization=False)
    return {"params_total": _numel(model)}


COUNTERS: Dict[str, Callable[[Config], Dict[str, int]]] = {
    "ae": count_autoencoder,
    "calm": count_calm,
    "ar": count_ar,
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    cfg = load(argv[0], argv[1:])
    counter = COUNTERS.get(cfg.run.stage)
    if counter is None:
        print(f"no parameter counter for run.stage={cfg.run.stage!r} (known: {', '.join(COUNTERS)})",
              file=sys.stderr)
        return 2
    try:
        for key, value in counter(cfg).items():
            print(f"{key}={value}")
    finally:
        _teardown_owned_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
