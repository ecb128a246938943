#!/usr/bin/env python
"""The end-to-end demo (what `make demo` runs): corpus, tokenizer, shards, autoencoder, CALM and the
baseline, BrierLM of both, a sample from each, both exported to Hugging Face format (validated),
summary.json."""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calm_megatron.demo import run_demo  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="runs/demo", help="where runs and summary.json go")
    parser.add_argument("--data", default="data/demo", help="where corpus, tokenizer and shards go")
    parser.add_argument("--ae", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides for the autoencoder run (e.g. train.steps=200)")
    parser.add_argument("--calm", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for the CALM run")
    parser.add_argument("--ar", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for the baseline run")
    args = parser.parse_args()
    run_demo(Path(args.out), Path(args.data), args.ae, args.calm, args.ar)


if __name__ == "__main__":
    main()
