"""Paged KV cache with automatic prefix caching, modelled on vLLM v1's block pool.

Full blocks are named by vLLM's own chained block hash (``extproc.kvevents.block_hash``: the
previous block's digest, this block's token ids, the LoRA adapter), so two prompts share cached
blocks exactly as far as their token prefixes agree, and the names published in KV events are
the ones a real pod would publish for the same tokens. Blocks held by running sequences are
pinned; freed blocks keep their hash and sit in an LRU free queue until a new allocation needs
them, which is when they are evicted. Like vLLM, two blocks may hold the same hash (two requests
filled equal blocks at once): each is stored, published and evicted on its own.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from extproc.kvevents.block_hash import BlockHasher, external_hash

from . import kv_events
from .sequence import Sequence


@dataclass(frozen=True, slots=True)
class CacheLookup:
    """Result of matching a sequence against the prefix cache."""

    hit_blocks: tuple[int, ...]
    num_cached_tokens: int


class KVCacheManager:
    """Allocates ``num_blocks`` blocks of ``block_size`` tokens to sequences.

    With ``record_events`` every store, eviction and reset is queued as a vLLM KV event;
    ``take_events()`` hands them over once per engine step.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        hasher: BlockHasher | None = None,
        record_events: bool = False,
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.hasher = hasher or BlockHasher("sha256", block_size)
        if self.hasher.block_size != block_size:
            raise ValueError("the hasher's block size differs from the cache's")
        self.record_events = record_events
        self._events: list[kv_events.Event] = []
        self._ref_count = [0] * num_blocks
        self._block_hash: list[bytes | None] = [None] * num_blocks
        # Digest -> blocks holding it (insertion order: lookups reuse the first).
        self._cached: dict[bytes, dict[int, None]] = {}
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
        return sum(len(blocks) for blocks in self._cached.values())

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
        for digest in seq.block_hashes[:max_blocks]:
            blocks = self._cached.get(digest)
            if not blocks:
                break
            hits.append(next(iter(blocks)))
        return CacheLookup(tuple(hits), len(hits) * self.block_size)

    def take_events(self) -> list[kv_events.Event]:
        """The events queued since the last call, oldest first."""
        events, self._events = self._events, []
        return events

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
        """Cache every newly filled block of ``seq`` (and record one ``BlockStored``)."""
        if not self.enable_prefix_caching:
            return
        first = seq.num_registered_blocks
        full = min(seq.num_tokens // self.block_size, len(seq.block_ids))
        if full <= first:
            return
        self._extend_hashes(seq, full)
        for index in range(first, full):
            digest = seq.block_hashes[index]
            block = seq.block_ids[index]
            self._block_hash[block] = digest
            self._cached.setdefault(digest, {})[block] = None
        seq.num_registered_blocks = full
        if self.record_events:
            size = self.block_size
            parent = external_hash(seq.block_hashes[first - 1]) if first else None
            self._events.append(
                kv_events.block_stored(
                    [external_hash(d) for d in seq.block_hashes[first:full]],
                    parent,
                    seq.token_ids()[first * size : full * size],
                    size,
                    seq.lora_id,
                    seq.lora,
                    [_event_extra_keys(seq, index) for index in range(first, full)],
                )
            )

    def free(self, seq: Sequence) -> None:
        """Unpin ``seq``'s blocks; they stay cached, tail blocks first in line for eviction."""
        for block in reversed(seq.block_ids):
            self._ref_count[block] -= 1
            if self._ref_count[block] == 0:
                self._free[block] = None
        seq.block_ids = []
        seq.num_registered_blocks = 0

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block (vLLM's ``/reset_prefix_cache``); refused while any
        block is pinned."""
        if self.num_used_blocks:
            return False
        self._cached.clear()
        self._block_hash = [None] * self.num_blocks
        if self.record_events:
            self._events.append(kv_events.all_blocks_cleared())
        return True

    # -- internals -----------------------------------------------------------------------------

    def _take(self, block: int) -> None:
        if self._ref_count[block] == 0:
            del self._free[block]
        self._ref_count[block] += 1

    def _pop_free(self) -> int:
        block, _ = self._free.popitem(last=False)
        digest = self._block_hash[block]
        if digest is not None:
            self._evict(block, digest)
        self._ref_count[block] = 1
        return block

    def _evict(self, block: int, digest: bytes) -> None:
        holders = self._cached[digest]
        del holders[block]
        if not holders:
            del self._cached[digest]
        self._block_hash[block] = None
        if self.record_events:
            self._events.append(kv_events.block_removed([external_hash(digest)]))

    def _extend_hashes(self, seq: Sequence, upto_blocks: int) -> None:
        if len(seq.block_hashes) >= upto_blocks:
            return
        lora = (seq.lora, seq.lora_path or "") if seq.lora else None
        self.hasher.chain(seq.token_ids(), seq.block_hashes, upto_blocks, lora, seq.cache_salt)


def _event_extra_keys(seq: Sequence, index: int) -> list[Any] | None:
    """Block ``index``'s extra keys as events show them: untagged (the adapter's name, the
    salt on block 0), while the hash itself uses the tagged keys."""
    keys: list[Any] = []
    if seq.lora:
        keys.append(seq.lora)
    if seq.cache_salt and index == 0:
        keys.append(seq.cache_salt)
    return keys or None
