"""Prefix-aware routing: tokenizers, block hashing, and the index of what each pod caches."""
