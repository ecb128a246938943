#!/usr/bin/env python
"""Training throughput: CALM (K=4) vs the autoregressive baseline on the same backbone, side by side.

For each shape (tiny: configs/calm/tiny.yaml + configs/ar/tiny.yaml; m: CALM-M + Transformer-M at
vocab 128,257 with the sequence shortened so a step fits a CPU), both models are trained through the
real Trainer (DeepSpeed engine, Megatron-Core layers, AdamW) on the same random token batches, with a
random frozen autoencoder of the configured size standing in for a trained one (the cost is the
same). Steps of the two models alternate after a warm-up, so that load from other processes hits
both alike. Prints tokens/s of each, the measured ratio, and the ratio of model FLOPs per token
(calm-spec 5.2, calm_megatron/flops.py) that the measured ratio should approach where the hardware
runs both at the same efficiency.

usage: .venv/bin/python bench/train_throughput.py [--shapes tiny,m] [--steps 4] [--seq-len-m 256]
"""
import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ["WANDB_MODE"] = "disabled"
warnings.filterwarnings("ignore", module=r"(megatron|deepspeed|torch)(\.|$)")

import torch  # noqa: E402

from calm_megatron import config as C, distributed, flops  # noqa: E402

SHAPES = {"tiny": ("configs/calm/tiny.yaml", "configs/ar/tiny.yaml"),
          "m": ("configs/calm/m.yaml", "configs/ar/m.yaml")}


def load_config(path: str, seq_len: int, micro_batch: int, precision: str) -> C.Config:
    save = tempfile.mkdtemp(prefix="bench_throughput_")
    overrides = [f"train.seq_len={seq_len}", f"train.micro_batch_size={micro_batch}",
                 f"train.global_batch_size={micro_batch}", f"train.precision={precision}", "optim.warmup_steps=0",
                 "logging.wandb_mode=disabled", "train.progress_bar=false", f"checkpoint.save={save}",
                 "parallel.zero_stage=0"]
    if "calm" in Path(path).parts:
        overrides.append("model.autoencoder_checkpoint=random")  # replaced by a random AE in build_trainer
    return C.load(path, overrides)


def build_trainer(cfg: C.Config, layout, batches):
    """The real Trainer; CALM gets a random frozen autoencoder of the configured size."""
    from calm_megatron.models.autoencoder import build_autoencoder
    from calm_megatron.training import stages
    from calm_megatron.training.trainer import Trainer

    original = stages.CALMStage.load_autoencoder
    stages.CALMStage.load_autoencoder = lambda self: build_autoencoder(
        self.cfg.autoencoder, precision=self.cfg.train.precision).requires_grad_(False)
    try:
        return Trainer(cfg, layout, batches=batches)
    finally:
        stages.CALMStage.load_autoencoder = original


def random_batches(vocab: int, shape, seed: int):
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randint(4, vocab, shape, generator=gen).to(distributed.device())


def timed_step(trainer) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    trainer.train_step()
    trainer.step += 1
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_shape(shape: str, seq_len: int, micro_batch: int, steps: int, precision: str, layout) -> dict:
    cfgs = {name: load_config(path, seq_len, micro_batch, precision) for name, path in zip(("calm", "ar"), SHAPES[shape])}
    trainers = {name: build_trainer(cfg, layout, random_batches(cfg.model.vocab_size, (micro_batch, seq_len), 0))
                for name, cfg in cfgs.items()}
    seconds = {name: 0.0 for name in trainers}
    for name, trainer in trainers.items():  # warm-up: allocator, DeepSpeed's first step
        timed_step(trainer)
    for _ in range(steps):
        for name, trainer in trainers.items():
            seconds[name] += timed_step(trainer)
    tokens = steps * micro_batch * seq_len
    rate = {name: tokens / seconds[name] for name in trainers}
    model_flops = {name: flops.training_flops_per_token(cfg) for name, cfg in cfgs.items()}
    row = {"shape": shape, "seq_len": seq_len, "calm_tokens_per_s": rate["calm"], "ar_tokens_per_s": rate["ar"],
           "ratio": rate["calm"] / rate["ar"], "flops_ratio": model_flops["ar"] / model_flops["calm"],
           "calm_gflops_per_token": model_flops["calm"] / 1e9, "ar_gflops_per_token": model_flops["ar"] / 1e9,
           "calm_tflops": rate["calm"] * model_flops["calm"] / 1e12, "ar_tflops": rate["ar"] * model_flops["ar"] / 1e12}
    print(f"{shape:4s} seq {seq_len:5d} x {micro_batch}  CALM {row['calm_tokens_per_s']:9.1f} tok/s "
          f"({row['calm_gflops_per_token']:.3f} GFLOP/token, {row['calm_tflops']:.3f} TFLOP/s)  "
          f"baseline {row['ar_tokens_per_s']:9.1f} tok/s ({row['ar_gflops_per_token']:.3f} GFLOP/token, "
          f"{row['ar_tflops']:.3f} TFLOP/s)  ratio {row['ratio']:.2f}x measured, {row['flops_ratio']:.2f}x by FLOPs",
          flush=True)
    del trainers
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="tiny,m", help="comma-separated: tiny, m")
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps per model (after one warm-up)")
    parser.add_argument("--seq-len-tiny", type=int, default=256, help="tokens per sequence at the tiny shapes")
    parser.add_argument("--seq-len-m", type=int, default=256,
                        help="tokens per sequence at the paper-M shapes (the paper: 2048 for AR, 8192 for CALM)")
    parser.add_argument("--micro-batch", type=int, default=2, help="sequences per step")
    parser.add_argument("--precision", default="", help="fp32 | bf16 (default: bf16 on a GPU, fp32 on CPU)")
    args = parser.parse_args()
    precision = args.precision or ("bf16" if torch.cuda.is_available() else "fp32")
    layout = distributed.init(1, 1, seed=0)
    print(f"device {distributed.device()} | torch threads {torch.get_num_threads()} | {precision} | "
          f"{args.steps} timed steps per model, alternating, after 1 warm-up", flush=True)
    rows = []
    try:
        for shape in args.shapes.split(","):
            seq_len = args.seq_len_m if shape == "m" else args.seq_len_tiny
            rows.append(bench_shape(shape, seq_len, args.micro_batch, args.steps, precision, layout))
    finally:
        distributed.teardown()
    for row in rows:
        if row["shape"] == "m":
            verdict = "met" if row["ratio"] >= 2.5 else "MISSED"
            print(f"target (paper-M shapes): CALM >= 2.5x the baseline's training tokens/s: {row['ratio']:.2f}x "
                  f"{verdict} (by FLOPs: {row['flops_ratio']:.2f}x)")


if __name__ == "__main__":
    main()
