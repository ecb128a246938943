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

An optimizer step costs the same whatever the batch (AdamW over every parameter, DeepSpeed's gradient
bucket flattening), so at the few hundred tokens per step a CPU affords it weighs far more than at the
paper's 2M-token batches. The bench times it apart (DeepSpeed's allreduce_gradients and step) and
prints three figures per model: tokens/s of whole steps at the bench batch, tokens/s of the
forward+backward work alone, and the projection to a 2,097,152-token step (per-token work x tokens
+ the measured fixed cost). The projection is what a training run sees.

On CPU the bench re-executes itself with glibc's malloc told to keep freed memory (bench/_malloc.py;
--system-malloc keeps the defaults): otherwise every backward maps a fresh
525 MB dense gradient of the 128,257 x 1,024 input embedding and zero-fills it page fault by page
fault (0.65 s per micro-batch, measured), a CPU artefact that a GPU memset does not have.

usage: .venv/bin/python bench/train_throughput.py [--shapes tiny,m] [--steps 4] [--seq-len-m 256]
                                                 [--micro-batch 2] [--accumulate 4]
"""
import argparse
import json
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

from _malloc import reexec_with_retained_malloc  # noqa: E402
from calm_megatron import config as C, distributed, flops  # noqa: E402
from calm_megatron.training.trainer import Trainer  # noqa: E402

SHAPES = {"tiny": ("configs/calm/tiny.yaml", "configs/ar/tiny.yaml"),
          "m": ("configs/calm/m.yaml", "configs/ar/m.yaml")}


def load_config(path: str, seq_len: int, micro_batch: int, accumulate: int, precision: str) -> C.Config:
    save = tempfile.mkdtemp(prefix="bench_throughput_")
    overrides = [f"train.seq_len={seq_len}", f"train.micro_batch_size={micro_batch}",
                 f"train.global_batch_size={micro_batch * accumulate}", f"train.precision={precision}",
                 "optim.warmup_steps=0",
                 "logging.wandb_mode=disabled", "train.progress_bar=false", f"checkpoint.save={save}",
                 "parallel.zero_stage=0"]
    if "calm" in Path(path).parts:  # a random frozen AE of the configured size: the same cost
        overrides.append(f"model.autoencoder_checkpoint={C.RANDOM_AUTOENCODER}")
    return C.load(path, overrides)


def random_batches(vocab: int, shape, seed: int):
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randint(4, vocab, shape, generator=gen).to(distributed.device())


PAPER_BATCH_TOKENS = 2_097_152  # calm-spec 5.4


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_fixed_costs(engine, seconds: dict) -> None:
    """Accumulate the wall time of the engine's per-step work (gradient reduction, optimizer step) into
    seconds["fixed"], by wrapping the two methods on this engine instance."""
    for name in ("allreduce_gradients", "step"):
        original = getattr(engine, name)

        def timed(*args, _original=original, **kwargs):
            _sync()
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                _sync()
                seconds["fixed"] += time.perf_counter() - start
        setattr(engine, name, timed)


def timed_step(trainer) -> float:
    _sync()
    start = time.perf_counter()
    trainer.train_step()
    trainer.step += 1
    _sync()
    return time.perf_counter() - start


def bench_shape(shape: str, seq_len: int, micro_batch: int, accumulate: int, steps: int, precision: str,
                layout) -> dict:
    cfgs = {name: load_config(path, seq_len, micro_batch, accumulate, precision)
            for name, path in zip(("calm", "ar"), SHAPES[shape])}
    trainers = {name: Trainer(cfg, layout, batches=random_batches(cfg.model.vocab_size, (micro_batch, seq_len), 0))
                for name, cfg in cfgs.items()}
    seconds = {name: {"total": 0.0, "fixed": 0.0} for name in trainers}
    for name, trainer in trainers.items():  # warm-up: allocator, DeepSpeed's first step
        timed_step(trainer)
        time_fixed_costs(trainer.engine, seconds[name])
    for _ in range(steps):
        for name, trainer in trainers.items():
            seconds[name]["total"] += timed_step(trainer)
    tokens = steps * accumulate * micro_batch * seq_len
    model_flops = {name: flops.training_flops_per_token(cfg) for name, cfg in cfgs.items()}
    row = {"shape": shape, "seq_len": seq_len, "micro_batch": micro_batch, "accumulate": accumulate,
           "flops_ratio": model_flops["ar"] / model_flops["calm"]}
    for name, sec in seconds.items():
        per_token = (sec["total"] - sec["fixed"]) / tokens
        fixed_per_step = sec["fixed"] / steps
        row[name] = {"tokens_per_s": tokens / sec["total"], "fwd_bwd_tokens_per_s": 1 / per_token,
                     "fixed_s_per_step": fixed_per_step,
                     "paper_batch_tokens_per_s": PAPER_BATCH_TOKENS / (PAPER_BATCH_TOKENS * per_token + fixed_per_step),
                     "gflops_per_token": model_flops[name] / 1e9}
    for key in ("tokens_per_s", "fwd_bwd_tokens_per_s", "paper_batch_tokens_per_s"):
        row[f"ratio_{key}"] = row["calm"][key] / row["ar"][key]
    for name, label in (("calm", "CALM    "), ("ar", "baseline")):
        r = row[name]
        print(f"{shape:4s} seq {seq_len} x {micro_batch} x {accumulate}  {label} {r['tokens_per_s']:9.1f} tok/s per step | "
              f"fwd+bwd {r['fwd_bwd_tokens_per_s']:9.1f} tok/s + {r['fixed_s_per_step']:.2f} s fixed per step | "
              f"at a 2M-token step {r['paper_batch_tokens_per_s']:9.1f} tok/s "
              f"({r['gflops_per_token']:.3f} GFLOP/token, {r['paper_batch_tokens_per_s'] * r['gflops_per_token'] / 1e3:.3f}"
              f" TFLOP/s)", flush=True)
    print(f"{shape:4s} CALM / baseline: {row['ratio_tokens_per_s']:.2f}x per bench step, "
          f"{row['ratio_fwd_bwd_tokens_per_s']:.2f}x fwd+bwd, {row['ratio_paper_batch_tokens_per_s']:.2f}x at a "
          f"2M-token step; {row['flops_ratio']:.2f}x by model FLOPs", flush=True)
    del trainers
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="tiny,m", help="comma-separated: tiny, m")
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps per model (after one warm-up)")
    parser.add_argument("--seq-len-tiny", type=int, default=256, help="tokens per sequence at the tiny shapes")
    parser.add_argument("--seq-len-m", type=int, default=256,
                        help="tokens per sequence at the paper-M shapes (the paper: 2048 for AR, 8192 for CALM)")
    parser.add_argument("--micro-batch", type=int, default=2, help="sequences per micro-batch")
    parser.add_argument("--accumulate", type=int, default=4,
                        help="micro-batches per optimizer step (gradient accumulation): a bigger measured step")
    parser.add_argument("--json", default="", help="also write the rows here")
    parser.add_argument("--system-malloc", action="store_true", help="CPU: keep glibc's default malloc settings")
    parser.add_argument("--precision", default="", help="fp32 | bf16 (default: bf16 on a GPU, fp32 on CPU)")
    args = parser.parse_args()
    malloc = reexec_with_retained_malloc(skip=args.system_malloc or torch.cuda.is_available())
    precision = args.precision or ("bf16" if torch.cuda.is_available() else "fp32")
    layout = distributed.init(1, 1, seed=0)
    print(f"device {distributed.device()} | torch threads {torch.get_num_threads()} | {precision} | {malloc} | "
          f"{args.steps} timed steps per model, alternating, after 1 warm-up", flush=True)
    rows = []
    try:
        for shape in args.shapes.split(","):
            seq_len = args.seq_len_m if shape == "m" else args.seq_len_tiny
            rows.append(bench_shape(shape, seq_len, args.micro_batch, args.accumulate, args.steps, precision, layout))
    finally:
        distributed.teardown()
    for row in rows:
        if row["shape"] == "m":
            ratio = row["ratio_paper_batch_tokens_per_s"]
            print(f"target (paper-M shapes, a 2M-token step): CALM >= 2.5x the baseline's training tokens/s: "
                  f"{ratio:.2f}x {'met' if ratio >= 2.5 else 'MISSED'} (per bench step "
                  f"{row['ratio_tokens_per_s']:.2f}x; by FLOPs {row['flops_ratio']:.2f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
