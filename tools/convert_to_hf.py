#!/usr/bin/env python
"""Export a checkpoint of ours (any TP/PP/DP layout) as a Hugging Face folder in the reference CALM format.

  autoencoder run -> reference Autoencoder folder (trust_remote_code)
  CALM run        -> reference EnergyTransformer folder + its autoencoder in OUT/autoencoder (ae_path)
  baseline run    -> stock LlamaForCausalLM folder (no remote code)

Tensors stream one at a time from the shard files; --validate then reloads the folder through
transformers and compares outputs with our model on fixed inputs (tolerance 1e-5 relative to
max(1, |output|); KL 1e-6 for the baseline), exiting 1 if they differ.

usage: tools/convert_to_hf.py --checkpoint RUN_OR_STEP --out DIR [--dtype fp32|bf16] [--validate]
"""
import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="step directory, checkpoints folder or run folder")
    parser.add_argument("--out", required=True, help="output folder (created; must be empty unless --overwrite)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="dtype of the written weights")
    parser.add_argument("--validate", action="store_true", help="reload the folder and compare outputs with ours")
    parser.add_argument("--tokenizer", help="tokenizer to ship (default: the run's data.tokenizer)")
    parser.add_argument("--max-shard-gb", type=float, default=5.0, help="split model.safetensors past this size")
    parser.add_argument("--no-head-alias", action="store_true",
                        help="CALM: omit the generative_head.* copies of the head (the reference state dict "
                             "lists the head twice; both loaders accept either)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from calm_megatron.hf import ValidationError, export_checkpoint, validate_export
    from calm_megatron.training.checkpoint import CheckpointError

    from calm_megatron.cli import exit_status

    def work() -> int:
        folder = export_checkpoint(args.checkpoint, args.out, args.dtype, tokenizer=args.tokenizer,
                                   head_aliases=not args.no_head_alias,
                                   max_shard_bytes=int(args.max_shard_gb * 1024 ** 3), overwrite=args.overwrite,
                                   progress=not args.no_progress)
        print(f"wrote {folder}")
        if args.validate:
            try:
                results = validate_export(args.checkpoint, str(folder))
            except ValidationError as err:
                print(f"VALIDATION FAILED: {err}", file=sys.stderr)
                return 1
            print("validation passed (max |ours - hf|):")
            print(json.dumps({k: float(f"{v:.3e}") for k, v in results.items()}, indent=1))
        return 0

    return exit_status(work, CheckpointError, FileExistsError, ValueError)


if __name__ == "__main__":
    sys.exit(main())
