#!/usr/bin/env python
"""Tokenize text into MDS shards of fixed-length blocks for calm-megatron.

Inputs: .jsonl/.ndjson files (one document per line, text in --text-key) or plain text files (one document
per file, or with --txt-mode blank-line one document per blank-line separated paragraph).

Packing: "ae" for the autoencoder (EOS per document, PAD to a multiple of --chunk-size, last block padded),
"lm" for CALM and the AR baseline (BOS per document, no EOS, remainder dropped).

Output: a local folder, or s3://bucket/prefix on any S3-compatible store (endpoint from S3_ENDPOINT_URL,
credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY; the bucket must exist). Shards are zstd-compressed
with xxh64 hashes; calm_index.json (tokenizer, vocab size, K, block length, counts) is written last, so a
folder or prefix without it is never taken for a dataset.

Examples:
  tools/prepare_data.py --input data/demo/corpus/train.jsonl --tokenizer data/demo/tokenizer/spm512.model \\
      --out data/demo/shards/ae/train --packing ae --chunk-size 2 --seq-len 256
  S3_ENDPOINT_URL=http://127.0.0.1:8333 tools/prepare_data.py --input corpus/*.jsonl --tokenizer tok.json \\
      --out s3://calm/lm/train --packing lm --chunk-size 4 --seq-len 8192 --workers 16

Exit codes: 0 done, 2 bad input or arguments, 1 the store failed.
"""
import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calm_megatron.data.errors import DataLoaderError  # noqa: E402
from calm_megatron.data.shards import InputError, TXT_MODES, validate_inputs, write_shards  # noqa: E402
from calm_megatron.data.tokenizer import resolve_tokenizer_file  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, metavar="FILE", help="jsonl or text files")
    parser.add_argument("--tokenizer", required=True, help="sentencepiece .model or HF tokenizer.json")
    parser.add_argument("--out", required=True, help="output shard folder: a local path or s3://bucket/prefix")
    parser.add_argument("--packing", required=True, choices=["ae", "lm"])
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="K tokens per chunk: required for ae; for lm only checks seq_len %% K == 0")
    parser.add_argument("--seq-len", type=int, required=True, help="tokens per block (a multiple of K)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="tokenizer processes (default: min(8, CPUs))")
    parser.add_argument("--text-key", default="text", help="jsonl field holding the text (default: text)")
    parser.add_argument("--txt-mode", default="file", choices=TXT_MODES,
                        help="plain text: one document per file (default) or per blank-line paragraph")
    parser.add_argument("--shard-mb", type=float, default=64,
                        help="uncompressed shard size limit in MB (default 64)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder or prefix")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        validate_inputs(args.input)
        resolve_tokenizer_file(args.tokenizer)
        if args.packing == "ae" and not args.chunk_size:
            raise InputError("--packing ae needs --chunk-size K")
    except (InputError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        index = write_shards(args.input, args.tokenizer, args.out, args.packing, args.seq_len,
                             chunk_size=args.chunk_size, workers=args.workers, text_key=args.text_key,
                             txt_mode=args.txt_mode, size_limit=max(1, int(args.shard_mb * (1 << 20))),
                             overwrite=args.overwrite,
                             progress=not args.no_progress)
    except DataLoaderError as err:  # the store: unreachable, denied, missing bucket (names the endpoint)
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (ValueError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.out}: {index['num_samples']:,} blocks of {index['seq_len']} tokens "
          f"({index['num_tokens']:,} tokens: {index['num_text_tokens']:,} text, {index['num_pad_tokens']:,} pad, "
          f"{index['num_dropped_tokens']:,} dropped) from {index['num_documents']:,} documents "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
