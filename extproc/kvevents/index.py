"""The exact index: which pods hold which KV blocks, as the pods themselves report it.

Block hash (the 64-bit name a pod publishes) -> the pods holding it, as a bitmask (one bit per
publishing pod), in insertion order so the oldest entries go first when the index is full.
Writers are the pods' event subscribers only; the prefix producer reads it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


class ExactIndex:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[int, int] = OrderedDict()
        self._bits: dict[str, int] = {}
        self._free: list[int] = []
        self._next = 0
        self._held: dict[int, int] = {}
        self.evicted = 0
        """Entries dropped because the index was full (counted, pods still hold them)."""

    def __len__(self) -> int:
        return len(self._entries)

    # -- writes (event subscribers) ------------------------------------------------------------

    def stored(self, pod: str, hashes: Sequence[int]) -> None:
        bit = self._bit(pod)
        own = 1 << bit
        entries = self._entries
        gained = 0
        for block in hashes:
            mask = entries.get(block, 0)
            if not mask & own:
                entries[block] = mask | own
                gained += 1
        self._held[bit] += gained
        while len(entries) > self.capacity:
            _, mask = entries.popitem(last=False)
            self.evicted += 1
            self._release(mask)

    def removed(self, pod: str, hashes: Sequence[int]) -> None:
        bit = self._bits.get(pod)
        if bit is None:
            return
        own = 1 << bit
        entries = self._entries
        for block in hashes:
            mask = entries.get(block)
            if mask is None or not mask & own:
                continue
            mask &= ~own
            if mask:
                entries[block] = mask
            else:
                del entries[block]
            self._held[bit] -= 1

    def clear(self, pod: str) -> None:
        """The pod holds nothing we know of (restart, a gap in its events, a cache reset)."""
        bit = self._bits.get(pod)
        if bit is None or not self._held.get(bit):
            return
        own = 1 << bit
        entries = self._entries
        for block in [b for b, mask in entries.items() if mask & own]:
            mask = entries[block] & ~own
            if mask:
                entries[block] = mask
            else:
                del entries[block]
        self._held[bit] = 0

    def forget(self, pod: str) -> None:
        self.clear(pod)
        bit = self._bits.pop(pod, None)
        if bit is not None:
            self._held.pop(bit, None)
            self._free.append(bit)

    # -- reads (the prefix producer) -----------------------------------------------------------

    def held(self, pod: str) -> int:
        bit = self._bits.get(pod)
        return 0 if bit is None else self._held.get(bit, 0)

    def leading(self, hashes: Sequence[int], pods: Sequence[str]) -> list[int]:
        """For each of ``pods``: how many leading blocks of ``hashes`` it holds."""
        bits = self._bits
        depth_of = [0] * len(pods)
        alive = 0
        position: dict[int, int] = {}
        for i, pod in enumerate(pods):
            bit = bits.get(pod)
            if bit is not None:
                alive |= 1 << bit
                position[bit] = i
        entries = self._entries
        depth = 0
        for block in hashes:
            holders = entries.get(block, 0) & alive
            if holders != alive:
                self._note(alive & ~holders, depth, depth_of, position)
                alive = holders
                if not alive:
                    return depth_of
            depth += 1
        self._note(alive, depth, depth_of, position)
        return depth_of

    @staticmethod
    def _note(mask: int, depth: int, depth_of: list[int], position: dict[int, int]) -> None:
        while mask:
            low = mask & -mask
            depth_of[position[low.bit_length() - 1]] = depth
            mask ^= low

    # -- bits ----------------------------------------------------------------------------------

    def _bit(self, pod: str) -> int:
        bit = self._bits.get(pod)
        if bit is None:
            bit = self._free.pop() if self._free else self._next
            if bit == self._next:
                self._next += 1
            self._bits[pod] = bit
            self._held[bit] = 0
        return bit

    def _release(self, mask: int) -> None:
        held = self._held
        while mask:
            low = mask & -mask
            bit = low.bit_length() - 1
            if bit in held:
                held[bit] -= 1
            mask ^= low
