"""``least-busy-time``: the pod with the least busy time (request-seconds) in a sliding window."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from strategies.base import Strategy
from strategies.context import Finished, PodSnapshot, RoutingContext, Score
from strategies.selection import lower_is_better


@dataclass
class LeastBusyTime(Strategy):
    """Score ``1 - busy / (max_busy + smoothing)``, where a pod's ``busy`` is the sum, over the
    requests this server sent it, of the part of each request's life inside the last
    ``window`` seconds (open requests count up to now).

    Finished requests are accumulated in ``bucket``-second slots, so the cost per decision is
    bounded by the window, not by the request rate; the oldest slot is counted whole, an error
    of at most one bucket. Open requests are keyed by the server's own request key, never by a
    client-supplied id. A pod that left is forgotten, and requests still finishing there are
    not counted again. Needs no pod metrics, so it never falls back; it sees only this
    replica's traffic.
    """

    algorithm = "least-busy-time"
    window: float = 30.0
    bucket: float = 1.0
    smoothing: float = 1.0
    _slots: dict[str, dict[int, float]] = field(default_factory=dict, init=False, repr=False)
    _open: dict[str, dict[int, float]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.window <= 0 or self.bucket <= 0 or self.bucket > self.window:
            raise ValueError("window and bucket must be > 0 and bucket <= window")
        if self.smoothing <= 0:
            raise ValueError("smoothing must be > 0")

    def busy_seconds(self, pod: str, now: float) -> float:
        start = now - self.window
        first_slot = math.floor(start / self.bucket)
        slots = self._slots.get(pod, {})
        total = sum(seconds for slot, seconds in slots.items() if slot >= first_slot)
        for began in self._open.get(pod, {}).values():
            total += now - max(began, start)
        return total

    def score(self, ctx: RoutingContext) -> Sequence[Score]:
        now = ctx.now
        return lower_is_better([self.busy_seconds(p.name, now) for p in ctx.pods], self.smoothing)

    def on_routed(self, ctx: RoutingContext, pod: PodSnapshot) -> None:
        self._open.setdefault(pod.name, {})[ctx.key] = ctx.now

    def on_finished(self, done: Finished) -> None:
        open_requests = self._open.get(done.pod)
        began = open_requests.pop(done.key, None) if open_requests is not None else None
        if began is None:
            return  # routed before the pod left (or before this instance existed)
        ended = done.finished_at
        slots = self._slots.setdefault(done.pod, {})
        began = max(began, ended - self.window)
        slot = math.floor(began / self.bucket)
        while began < ended:
            slot_end = (slot + 1) * self.bucket
            portion = min(ended, slot_end) - began
            slots[slot] = slots.get(slot, 0.0) + portion
            began = slot_end
            slot += 1
        oldest = math.floor((ended - self.window) / self.bucket) - 1
        for stale in [s for s in slots if s < oldest]:
            del slots[stale]

    def forget_pod(self, name: str) -> None:
        self._slots.pop(name, None)
        self._open.pop(name, None)
