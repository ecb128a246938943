#!/usr/bin/env python
"""Generate text from a CALM or baseline checkpoint (one process, TP=1; sharded checkpoints are merged).

usage: tools/generate.py RUN [--prompt TEXT]... [--prompts-file FILE] [--temperature T] [--num-samples N]
                         [--sampler batch|exact] [--seed S] [--max-new-tokens M] [--prompt-mode force|left|pad]

RUN is a run folder, its checkpoints folder or one step folder (the latest complete step is used).
Each prompt is encoded with the run's tokenizer (data.tokenizer in its config.yaml, or --tokenizer),
BOS first as in training; each output line is the prompt followed by its continuation, and a last
line gives the generation speed in tokens/s. Temperature: T=1 is one plain draw; for CALM the batch
sampler (calm-spec 4, Algorithm 2) needs T=1/n and uses N head draws per step, the exact sampler
(Algorithm 1) takes any T in (0, 1]. Bad input (T outside (0, 1], T not 1/n for the batch sampler, an
empty prompt, a prompt longer than the context, a missing checkpoint) ends with a one-line error and
exit code 2.
"""
import argparse
import json
import os
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="run folder, checkpoints folder or step folder")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--prompts-file", help="a text file with one prompt per non-blank line")
    parser.add_argument("--tokenizer", help="tokenizer file or folder (default: data.tokenizer of the run)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0, help="in (0, 1]")
    parser.add_argument("--num-samples", type=int, default=200, help="CALM batch sampler: N head draws per step")
    parser.add_argument("--sampler", choices=("batch", "exact"), default="batch",
                        help="CALM: batch approximation (T=1/n) or exact (any T)")
    parser.add_argument("--prompt-mode", choices=("force", "left", "pad"), default="force",
                        help="CALM prompts that are not a multiple of K (see calm_megatron/generation.py)")
    parser.add_argument("--top-p", type=float, default=1.0, help="baseline: nucleus sampling")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=0, help="prompts per batch (0: all at once)")
    parser.add_argument("--no-bos", action="store_true", help="do not put BOS before each prompt")
    parser.add_argument("--no-cache", action="store_true", help="recompute every step (no KV cache)")
    parser.add_argument("--json", action="store_true", help="one JSON object per prompt, then one for the speed")
    return parser.parse_args()


def _stage_of(path: str):
    """run.stage of the checkpoint at `path` from its config.yaml alone (None when it cannot be read)."""
    from calm_megatron import config as C
    from calm_megatron.training.checkpoint import CheckpointError, resolve_step

    try:
        return C.load(str(resolve_step(path) / "config.yaml")).run.stage
    except (CheckpointError, C.ConfigError, OSError):
        return None


def _check_options(args) -> list:
    """Everything that can be refused before the model is loaded; returns the prompt texts."""
    from calm_megatron.sampling import check_temperature, inverse_temperature_integer

    check_temperature(args.temperature)
    if args.sampler == "batch" and _stage_of(args.run) != "ar":  # the baseline takes any T in (0, 1]
        inverse_temperature_integer(args.temperature)
        if args.num_samples < 1:
            raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if not 0.0 < args.top_p <= 1.0:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    texts = list(args.prompt)
    if args.prompts_file:
        texts += [line.rstrip("\n") for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
    if not texts:
        raise ValueError("no prompt: pass --prompt TEXT or --prompts-file FILE")
    for i, text in enumerate(texts):
        if not text.strip():
            raise ValueError(f"prompt {i} is empty")
    return texts


def main() -> int:
    args = _arguments()
    for library in ("megatron", "deepspeed", "torch"):  # their notices would bury the output and errors
        warnings.filterwarnings("ignore", module=rf"{library}(\.|$)")
    from calm_megatron import config as C
    from calm_megatron.cli import exit_status
    from calm_megatron.training.checkpoint import CheckpointError

    return exit_status(lambda: _generate(args, _check_options(args)),
                       ValueError, FileNotFoundError, CheckpointError, C.ConfigError)


def _generate(args, texts) -> int:
    import torch

    from calm_megatron import distributed
    from calm_megatron.generation import generate, load_model_for_inference

    loaded = load_model_for_inference(args.run, tokenizer=args.tokenizer)
    try:
        tok = loaded.tokenizer
        if tok is None:
            raise ValueError(f"no tokenizer: {loaded.step}/config.yaml names data.tokenizer="
                             f"{loaded.config.data.tokenizer!r}; pass --tokenizer")
        prompts = [([] if args.no_bos else [tok.bos_id]) + tok.encode(text) for text in texts]
        options = dict(temperature=args.temperature, num_samples=args.num_samples, sampler=args.sampler,
                       prompt_mode=args.prompt_mode, top_p=args.top_p, use_cache=not args.no_cache,
                       generator=torch.Generator(next(loaded.model.parameters()).device).manual_seed(args.seed))
        size = args.batch_size or len(prompts)
        tokens, reasons, seconds = [], [], 0.0
        for start in range(0, len(prompts), size):
            result = generate(loaded, prompts[start:start + size], args.max_new_tokens, **options)
            tokens += result.tokens
            reasons += result.finish_reasons
            seconds += result.seconds
        for text, prompt, new, reason in zip(texts, prompts, tokens, reasons):
            body = prompt[0 if args.no_bos else 1:]
            completion = tok.decode(body + new)
            if args.json:
                print(json.dumps({"prompt": text, "text": completion, "new_tokens": new, "finish_reason": reason}))
            else:
                print(completion)
        count = sum(len(t) for t in tokens)
        rate = count / max(seconds, 1e-9)
        if args.json:
            print(json.dumps({"new_tokens": count, "seconds": round(seconds, 4), "tokens_per_second": rate}))
        else:
            print(f"tokens/s: {rate:.1f} ({count} new tokens in {seconds:.2f}s; {loaded.stage}, "
                  f"{len(prompts)} prompt(s), T={args.temperature:g}"
                  + (f", {args.sampler} sampler" if loaded.stage == "calm" else "")
                  + (f", N={args.num_samples}" if loaded.stage == "calm" and args.sampler == "batch"
                     and args.temperature < 1 else "") + ")")
    finally:
        distributed.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
