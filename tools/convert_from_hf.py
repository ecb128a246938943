#!/usr/bin/env python
"""Import a Hugging Face folder (reference Autoencoder or EnergyTransformer, or Llama) into our checkpoints.

Writes OUT/step_00000000 (+ OUT/latest) at the requested TP/PP layout, loadable by the trainer for
evaluation or continued pretraining (weights only):
  python -m calm_megatron.train OUT/step_00000000/config.yaml data.train=... \\
      checkpoint.load=OUT checkpoint.finetune=true
A CALM folder also gives OUT/autoencoder (its frozen autoencoder as a stage-1 step), which the
written config names in model.autoencoder_checkpoint. The reference state dict may list the CALM
head under mlp_generator.* and/or generative_head.*; pickled .bin weights are read with
weights_only=True only.

usage: tools/convert_from_hf.py --hf DIR --out CHECKPOINT [--tp N] [--pp M]
"""
import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", required=True, help="Hugging Face model folder")
    parser.add_argument("--out", required=True, help="checkpoints folder to write (must be empty unless --overwrite)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the written shards")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of the written shards")
    parser.add_argument("--ae", help="CALM: the autoencoder folder, if ae_path does not resolve locally")
    parser.add_argument("--te-names", action="store_true",
                        help="name the fused norms as Transformer Engine's layer spec does (runs with TE)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from calm_megatron.hf import HFFormatError, import_hf

    from calm_megatron.cli import exit_status

    def work() -> int:
        step = import_hf(args.hf, args.out, args.tp, args.pp, te_names=args.te_names, ae_folder=args.ae,
                         overwrite=args.overwrite, progress=not args.no_progress)
        print(f"wrote {step}")
        return 0

    return exit_status(work, HFFormatError, FileExistsError, ValueError)


if __name__ == "__main__":
    sys.exit(main())
