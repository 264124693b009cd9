"""Which pods are believed to hold which prompt blocks in their KV cache.

Block hash -> the pods that were sent that block, with the time it was last sent. Bounded in
blocks (least recently written evicted first) and in time (entries older than ``ttl`` count as
gone), because pods evict too and nothing tells the gateway when.

Each entry is one ``int``: the pods as a bitmask shifted above a 32-bit timestamp (seconds since
the index began). One int per block keeps memory near 200 bytes a block (measured in
docs/benchmarks.md) and makes a lookup a walk of dictionary reads and bit operations, linear in
the prompt's blocks. Pods get bit positions; a pod that leaves is forgotten at once (its bit is
masked out of every read and write) and its bit is reused only after ``ttl``, when every entry
that could still carry it has expired.

Per pod, the index also keeps how many blocks it believes the pod holds (``held``): where to put
a prompt nobody holds yet, so distinct prefixes spread over the caches instead of crowding one.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

STAMP_BITS = 32
STAMP_MASK = (1 << STAMP_BITS) - 1
EXPIRE_BATCH = 256
"""Expired entries dropped per write at most, so no single request pays for a big purge."""


class PrefixIndex:
    def __init__(
        self, capacity: int, ttl: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if capacity <= 0 or ttl <= 0:
            raise ValueError("capacity and ttl must be > 0")
        self.capacity = capacity
        self.ttl = ttl
        self._ttl_stamps = int(ttl) + 1
        self._clock = clock
        self._start = clock()
        self._entries: OrderedDict[int, int] = OrderedDict()
        self._bits: dict[str, int] = {}
        self._names: dict[int, str] = {}
        self._held: dict[int, int] = {}
        self._born: dict[int, int] = {}
        """Bit -> stamp it was given to its pod: older entries carrying it belong to no one."""
        self._live = 0
        self._free: list[int] = []
        self._quarantine: list[tuple[float, int]] = []
        self._next_bit = 0

    def __len__(self) -> int:
        return len(self._entries)

    def _stamp(self) -> int:
        return int(self._clock() - self._start) & STAMP_MASK

    # -- reads ---------------------------------------------------------------------------------

    def lookup(self, hashes: Sequence[int], pods: Sequence[str]) -> tuple[list[int], list[int]]:
        """For each of ``pods``: how many leading blocks of the prompt it holds, and how many
        blocks it is believed to hold in all (both aligned with ``pods``)."""
        bits = self._bits
        held = self._held
        count = len(pods)
        matched = [0] * count
        totals = [0] * count
        candidates = 0
        positions: dict[str, int] = {}
        for i, pod in enumerate(pods):
            bit = bits.get(pod)
            if bit is not None:
                candidates |= 1 << bit
                totals[i] = held.get(bit, 0)
                positions[pod] = i
        if not candidates or not hashes:
            return matched, totals
        entries = self._entries
        horizon = self._stamp() - self._ttl_stamps
        alive = candidates
        depth = 0
        for block in hashes:
            value = entries.get(block)
            if value is None or (value & STAMP_MASK) < horizon:
                break
            holders = (value >> STAMP_BITS) & alive
            if holders != alive:
                if depth:
                    self._note(alive & ~holders, depth, matched, positions)
                alive = holders
                if not alive:
                    break
            depth += 1
        if alive and depth:
            self._note(alive, depth, matched, positions)
        return matched, totals

    def _note(self, mask: int, depth: int, matched: list[int], positions: dict[str, int]) -> None:
        names = self._names
        while mask:
            low = mask & -mask
            matched[positions[names[low.bit_length() - 1]]] = depth
            mask ^= low

    def held(self, pod: str) -> int:
        """Blocks ``pod`` is believed to hold."""
        bit = self._bits.get(pod)
        return 0 if bit is None else self._held.get(bit, 0)

    # -- writes --------------------------------------------------------------------------------

    def record(self, hashes: Sequence[int], pod: str) -> None:
        """``pod`` now holds every block of the prompt (the engine caches what it prefilled)."""
        if not hashes:
            return
        bit = self._bits.get(pod)
        if bit is None:
            bit = self._allocate(pod)
        own = 1 << bit
        live = self._live
        stamp = self._stamp()
        horizon = stamp - self._ttl_stamps
        entries = self._entries
        held = self._held
        gained = 0
        for block in hashes:
            value = entries.get(block)
            if value is None:
                entries[block] = (own << STAMP_BITS) | stamp
                gained += 1
                continue
            old_stamp = value & STAMP_MASK
            if old_stamp == stamp and (value >> STAMP_BITS) & own:
                continue  # written this second already: skip the work for hot prefixes
            if old_stamp < horizon:
                # Expired: whoever it named may have evicted it (or left and had its bit reused).
                self._release(value)
                mask = own
                gained += 1
            else:
                mask = (value >> STAMP_BITS) & live
                if not mask & own:
                    gained += 1
                mask |= own
            entries[block] = (mask << STAMP_BITS) | stamp
            entries.move_to_end(block)
        held[bit] = held.get(bit, 0) + gained
        self._expire(stamp)

    def _release(self, value: int) -> None:
        """An entry leaves (or is reset): its holders hold one block fewer."""
        mask = (value >> STAMP_BITS) & self._live
        stamp = value & STAMP_MASK
        held = self._held
        born = self._born
        while mask:
            low = mask & -mask
            bit = low.bit_length() - 1
            if stamp >= born.get(bit, 0):
                held[bit] -= 1
            mask ^= low

    def _expire(self, stamp: int) -> None:
        entries = self._entries
        while len(entries) > self.capacity:
            self._release(entries.popitem(last=False)[1])
        horizon = stamp - self._ttl_stamps
        for _ in range(EXPIRE_BATCH):
            if not entries:
                break
            oldest = next(iter(entries.values()))
            if (oldest & STAMP_MASK) >= horizon:
                break
            self._release(entries.popitem(last=False)[1])

    def forget_pod(self, pod: str) -> None:
        """The pod left: it holds nothing from now on, and its bit is retired for ``ttl``."""
        bit = self._bits.pop(pod, None)
        if bit is None:
            return
        del self._names[bit]
        self._held.pop(bit, None)
        self._live &= ~(1 << bit)
        self._quarantine.append((self._clock() + self.ttl + 1.0, bit))

    def _allocate(self, pod: str) -> int:
        now = self._clock()
        while self._quarantine and self._quarantine[0][0] <= now:
            self._free.append(self._quarantine.pop(0)[1])
        if self._free:
            bit = self._free.pop()
        else:
            bit = self._next_bit
            self._next_bit += 1
        self._bits[pod] = bit
        self._names[bit] = pod
        self._held[bit] = 0
        self._born[bit] = self._stamp()
        self._live |= 1 << bit
        return bit

    # -- introspection -------------------------------------------------------------------------

    def blocks_by_pod(self) -> dict[str, int]:
        """Blocks each pod is believed to hold, counted by a full scan (tests, debugging)."""
        counts = dict.fromkeys(self._bits, 0)
        horizon = self._stamp() - self._ttl_stamps
        for value in self._entries.values():
            if (value & STAMP_MASK) < horizon:
                continue
            mask = (value >> STAMP_BITS) & self._live
            while mask:
                low = mask & -mask
                counts[self._names[low.bit_length() - 1]] += 1
                mask ^= low
        return counts
