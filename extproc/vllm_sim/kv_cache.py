"""Paged KV cache with automatic prefix caching, modelled on vLLM v1's block pool.

Full blocks are named by a chained hash (previous block's hash + this block's token ids, salted
with the LoRA adapter), so two prompts share cached blocks exactly as far as their token
prefixes agree. Blocks held by running sequences are pinned; freed blocks keep their hash and
sit in an LRU free queue until a new allocation needs them, which is when they are evicted.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from dataclasses import dataclass

from .sequence import Sequence

_ROOT_HASH = 0x5EED


@dataclass(frozen=True, slots=True)
class CacheLookup:
    """Result of matching a sequence against the prefix cache."""

    hit_blocks: tuple[int, ...]
    num_cached_tokens: int


class KVCacheManager:
    """Allocates ``num_blocks`` blocks of ``block_size`` tokens to sequences."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_count = [0] * num_blocks
        self._block_hash: list[int | None] = [None] * num_blocks
        self._cached: dict[int, int] = {}
        # Unreferenced blocks, least recently freed first: allocation evicts from the head.
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))

    # -- queries -------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks not referenced by any sequence (cached-but-unused blocks count as free)."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks holding a reusable prefix (referenced or not)."""
        return len(self._cached)

    @property
    def usage(self) -> float:
        """Fraction of blocks pinned by running sequences, as vLLM v1 reports it."""
        return self.num_used_blocks / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def lookup(self, seq: Sequence) -> CacheLookup:
        """The longest cached prefix of ``seq``; never the whole sequence, because the last
        token must be computed to produce logits (vLLM's rule)."""
        if not self.enable_prefix_caching:
            return CacheLookup((), 0)
        max_blocks = (seq.num_tokens - 1) // self.block_size
        self._extend_hashes(seq, max_blocks)
        hits: list[int] = []
        for block_hash in seq.block_hashes[:max_blocks]:
            block = self._cached.get(block_hash)
            if block is None:
                break
            hits.append(block)
        return CacheLookup(tuple(hits), len(hits) * self.block_size)

    # -- allocation ----------------------------------------------------------------------------

    def allocate(self, seq: Sequence, found: CacheLookup) -> bool:
        """Give ``seq`` its cached prefix plus fresh blocks for the rest; False if short."""
        needed = self.blocks_for(seq.num_tokens) - len(found.hit_blocks)
        reusable_free = sum(1 for b in found.hit_blocks if self._ref_count[b] == 0)
        if needed > len(self._free) - reusable_free:
            return False
        for block in found.hit_blocks:
            self._take(block)
        seq.block_ids = list(found.hit_blocks)
        seq.num_registered_blocks = len(found.hit_blocks)
        seq.block_ids.extend(self._pop_free() for _ in range(needed))
        seq.num_cached_tokens = found.num_cached_tokens
        self.register_full_blocks(seq)
        return True

    def grow(self, seq: Sequence) -> bool:
        """Make room for ``seq.num_tokens`` tokens; False when no free block is left."""
        needed = self.blocks_for(seq.num_tokens) - len(seq.block_ids)
        if needed > len(self._free):
            return False
        seq.block_ids.extend(self._pop_free() for _ in range(needed))
        return True

    def register_full_blocks(self, seq: Sequence) -> None:
        """Publish every newly filled block of ``seq`` in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        full = min(seq.num_tokens // self.block_size, len(seq.block_ids))
        if full <= seq.num_registered_blocks:
            return
        self._extend_hashes(seq, full)
        for index in range(seq.num_registered_blocks, full):
            block_hash = seq.block_hashes[index]
            block = seq.block_ids[index]
            if block_hash not in self._cached and self._block_hash[block] is None:
                self._cached[block_hash] = block
                self._block_hash[block] = block_hash
        seq.num_registered_blocks = full

    def free(self, seq: Sequence) -> None:
        """Unpin ``seq``'s blocks; they stay cached, tail blocks first in line for eviction."""
        for block in reversed(seq.block_ids):
            self._ref_count[block] -= 1
            if self._ref_count[block] == 0:
                self._free[block] = None
        seq.block_ids = []
        seq.num_registered_blocks = 0

    def reset_prefix_cache(self) -> bool:
        """Forget every unreferenced cached block (vLLM's ``/reset_prefix_cache``)."""
        if self.num_used_blocks:
            return False
        self._cached.clear()
        self._block_hash = [None] * self.num_blocks
        return True

    # -- internals -----------------------------------------------------------------------------

    def _take(self, block: int) -> None:
        if self._ref_count[block] == 0:
            del self._free[block]
        self._ref_count[block] += 1

    def _pop_free(self) -> int:
        block, _ = self._free.popitem(last=False)
        old_hash = self._block_hash[block]
        if old_hash is not None:
            del self._cached[old_hash]
            self._block_hash[block] = None
        self._ref_count[block] = 1
        return block

    def _extend_hashes(self, seq: Sequence, upto_blocks: int) -> None:
        hashes = seq.block_hashes
        if len(hashes) >= upto_blocks:
            return
        size = self.block_size
        tokens = seq.token_ids()
        previous = hashes[-1] if hashes else _root_hash(seq.lora)
        for index in range(len(hashes), upto_blocks):
            previous = hash((previous, *tokens[index * size : (index + 1) * size]))
            hashes.append(previous)


def _root_hash(lora: str | None) -> int:
    """Chain seed: adapters never share KV with the base model or each other."""
    return _ROOT_HASH if lora is None else zlib.crc32(lora.encode()) ^ _ROOT_HASH
