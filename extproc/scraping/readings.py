"""The latest metrics reading of every pod, as immutable values.

The scraper is the only writer: each reading replaces the previous one whole, so a reader holds
one consistent picture (``PodMetrics`` is frozen) however long it keeps it. Readers (the
routing pipeline's snapshots, telemetry, the debug API) look pods up by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from strategies.context import PodMetrics


@dataclass(frozen=True, slots=True)
class Reading:
    """One pod's metrics and when they were read (monotonic seconds)."""

    metrics: PodMetrics
    at: float
    """When the queue gauges (running, waiting, KV usage) were read."""
    counters_at: float
    """When the token counters and histograms were last read (they refresh less often)."""


class Readings:
    def __init__(self, stale_after: float) -> None:
        self.stale_after = stale_after
        self.latest: dict[str, Reading] = {}
        """Pod name -> its latest reading (read it; only ``publish`` and ``forget`` write)."""
        self._first_at: dict[str, float] = {}
        self._listeners: list[Callable[[str], None]] = []

    def on_change(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(pod)`` whenever that pod's reading changes."""
        self._listeners.append(listener)

    def publish(self, pod: str, reading: Reading) -> None:
        self.latest[pod] = reading
        self._first_at.setdefault(pod, reading.at)
        for listener in self._listeners:
            listener(pod)

    def forget(self, pod: str) -> None:
        """The pod left or moved: what was read from it says nothing about what comes next."""
        self.latest.pop(pod, None)
        self._first_at.pop(pod, None)
        for listener in self._listeners:
            listener(pod)

    def get(self, pod: str) -> Reading | None:
        return self.latest.get(pod)

    def fresh(self, pod: str, now: float) -> PodMetrics | None:
        reading = self.latest.get(pod)
        if reading is None or now - reading.at > self.stale_after:
            return None
        return reading.metrics

    def first_at(self, pod: str) -> float | None:
        """When the pod's first reading arrived (its cold start ended), if it has."""
        return self._first_at.get(pod)
