"""Corpora, tokenizers and memory-mapped token streams."""
