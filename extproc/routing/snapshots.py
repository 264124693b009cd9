"""One decision's picture of its candidates: registry entry, latest reading and accounting
joined into immutable ``PodSnapshot`` values, read once, after the pipeline's last ``await``.

Snapshots are kept per model between decisions and rebuilt only for the pods that changed:
the readings and the accounting announce each pod they change, a new candidate tuple from the
registry rebuilds the model's set, and a reading that ages past ``stale_after`` is noticed by
the earliest such deadline. A decision over many candidates therefore costs a few builds, not
one per candidate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from extproc.fleet.registry import Pod
from extproc.routing.accounting import EMPTY, Accounting, PodCounters
from extproc.scraping.readings import Reading, Readings
from strategies.context import PodSnapshot, load_estimate

NEVER = float("inf")


@dataclass(eq=False)
class _ModelSet:
    pods: tuple[Pod, ...]
    snapshots: list[PodSnapshot]
    position: dict[str, int]
    dirty: set[str] = field(default_factory=set)
    stale_at: float = NEVER
    """The earliest moment a fresh reading among these pods turns stale."""
    frozen: tuple[PodSnapshot, ...] = ()


class Snapshots:
    def __init__(self, readings: Readings, accounting: Accounting) -> None:
        self._readings = readings
        self._accounting = accounting
        self._models: dict[str, _ModelSet] = {}
        readings.on_change(self._changed)
        accounting.on_change(self._changed)

    def take(self, model: str, pods: tuple[Pod, ...], now: float) -> tuple[PodSnapshot, ...]:
        """The snapshots of ``pods`` (the registry's candidates for ``model``) as of ``now``."""
        current = self._models.get(model)
        if current is None or current.pods is not pods or now >= current.stale_at:
            current = self._models[model] = self._build(pods, now)
        elif current.dirty:
            stale_at = current.stale_at
            for name in current.dirty:
                index = current.position[name]
                current.snapshots[index] = self._make(pods[index], now)
                stale_at = min(stale_at, self._deadline(name, now))
            current.dirty.clear()
            # Never later than the true earliest deadline (the other pods' did not move), so
            # at worst the set is rebuilt a little early.
            current.stale_at = stale_at
            current.frozen = tuple(current.snapshots)
        return current.frozen

    def of(self, pod: Pod, now: float) -> PodSnapshot:
        """One pod's snapshot, outside any model's set."""
        return self._make(pod, now)

    def forget(self, name: str) -> None:
        """A pod left: drop every set it was in (the next decision rebuilds them)."""
        for model in [m for m, s in self._models.items() if name in s.position]:
            del self._models[model]

    def _changed(self, name: str) -> None:
        for models in self._models.values():
            if name in models.position:
                models.dirty.add(name)

    def _build(self, pods: tuple[Pod, ...], now: float) -> _ModelSet:
        snapshots = [self._make(pod, now) for pod in pods]
        return _ModelSet(
            pods=pods,
            snapshots=snapshots,
            position={pod.spec.name: i for i, pod in enumerate(pods)},
            stale_at=self._stale_at(pods, now),
            frozen=tuple(snapshots),
        )

    def _deadline(self, name: str, now: float) -> float:
        reading = self._readings.latest.get(name)
        if reading is None:
            return NEVER
        deadline = reading.at + self._readings.stale_after
        return deadline if now <= deadline else NEVER

    def _stale_at(self, pods: tuple[Pod, ...], now: float) -> float:
        latest = self._readings.latest
        stale_after = self._readings.stale_after
        earliest = NEVER
        for pod in pods:
            reading = latest.get(pod.spec.name)
            if reading is not None:
                deadline = reading.at + stale_after
                if now <= deadline < earliest:
                    earliest = deadline
        return earliest

    def _make(self, pod: Pod, now: float) -> PodSnapshot:
        name = pod.spec.name
        reading = self._readings.latest.get(name)
        counters = self._accounting.pods.get(name, EMPTY)
        fresh = reading is not None and now - reading.at <= self._readings.stale_after
        return _snapshot(pod, reading, counters, fresh)


def _snapshot(pod: Pod, reading: Reading | None, counters: PodCounters, fresh: bool) -> PodSnapshot:
    sent = counters.sent_since(reading)
    metrics = reading.metrics if fresh and reading is not None else None
    return PodSnapshot(
        name=pod.spec.name,
        address=pod.spec.address,
        in_flight=counters.in_flight,
        sent_since_scrape=sent,
        sent_prompt_tokens=counters.tokens_since(reading),
        metrics=metrics,
        metrics_missing=reading is None,
        load=load_estimate(counters.in_flight, sent, metrics),
    )
