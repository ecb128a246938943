#!/usr/bin/env python
"""Generation speed: CALM (K=4) vs the autoregressive baseline on the same backbone, side by side.

For each shape (tiny: configs/calm/tiny.yaml + configs/ar/tiny.yaml; m: CALM-M + Transformer-M,
vocab 128257), batch 1 and 8, T=1 (one plain draw / plain softmax sampling) and T=1/2 (CALM:
Algorithm 2 over N=200 head draws; baseline: softmax at T=1/2), both models continue the same
random prompts by the same number of tokens with the KV cache, in one process. Weights are random
(the CALM head's zero-initialised last layer is redrawn so that its draws differ). Prints one line
per setting with tokens/s of each model, their ratio and where the time goes, then the targets.

usage: .venv/bin/python bench/generation.py [--shapes tiny,m] [--repeats 2] [--threads N]
"""
import argparse
import os
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
warnings.filterwarnings("ignore", module=r"(megatron|deepspeed|torch)(\.|$)")

import torch  # noqa: E402

from _malloc import reexec_with_retained_malloc  # noqa: E402
from calm_megatron import config as C, distributed, generation as G  # noqa: E402

SHAPES = {  # name: (CALM config, baseline config, prompt tokens, new tokens)
    "tiny": ("configs/calm/tiny.yaml", "configs/ar/tiny.yaml", 32, 64),
    "m": ("configs/calm/m.yaml", "configs/ar/m.yaml", 32, 16),
}
SETTINGS = [(1, 1.0, 1), (1, 0.5, 200), (8, 1.0, 1), (8, 0.5, 200)]  # batch, T, N
TINY_AE = ["autoencoder.hidden_size=64", "autoencoder.intermediate_size=128", "autoencoder.latent_size=16",
           "model.latent_size=16"]


class Timers:
    """Wall time per component, by wrapping the generation internals (bench-only instrumentation)."""

    def __init__(self):
        self.seconds = defaultdict(float)
        self._saved = []

    def wrap(self, owner, name, label):
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - start
        self._saved.append((owner, name, original))
        setattr(owner, name, timed)

    def __enter__(self):
        self.wrap(G._BackboneRunner, "_run", "backbone")
        self.wrap(G._ChunkSampler, "latents", "head")
        self.wrap(G.ChunkDecoder, "token_states", "ae-body")
        self.wrap(G.ChunkDecoder, "argmax", "ae-logits")
        self.wrap(G, "lm_logits", "lm-head")
        self.wrap(G, "_sample_tokens", "softmax")
        return self

    def __exit__(self, *exc):
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)

    def describe(self, total: float) -> str:
        parts = sorted(self.seconds.items(), key=lambda kv: -kv[1])
        parts.append(("other", total - sum(self.seconds.values())))
        return " ".join(f"{k} {100 * v / total:.0f}%" for k, v in parts if v / total >= 0.02)


def build(shape: str):
    from calm_megatron.models.ar import build_ar
    from calm_megatron.models.autoencoder import build_autoencoder
    from calm_megatron.models.calm import build_calm

    calm_cfg, ar_cfg, _, _ = SHAPES[shape]
    overrides = ["train.precision=fp32"] + (TINY_AE if shape == "tiny" else [])
    cfg = C.load(calm_cfg, overrides)
    torch.manual_seed(0)
    calm = build_calm(cfg.model, build_autoencoder(cfg.autoencoder)).eval()
    with torch.no_grad():
        torch.nn.init.normal_(calm.head.final_fc2.weight, std=cfg.model.init_std)
    ar = build_ar(C.load(ar_cfg, ["train.precision=fp32"]).model).eval()
    return calm, ar


def _timed(fn, model, prompts, new_tokens, seed, **options):
    with Timers() as timers:
        result = fn(model, prompts, new_tokens, generator=torch.Generator().manual_seed(seed), **options)
    return result.tokens_per_second, timers, result


def run_pair(calm, ar, prompts, new_tokens, repeats, temperature, samples):
    """CALM and baseline runs interleaved (after one short warm-up each); the best run of each is kept,
    so that load from other processes hits both alike."""
    calm_options = dict(temperature=temperature, num_samples=samples)
    G.generate_calm(calm, prompts, min(new_tokens, 8), **calm_options)
    G.generate_ar(ar, prompts, min(new_tokens, 8), temperature=temperature)
    best_calm = best_ar = None
    for seed in range(1, repeats + 1):
        got = _timed(G.generate_calm, calm, prompts, new_tokens, seed, **calm_options)
        best_calm = got if best_calm is None or got[0] > best_calm[0] else best_calm
        got = _timed(G.generate_ar, ar, prompts, new_tokens, seed, temperature=temperature)
        best_ar = got if best_ar is None or got[0] > best_ar[0] else best_ar
    return best_calm, best_ar


def bench_shape(shape: str, repeats: int):
    calm, ar = build(shape)
    _, _, prompt_tokens, new_tokens = SHAPES[shape]
    vocab = calm.model_cfg.vocab_size
    ratios = {}
    for batch, temperature, samples in SETTINGS:
        gen = torch.Generator().manual_seed(batch)
        prompts = torch.randint(4, vocab, (batch, prompt_tokens), generator=gen).tolist()
        (calm_rate, calm_t, calm_res), (ar_rate, ar_t, ar_res) = run_pair(
            calm, ar, prompts, new_tokens, repeats, temperature, samples)
        ratio = calm_rate / ar_rate
        ratios[(batch, temperature)] = ratio
        setting = "T=1      " if temperature == 1.0 else f"T=1/{round(1 / temperature)} N={samples}"
        print(f"{shape:4s} batch {batch}  {setting}  CALM {calm_rate:8.1f} tok/s  baseline {ar_rate:8.1f} tok/s  "
              f"ratio {ratio:5.2f}x   | CALM: {calm_t.describe(calm_res.seconds)}"
              + (f", decoded {100 * calm_res.decoded_fraction:.0f}% of draws' tokens" if samples > 1 else "")
              + f" | baseline: {ar_t.describe(ar_res.seconds)}", flush=True)
    del calm, ar
    return ratios


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="tiny,m", help="comma-separated: tiny, m")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per setting (the best is kept)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--system-malloc", action="store_true",
                        help="CPU: keep glibc's default malloc (by default the bench re-executes itself with "
                             "freed memory kept, see bench/_malloc.py)")
    args = parser.parse_args()
    malloc = reexec_with_retained_malloc(skip=args.system_malloc or torch.cuda.is_available())
    if args.threads:
        torch.set_num_threads(args.threads)
    distributed.init(1, 1, seed=0, init_deepspeed=False)
    print(f"torch threads: {torch.get_num_threads()}; tokens/s = new tokens / wall time of generate() "
          f"(prefill included), best of {args.repeats}; KV cache on; fp32 weights; exact AE argmax; {malloc}", flush=True)
    try:
        results = {shape: bench_shape(shape, args.repeats) for shape in args.shapes.split(",")}
    finally:
        distributed.teardown()
    if "m" in results:
        m = results["m"]
        for (batch, temperature), target in (((1, 1.0), 3.0), ((1, 0.5), 1.5)):
            ratio = m[(batch, temperature)]
            label = "T=1" if temperature == 1.0 else "T=1/2, N=200"
            print(f"target (paper-M, batch {batch}, {label}): CALM >= {target:.1f}x the baseline: "
                  f"{ratio:.2f}x {'met' if ratio >= target else 'MISSED'}")


if __name__ == "__main__":
    main()
