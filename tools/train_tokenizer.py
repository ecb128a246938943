#!/usr/bin/env python
"""Train a lossless sentencepiece tokenizer (byte fallback, identity normalization; ids unk 0, bos 1, eos 2,
pad 3) on jsonl ({"text": ...} per line) or plain text files. Writes OUT_PREFIX.model and OUT_PREFIX.vocab.

Example: tools/train_tokenizer.py --input data/demo/corpus/train.jsonl --out-prefix data/demo/tokenizer/spm512 \\
             --vocab-size 512
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calm_megatron.data.tokenizer import iter_text_lines, round_trip_ok, train_sentencepiece  # noqa: E402

ROUND_TRIP_PROBE = "Tab\there,  two spaces\n\nnew lines, 12345 digits, unicode: é ß 日本 🙂, end."


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, metavar="FILE", help="jsonl or text files")
    parser.add_argument("--out-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    parser.add_argument("--vocab-size", type=int, required=True, help="e.g. 4096")
    parser.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    parser.add_argument("--text-key", default="text", help="jsonl field holding the text (default: text)")
    parser.add_argument("--max-sentences", type=int, default=400_000,
                        help="lines sampled for training (bounds the time; default 400000)")
    args = parser.parse_args(argv)
    for path in args.input:
        if not Path(path).is_file() or Path(path).stat().st_size == 0:
            print(f"error: input {path} is missing or empty", file=sys.stderr)
            return 2
    if args.vocab_size < 300:
        print(f"error: --vocab-size {args.vocab_size} is too small (byte fallback alone takes 260 ids)",
              file=sys.stderr)
        return 2
    start = time.perf_counter()
    tokenizer = train_sentencepiece(args.input, args.out_prefix, args.vocab_size, model_type=args.model_type,
                                    max_sentences=args.max_sentences, text_key=args.text_key)
    seconds = time.perf_counter() - start
    sample = next(iter_text_lines(args.input, args.text_key), "")
    exact = round_trip_ok(tokenizer, ROUND_TRIP_PROBE) and round_trip_ok(tokenizer, sample)
    print(f"{tokenizer.path}: vocab size {tokenizer.vocab_size}, bos {tokenizer.bos_id}, eos {tokenizer.eos_id}, "
          f"pad {tokenizer.pad_id}, fingerprint {tokenizer.fingerprint}, trained in {seconds:.1f} s")
    print(f"round trip: {'exact' if exact else 'NOT EXACT'}")
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
