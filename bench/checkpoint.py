#!/usr/bin/env python
"""Checkpoint save/load time of our sharded, verified format vs a plain torch.save of the same tensors.

One process (gloo), a DeepSpeed engine after one AdamW step, for the tiny AE and a ~100M-parameter AE.
Prints one line per model and the ratios, measured side by side in one run.

usage: .venv/bin/python bench/checkpoint.py [--out /tmp/ckpt_bench]
"""
import argparse
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402

from calm_megatron import config as C, distributed  # noqa: E402
from calm_megatron.training import checkpoint  # noqa: E402
from calm_megatron.training.engine import create_engine  # noqa: E402
from calm_megatron.training.stages import stage_for  # noqa: E402

MODELS = {
    "ae-tiny": ["autoencoder.vocab_size=4096"],
    "ae-100M": ["autoencoder.vocab_size=128257", "autoencoder.hidden_size=768",
                "autoencoder.intermediate_size=2048", "autoencoder.latent_size=128"],
}


def _timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench(name, overrides, out: Path, layout):
    cfg = C.load("configs/ae/tiny.yaml", overrides + ["train.seq_len=16", "train.micro_batch_size=1",
                                                      "train.global_batch_size=1", f"checkpoint.save={out / name}"])
    stage = stage_for(cfg)
    engine = create_engine(stage.build(), cfg, layout.dp, stage.no_decay)
    tokens = torch.randint(0, cfg.autoencoder.vocab_size, (1, 16))
    engine.backward(engine(tokens).loss)
    engine.step()
    params = sum(p.numel() for p in engine.module.parameters())
    state = {"step": 1, "tokens_seen": 16, "lr_scheduler": engine.lr_scheduler.state_dict(), "loader": None,
             "layout": {"tp": 1, "pp": 1, "dp": 1}, "losses": {}}
    ours_save = _timed(lambda: checkpoint.save(state, engine, cfg, layout))
    step = checkpoint.step_dir(cfg.save_dir, 1)
    ours_load = _timed(lambda: checkpoint.load(step, engine, cfg, layout))
    plain = {"model": engine.module.state_dict(),
             "optim": {f"{k}/{n}": checkpoint.safe_full(p, k) for n, p in engine.module.named_parameters()
                       for k in ("exp_avg", "exp_avg_sq")}}
    target = out / f"{name}.pt"
    plain_save = _timed(lambda: torch.save(plain, target))
    plain_load = _timed(lambda: torch.load(target, weights_only=True))
    size = sum(p.stat().st_size for p in step.rglob("*") if p.is_file()) / 2 ** 20
    print(f"{name:8s} params={params / 1e6:7.1f}M  ours: save {ours_save:6.2f}s load {ours_load:6.2f}s "
          f"({size:.0f} MiB, checksummed)  torch.save: save {plain_save:6.2f}s load {plain_load:6.2f}s  "
          f"ratio save {ours_save / plain_save:4.2f}x load {ours_load / plain_load:4.2f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/ckpt_bench")
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    layout = distributed.init(1, 1, seed=0)
    try:
        for name, overrides in MODELS.items():
            bench(name, overrides, out, layout)
    finally:
        distributed.teardown()
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
