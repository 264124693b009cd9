"""Cutting a tokenised prompt into fixed blocks and hashing each one, chained.

Block ``i``'s hash is xxhash64 of its bytes seeded with block ``i-1``'s hash (block 0 is seeded
per model), so a hash stands for the whole prefix up to and including its block: two prompts
share block ``i``'s hash only if they share every token before it. The trailing partial block is
dropped, as an inference engine only caches full blocks.

Tokens arrive as a packed byte stream with a fixed width per token (1 byte for the ``character``
tokenizer, 4 for token ids), so the hashing loop is slicing and one C call per block.
"""

from __future__ import annotations

from functools import lru_cache

import xxhash


@lru_cache(maxsize=4096)
def model_seed(model: str) -> int:
    """Per-model seed: the same prompt on two models must not look like one cache entry."""
    return xxhash.xxh64_intdigest(model.encode())


def block_hashes(stream: bytes, token_width: int, block_tokens: int, model: str) -> list[int]:
    """Chained hashes of every full block of ``block_tokens`` tokens in ``stream``."""
    step = token_width * block_tokens
    count = len(stream) // step
    if count == 0:
        return []
    hashes = [0] * count
    digest = xxhash.xxh64_intdigest
    view = memoryview(stream)
    previous = model_seed(model)
    offset = 0
    for index in range(count):
        previous = digest(view[offset : offset + step], previous)
        hashes[index] = previous
        offset += step
    return hashes
