"""Data for calm-megatron: the demo corpus, tokenizers, tokenized MDS shards and the streaming loaders.

This package knows no model: it turns text into fixed-length blocks of token ids and back, and streams them
from local folders or S3-compatible object storage (`s3://bucket/prefix`).

    tokenizer.py       sentencepiece / Hugging Face tokenizers behind one interface
    shards.py          packing documents into blocks and writing MDS shards (local or s3://)
    shard_read.py      reading and checking shard folders: calm_index.json, hashes, direct block reads
    storage.py         local files and s3:// objects with bounded retries and clear errors
    streams.py         stream mixtures, node-local caches, Streaming's Stream on our storage layer
    readers.py         which ranks read which samples (explicit dp_rank/dp_size), Streaming scoped to them
    loader.py          the training loader (exact resume, failures as errors) and evaluation batches
    errors.py          DataLoaderError and its subclasses (`resumable` says: exit 75 and requeue, or not)
"""
