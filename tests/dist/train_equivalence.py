"""Run under torchrun: train a few steps in several layouts from the same weights and data; print JSON.

Each scenario rebuilds the model with the same seed (identical full weights on every rank) and feeds
the same global batches; a data-parallel rank takes its slice, micro-batches split it further.
Used by tests/test_train_distributed.py, which compares the runs with the 1-rank reference.
"""
import json
import os
import sys

import torch

from calm_megatron import config as C
from calm_megatron import distributed
from calm_megatron.training.trainer import Trainer


def global_batches(cfg: C.Config, steps: int):
    gen = torch.Generator().manual_seed(99)
    vocab = C.model_vocab_size(cfg)
    return [torch.randint(0, vocab, (cfg.train.global_batch_size, cfg.train.seq_len), generator=gen)
            for _ in range(steps)]


def rank_micro_batches(batches, layout, micro: int):
    per_rank = batches[0].shape[0] // layout.dp
    for batch in batches:
        mine = batch[layout.dp_rank * per_rank:(layout.dp_rank + 1) * per_rank]
        yield from mine.split(micro)


def run(config_path: str, overrides, steps: int, layout) -> dict:
    cfg = C.load(config_path, overrides + ["train.progress_bar=false", "logging.wandb_mode=disabled"])
    C.validate(cfg, layout.world_size, check_files=False)
    distributed.seed_everything(cfg.run.seed, layout)
    batches = global_batches(cfg, steps)
    trainer = Trainer(cfg, layout, batches=rank_micro_batches(batches, layout, cfg.train.micro_batch_size))
    results = [trainer.train_step() for _ in range(steps)]
    return {"loss": [r.loss for r in results], "grad_norm": [r.grad_norm for r in results]}


def main() -> None:
    spec = json.loads(sys.argv[1])
    layout = distributed.init(spec.get("tp", 1), spec.get("pp", 1), seed=1234)
    out = {name: run(spec["config"], overrides, spec["steps"], layout)
           for name, overrides in spec["scenarios"].items()}
    if layout.rank == 0:
        with open(spec["out"], "w") as fh:
            json.dump(out, fh)
    distributed.teardown()


if __name__ == "__main__":
    main()
