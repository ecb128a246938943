"""Data for calm-megatron: the demo corpus, tokenizers, tokenized MDS shards and the streaming loaders.

This package knows no model: it turns text into fixed-length blocks of token ids and back.
"""
