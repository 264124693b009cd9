"""Outlier detection on crafted outcomes: ejection, backoff, probation, the least-bad pod."""

from __future__ import annotations

from extproc.config import HealthSettings
from extproc.fleet.health import STATUS, UNREACHABLE, PodHealth
from extproc.fleet.registry import PodRegistry
from extproc.telemetry import Telemetry
from tests.helpers import fleet, snapshot


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def health(clock: Clock, **settings: float) -> PodHealth:
    values = {"consecutive_failures": 3, "base_ejection": 1.0, "max_ejection": 8.0, **settings}
    return PodHealth(HealthSettings(**values), PodRegistry(), Telemetry(), clock)  # type: ignore[arg-type]


def names(pods: tuple[object, ...]) -> list[str]:
    return [p.name for p in pods]  # type: ignore[attr-defined]


def test_consecutive_5xx_eject_and_a_success_in_between_resets() -> None:
    clock = Clock()
    tracker = health(clock)
    pods = tuple(fleet(0, 0))
    tracker.failed("p0", STATUS)
    tracker.failed("p0", STATUS)
    tracker.succeeded("p0")
    tracker.failed("p0", STATUS)
    tracker.failed("p0", STATUS)
    assert names(tracker.usable(pods, clock.now)) == ["p0", "p1"]
    tracker.failed("p0", STATUS)
    assert names(tracker.usable(pods, clock.now)) == ["p1"]


def test_an_unreachable_pod_is_ejected_at_once() -> None:
    clock = Clock()
    tracker = health(clock)
    tracker.failed("p0", UNREACHABLE)
    assert names(tracker.usable(tuple(fleet(0, 0)), clock.now)) == ["p1"]


def test_backoff_doubles_and_probation_allows_one_request() -> None:
    clock = Clock()
    tracker = health(clock)
    idle = (snapshot("p0"), snapshot("p1"))
    busy = (snapshot("p0", in_flight=1), snapshot("p1"))
    lengths = []
    for _ in range(5):
        tracker.failed("p0", UNREACHABLE)
        state = tracker.state("p0")
        assert state is not None
        lengths.append(state.ejected_until - clock.now)
        clock.now = state.ejected_until  # the ejection ends: probation
        assert names(tracker.usable(idle, clock.now)) == ["p0", "p1"]
        assert names(tracker.usable(busy, clock.now)) == ["p1"]  # one request at a time
    assert lengths == [1.0, 2.0, 4.0, 8.0, 8.0]
    tracker.succeeded("p0")  # the probation request went well: back, backoff forgotten
    assert tracker.state("p0") is None
    tracker.failed("p0", UNREACHABLE)
    state = tracker.state("p0")
    assert state is not None and state.ejected_until - clock.now == 1.0


def test_a_failure_on_probation_ejects_again_at_once() -> None:
    clock = Clock()
    tracker = health(clock)
    for _ in range(3):
        tracker.failed("p0", STATUS)
    state = tracker.state("p0")
    assert state is not None
    clock.now = state.ejected_until
    tracker.usable(tuple(fleet(0, 0)), clock.now)
    tracker.failed("p0", STATUS)
    assert names(tracker.usable(tuple(fleet(0, 0)), clock.now)) == ["p1"]


def test_when_every_pod_is_ejected_the_one_back_soonest_serves() -> None:
    clock = Clock()
    tracker = health(clock)
    tracker.failed("p0", UNREACHABLE)
    tracker.failed("p0", UNREACHABLE)  # ignored: already out
    clock.now += 0.5
    tracker.failed("p1", UNREACHABLE)
    assert names(tracker.usable(tuple(fleet(0, 0)), clock.now)) == ["p0"]


def test_ejection_off() -> None:
    clock = Clock()
    tracker = health(clock, consecutive_failures=0)
    tracker.failed("p0", UNREACHABLE)
    assert names(tracker.usable(tuple(fleet(0, 0)), clock.now)) == ["p0", "p1"]
