#!/usr/bin/env python
"""BrierLM of a CALM or baseline given as our checkpoint (any layout) or as a Hugging Face folder.

Both are loaded into our model classes on one process (TP=1) and scored with the trainer's
estimators (calm_megatron/metrics/evaluate.py): a checkpoint and its export give the same numbers
with the same seed. Prints JSON: brierlm (x100), brier1..4, positions scored.

usage: tools/eval_brier.py --model RUN_STEP_OR_HF_DIR [--data HELD_OUT_SHARDS] [--batches N]
"""
import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="our step/checkpoints/run folder, or an HF folder")
    parser.add_argument("--data", help="held-out MDS shard folder (default: the run's data.valid)")
    parser.add_argument("--batches", type=int, default=0, help="batches to score (0: the whole held-out set)")
    parser.add_argument("--batch-size", type=int, default=1, help="blocks per batch")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the sampling")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from calm_megatron.hf import HFFormatError
    from calm_megatron.hf.brier import evaluate_brier
    from calm_megatron.training.checkpoint import CheckpointError

    from calm_megatron.cli import exit_status

    def work() -> int:
        result = evaluate_brier(args.model, args.data, args.batch_size, args.batches or None, args.seed)
        print(json.dumps(result, indent=1))
        return 0

    return exit_status(work, CheckpointError, HFFormatError, ValueError)


if __name__ == "__main__":
    sys.exit(main())
