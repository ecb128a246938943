#!/usr/bin/env python
"""Per-rank model-state memory under ZeRO 0/1/2 at DP=1 and DP=2, measured; CALM-M at TP=1/2, counted.

Measured (gloo, fp32, AdamW): the tiny baseline model (configs/ar/tiny.yaml) in a real DeepSpeed engine
on 1 and on 2 ranks, two micro-batches of gradient accumulation. After the first backward (mid
accumulation) the gradient bytes this rank holds are counted, after the step the optimizer-state
bytes (fp32 master partitions + Adam moments), from the tensors themselves
(calm_megatron/training/memory.py). Ratios are DP=2 over DP=1 of the same ZeRO stage.

Counted (meta device, nothing allocated): the paper-size CALM-M (configs/calm/m.yaml) is built on
the meta device for one TP rank at TP=1 and TP=2; its per-rank trainable parameters give the
model-state bytes of bf16 training with fp32 master weights and Adam (2 bytes of weights, 2 of
gradients, 12 of optimizer state per parameter; ZeRO-1 divides the 12 by DP, ZeRO-2 also the 2 of
gradients). The frozen autoencoder (last stage) has weights only.

usage: .venv/bin/python bench/memory.py [--json out.json]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("OMP_NUM_THREADS", "1")

MIB, GIB = 2 ** 20, 2 ** 30
ZERO_STAGES = (0, 1, 2)
MODEL = ["train.seq_len=64", "train.micro_batch_size=2", "optim.optimizer=adamw", "optim.warmup_steps=0",
         "logging.wandb_mode=disabled", "train.progress_bar=false"]


# --------------------------------------------------------------------------- worker (under torchrun)

def _measure(zero: int, layout) -> dict:
    import torch

    from calm_megatron import config as C
    from calm_megatron.training import memory
    from calm_megatron.training.engine import create_engine
    from calm_megatron.training.stages import stage_for

    cfg = C.load(str(REPO / "configs/ar/tiny.yaml"),
                 MODEL + [f"parallel.zero_stage={zero}", f"train.global_batch_size={4 * layout.dp}"])
    C.validate(cfg, layout.world_size, check_files=False)
    stage = stage_for(cfg)
    engine = create_engine(stage.build(), cfg, layout.dp, stage.no_decay)
    gen = torch.Generator().manual_seed(layout.dp_rank)
    batches = [torch.randint(0, cfg.model.vocab_size, (2, 64), generator=gen) for _ in range(2)]
    engine.backward(engine(batches[0]).loss)
    grads = memory.gradient_bytes(engine)  # mid accumulation: what the rank keeps between micro-batches
    engine.step()
    engine.backward(engine(batches[1]).loss)
    engine.step()
    sizes = memory.model_state_bytes(engine)
    trainable = sum(p.numel() for p in engine.module.parameters() if p.requires_grad)
    del engine
    return {"params": sizes["params"], "grads": grads, "optimizer": sizes["optimizer"], "trainable": trainable}


def _meta_counts(model_overrides) -> dict:
    """Per-rank trainable and frozen parameters of CALM-M on this TP rank, built on the meta device."""
    import torch

    from calm_megatron import config as C
    from calm_megatron.models.autoencoder import build_autoencoder
    from calm_megatron.models.calm import build_calm

    cfg = C.load(str(REPO / "configs/calm/m.yaml"), model_overrides)
    with torch.device("meta"):
        ae = build_autoencoder(cfg.autoencoder, "bf16", perform_initialization=False)
        model = build_calm(cfg.model, ae, "bf16", parallel=cfg.parallel, perform_initialization=False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return {"trainable": trainable, "frozen": frozen}


def worker(spec: dict) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from calm_megatron import distributed

    layout = distributed.init(1, 1, seed=1234)
    out = {"dp": layout.dp, "zero": {z: _measure(z, layout) for z in ZERO_STAGES}}
    tp = dist.get_world_size()
    if tp > 1:
        parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    out["calm_m"] = {"tp": tp, **_meta_counts([f"parallel.tp={tp}"])}
    if layout.rank == 0:
        Path(spec["out"]).write_text(json.dumps(out))
    distributed.teardown()


# --------------------------------------------------------------------------- driver

def _launch(nproc: int, tmp: Path) -> dict:
    out = tmp / f"memory_{nproc}.json"
    spec = json.dumps({"out": str(out)})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), __file__, "--worker", spec]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    if result.returncode != 0:
        sys.exit(f"bench/memory.py: {nproc}-rank run failed:\n{result.stderr[-4000:]}")
    data = json.loads(out.read_text())
    data["zero"] = {int(k): v for k, v in data["zero"].items()}
    return data


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measured_table(one: dict, two: dict) -> list:
    lines = ["measured: baseline tiny (configs/ar/tiny.yaml), fp32 AdamW, per rank; ratio = DP=2 / DP=1",
             f"{'zero':>4} {'dp':>3} {'params MiB':>11} {'grads MiB':>10} {'optim MiB':>10} "
             f"{'params x':>9} {'grads x':>8} {'optim x':>8}"]
    for z in ZERO_STAGES:
        for data in (one, two):
            m, base = data["zero"][z], one["zero"][z]
            ratio = lambda key: m[key] / base[key] if base[key] else float("nan")  # noqa: E731
            lines.append(f"{z:>4} {data['dp']:>3} {m['params'] / MIB:>11.3f} {m['grads'] / MIB:>10.3f} "
                         f"{m['optimizer'] / MIB:>10.3f} {ratio('params'):>9.2f} {ratio('grads'):>8.2f} "
                         f"{ratio('optimizer'):>8.2f}")
    return lines


def calm_m_table(counts) -> list:
    """bf16 weights, bf16 grads, fp32 master + Adam m, v (12 bytes) per trainable parameter."""
    lines = ["counted on the meta device: CALM-M (configs/calm/m.yaml), bf16 + fp32 Adam, per rank (GiB); "
             "ratio = optimizer state vs TP=1 DP=1 ZeRO-0",
             f"{'tp':>3} {'dp':>3} {'zero':>4} {'trainable M':>12} {'frozen AE M':>12} {'params':>7} {'grads':>7} "
             f"{'optim':>7} {'total':>7} {'optim x':>8}"]
    base = None
    for c in counts:
        for dp in (1, 2, 8):
            for zero in ZERO_STAGES:
                t, f = c["trainable"], c["frozen"]
                params, grads = 2 * (t + f), 2 * t / (dp if zero >= 2 else 1)
                optim = 12 * t / (dp if zero >= 1 else 1)
                base = base or optim
                lines.append(f"{c['tp']:>3} {dp:>3} {zero:>4} {t / 1e6:>12.1f} {f / 1e6:>12.1f} {params / GIB:>7.3f} "
                             f"{grads / GIB:>7.3f} {optim / GIB:>7.3f} {(params + grads + optim) / GIB:>7.3f} "
                             f"{optim / base:>8.2f}")
    return lines


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker(json.loads(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        one, two = _launch(1, Path(tmp)), _launch(2, Path(tmp))
    lines = measured_table(one, two) + [""] + calm_m_table([one["calm_m"], two["calm_m"]])
    z1 = two["zero"][1]["optimizer"] / one["zero"][1]["optimizer"]
    lines.append(f"\nZeRO-1 optimizer state per rank at DP=2 = {z1:.3f} x DP=1 (target <= 0.55)")
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps({"dp1": one, "dp2": two, "zero1_optimizer_ratio": z1}, indent=1))


if __name__ == "__main__":
    main()
