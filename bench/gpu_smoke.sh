#!/usr/bin/env bash
# GPU smoke test: train the paper-size CALM-M (configs/calm/m.yaml: 16 layers, d=1024, K=4, N=8 head
# samples, M=100 targets, 8192-token sequences) in bf16 on one GPU for a few dozen steps on synthetic
# tokens, with a random frozen paper-size autoencoder, through the real Trainer (DeepSpeed ZeRO-1,
# Megatron-Core backbone, selective recompute), and print tokens/s and MFU.
#
# MFU uses CALM-aware model FLOPs per token (calm-spec 5.2): per chunk of K tokens, 3 x (2 x (backbone
# + input compression) + 2 x N x energy head + 4 x layers x context x d attention) for forward+backward,
# plus 2 x the frozen AE encoder (forward only, it makes the targets) and the energy loss; divided by K.
# Recomputation is not counted (model FLOPs, not hardware FLOPs).
#
# usage: bench/gpu_smoke.sh [STEPS=30] [MICRO_BATCH=4] [PEAK_TFLOPS=989] [PYTHON=.venv/bin/python]
#        (environment variables). Exits 0 with a message where no CUDA GPU is available.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_smoke: no CUDA GPU is available here (torch.cuda.is_available() is False); nothing to measure."
  exit 0
fi

export STEPS=${STEPS:-30} MICRO_BATCH=${MICRO_BATCH:-4} PEAK_TFLOPS=${PEAK_TFLOPS:-989}
export WANDB_MODE=disabled PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" - <<'EOF'
import os, tempfile, time

import torch

from calm_megatron import config as C, distributed, flops
from calm_megatron.models.calm import count_parameters_calm
from calm_megatron.training.trainer import Trainer

steps, micro, peak = int(os.environ["STEPS"]), int(os.environ["MICRO_BATCH"]), float(os.environ["PEAK_TFLOPS"]) * 1e12
warmup = min(5, steps // 3)
save = tempfile.mkdtemp(prefix="gpu_smoke_")
cfg = C.load("configs/calm/m.yaml", [f"train.steps={steps}", f"train.micro_batch_size={micro}",
                                     f"train.global_batch_size={micro}", "optim.warmup_steps=0",
                                     "logging.wandb_mode=disabled", "train.progress_bar=false",
                                     f"checkpoint.save={save}", "model.autoencoder_checkpoint=random"])  # a random AE: same cost
C.validate(cfg, 1, check_files=False)
layout = distributed.init(1, 1, cfg.run.seed)
T, V = cfg.train.seq_len, cfg.model.vocab_size


def batches():
    while True:
        yield torch.randint(0, V, (micro, T), device="cuda")


trainer = Trainer(cfg, layout, batches=batches())
flops_per_token = flops.training_flops_per_token(cfg)  # calm-spec 5.2, see calm_megatron/flops.py
counts = count_parameters_calm(cfg.model)
print(f"gpu_smoke: {torch.cuda.get_device_name()} | CALM-M {counts.total_excluding_autoencoder / 1e6:.1f}M params "
      f"(+ frozen AE) | {cfg.train.precision} | micro-batch {micro} x {T} tokens | {flops_per_token / 1e9:.2f} GFLOPs/token", flush=True)
times = []
for step in range(steps):
    torch.cuda.synchronize()
    start = time.perf_counter()
    result = trainer.train_step()
    trainer.step += 1
    torch.cuda.synchronize()
    times.append(time.perf_counter() - start)
    if step % 5 == 0 or step == steps - 1:
        print(f"step {step + 1}/{steps} loss {result.loss:.4f} grad_norm {result.grad_norm:.3f} "
              f"{times[-1]:.3f}s", flush=True)
timed = times[warmup:]
tokens_per_s = len(timed) * micro * T / sum(timed)
mfu = flops_per_token * tokens_per_s / peak
print(f"gpu_smoke: {tokens_per_s:,.0f} tokens/s | MFU {100 * mfu:.1f}% of {peak / 1e12:.0f} TFLOP/s | "
      f"{sum(timed) / len(timed):.3f} s/step over {len(timed)} steps | peak memory "
      f"{torch.cuda.max_memory_allocated() / 2 ** 30:.1f} GiB", flush=True)
distributed.teardown()
EOF
