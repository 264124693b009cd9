"""The rate limits' window: what a user consumed over the last minute, in one-second buckets.

The algorithm (the same here, for the in-memory store, and in ``users.lua`` for Redis): time
is cut into buckets of ``BUCKET_MS``; an event (a request, or a response's tokens) is added to
the bucket its time falls in. At time ``now`` the window holds the buckets ``current - BUCKETS``
to ``current`` where ``current = now // BUCKET_MS``: 61 buckets that start 60 to 61 seconds ago.

- Every event of the last 60 seconds is counted, so admitting only while ``used < limit`` never
  lets more than ``limit`` requests through in *any* 60-second interval. Fixed minute windows let
  2x through across a minute boundary; this does not.
- An event stops counting 60 to 61 seconds after it happened (when its bucket leaves), so a
  rejected client may wait up to one bucket longer than an exact per-request log would make it;
  in exchange a user costs at most 61 counters, whatever their rate.
- ``Retry-After`` is computed, not guessed: the time until enough of the oldest buckets leave
  the window to bring ``used`` under the limit.
"""

from __future__ import annotations

from collections import deque

WINDOW_MS = 60_000
BUCKET_MS = 1_000
BUCKETS = WINDOW_MS // BUCKET_MS


def leaves_at(bucket: int) -> int:
    """The time (ms) from which ``bucket`` no longer counts."""
    return (bucket + BUCKETS + 1) * BUCKET_MS


def retry_after_seconds(milliseconds: int) -> int:
    """A ``Retry-After`` value: whole seconds, rounded up, at least 1."""
    return max(1, -(-milliseconds // 1000))


class SlidingWindow:
    """Amounts per bucket, oldest first, with their running total.

    Times are milliseconds on a clock that never goes backwards; the caller passes them in, so
    tests can step the clock by hand.
    """

    __slots__ = ("_buckets", "_total")

    def __init__(self) -> None:
        self._buckets: deque[list[int]] = deque()
        self._total = 0

    def total(self, now_ms: int) -> int:
        self._expire(now_ms // BUCKET_MS)
        return self._total

    def add(self, now_ms: int, amount: int) -> None:
        current = now_ms // BUCKET_MS
        self._expire(current)
        buckets = self._buckets
        if buckets and buckets[-1][0] == current:
            buckets[-1][1] += amount
        else:
            buckets.append([current, amount])
        self._total += amount

    def retry_after_ms(self, now_ms: int, excess: int) -> int:
        """Milliseconds until at least ``excess`` of the counted amount has left the window."""
        self._expire(now_ms // BUCKET_MS)
        dropped = 0
        for bucket, amount in self._buckets:
            dropped += amount
            if dropped >= excess:
                return leaves_at(bucket) - now_ms
        return WINDOW_MS + BUCKET_MS

    def _expire(self, current: int) -> None:
        oldest = current - BUCKETS
        buckets = self._buckets
        while buckets and buckets[0][0] < oldest:
            self._total -= buckets.popleft()[1]
