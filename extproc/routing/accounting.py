"""Per-pod accounting of the requests this server routed: the one owner of in-flight counts.

A claim counts a request against its pod until ``release`` (idempotent) ends it. Besides the
in-flight count, each pod keeps what its last metrics reading cannot know yet: the requests
routed since its queue was read (``sent``), and the prompt tokens routed since its token
counters were read (``sent_tokens``). Both are counted against the reading they follow (its
timestamp is the mark), so they start again from zero when a newer reading arrives, without
the scraper writing here: nobody but claims and releases changes these numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from extproc.scraping.readings import Reading


@dataclass(slots=True, eq=False)
class PodCounters:
    in_flight: int = 0
    sent: int = 0
    sent_mark: float = 0.0
    sent_tokens: int = 0
    tokens_mark: float = 0.0

    def sent_since(self, reading: Reading | None) -> int:
        """Open requests routed since ``reading``'s queue gauges were read."""
        mark = reading.at if reading is not None else 0.0
        return self.sent if self.sent_mark == mark else 0

    def tokens_since(self, reading: Reading | None) -> int:
        """Prompt tokens routed since ``reading``'s token counters were read."""
        mark = reading.counters_at if reading is not None else 0.0
        return self.sent_tokens if self.tokens_mark == mark else 0


Listener = Callable[[str], None]


class Claim:
    """One routed request's hold on its pod; ``release`` ends it exactly once."""

    __slots__ = ("_counters", "_listeners", "_mark", "_pod", "released")

    def __init__(
        self, pod: str, counters: PodCounters, mark: float, listeners: list[Listener]
    ) -> None:
        self._pod = pod
        self._counters = counters
        self._mark = mark
        self._listeners = listeners
        self.released = False

    def release(self) -> bool:
        """Give the pod back; true the first time, false when already released."""
        if self.released:
            return False
        self.released = True
        counters = self._counters
        counters.in_flight -= 1
        if counters.sent_mark == self._mark and counters.sent > 0:
            counters.sent -= 1  # finished before any reading could have seen it queued
        for listener in self._listeners:
            listener(self._pod)
        return True


EMPTY = PodCounters()


class Accounting:
    def __init__(self) -> None:
        self.pods: dict[str, PodCounters] = {}
        """Pod name -> its counters (read them; only claims and releases write)."""
        self._models: dict[str, int] = {}
        self._listeners: list[Listener] = []

    def on_change(self, listener: Listener) -> None:
        """Call ``listener(pod)`` whenever that pod's counters change."""
        self._listeners.append(listener)

    def counters(self, pod: str) -> PodCounters:
        """The pod's counters (a shared empty record for a pod never claimed: read only)."""
        return self.pods.get(pod, EMPTY)

    def claim(self, pod: str, reading: Reading | None, prompt_tokens: int) -> Claim:
        counters = self.pods.get(pod)
        if counters is None:
            counters = self.pods[pod] = PodCounters()
        mark = reading.at if reading is not None else 0.0
        if counters.sent_mark != mark:
            counters.sent, counters.sent_mark = 0, mark
        counters.sent += 1
        tokens_mark = reading.counters_at if reading is not None else 0.0
        if counters.tokens_mark != tokens_mark:
            counters.sent_tokens, counters.tokens_mark = 0, tokens_mark
        counters.sent_tokens += prompt_tokens
        counters.in_flight += 1
        for listener in self._listeners:
            listener(pod)
        return Claim(pod, counters, mark, self._listeners)

    def forget(self, pod: str) -> None:
        """The pod left. Open claims still release into the record they hold, harmlessly."""
        self.pods.pop(pod, None)

    # -- per model: every admitted inference request, routed to a pod or not ----------------

    def model_started(self, model: str) -> None:
        self._models[model] = self._models.get(model, 0) + 1

    def model_finished(self, model: str) -> None:
        left = self._models.get(model, 0) - 1
        if left > 0:
            self._models[model] = left
        else:
            self._models.pop(model, None)

    def model_in_flight(self, model: str) -> int:
        return self._models.get(model, 0)

    def in_flight_by_model(self) -> dict[str, int]:
        return dict(self._models)
