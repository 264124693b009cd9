"""random and least-request on crafted pods, the weighted-list parser and the tie-break."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from strategies import registry
from strategies.base import PodMetrics, PodView, RequestView, Strategy, overrides
from strategies.least_request import LeastRequest
from strategies.random_choice import RandomChoice
from strategies.selection import PlanSyntaxError, best_index, combine, parse_weighted


def pods(*loads: int) -> list[PodView]:
    return [
        PodView(name=f"p{i}", address=f"10.0.0.{i}:8000", model="m", in_flight=load)
        for i, load in enumerate(loads)
    ]


def request(now: float = 100.0) -> RequestView:
    return RequestView(request_id="r", model="m", now=now)


def test_random_scores_are_in_range_and_spread() -> None:
    strategy = RandomChoice(seed=1)
    fleet = pods(0, 0, 0, 0)
    picks: Counter[int] = Counter()
    rng = random.Random(2)
    for _ in range(4000):
        scores = strategy.score(request(), fleet)
        assert all(0.0 <= s <= 1.0 for s in scores)
        picks[best_index(scores, rng)] += 1
    assert set(picks) == {0, 1, 2, 3}
    assert min(picks.values()) > 800


def test_least_request_prefers_the_least_loaded() -> None:
    scores = LeastRequest().score(request(), pods(5, 0, 3))
    assert max(range(3), key=lambda i: scores[i]) == 1
    assert all(0.0 <= s <= 1.0 for s in scores)


def test_least_request_uses_fresh_metrics_in_the_load_estimate() -> None:
    fleet = pods(1, 1)
    fleet[0].metrics = PodMetrics(running=10, waiting=5)
    fleet[0].metrics_at = 99.5
    fleet[0].sent_since_scrape = 1
    assert fleet[0].load(100.0) == 16
    scores = LeastRequest().score(request(), fleet)
    assert scores[1] > scores[0]
    # Stale metrics count as missing: the load falls back to the gateway's own in-flight count.
    assert fleet[0].load(200.0) == 1


def test_load_never_below_in_flight() -> None:
    pod = pods(7)[0]
    pod.metrics = PodMetrics(running=1, waiting=0)
    pod.metrics_at = 100.0
    assert pod.load(100.0) == 7


def test_idle_fleet_scores_equal() -> None:
    scores = LeastRequest().score(request(), pods(0, 0, 0))
    assert len(set(scores)) == 1


def test_weighted_list_parsing() -> None:
    assert parse_weighted("random") == [("random", 1.0)]
    assert parse_weighted("random:1, least-request:3") == [("random", 1.0), ("least-request", 3.0)]
    for bad in ("", "random,", "random:x", "random:0", "random:-1", "random,random", "a:1e9"):
        with pytest.raises(PlanSyntaxError):
            parse_weighted(bad)


def test_combine_is_a_weighted_mean() -> None:
    assert combine([[1.0, 0.0], [0.0, 1.0]], [3.0, 1.0], 2) == [0.75, 0.25]
    assert combine([[0.2, 0.4]], [5.0], 2) == [0.2, 0.4]


def test_ties_break_at_random() -> None:
    rng = random.Random(3)
    seen = {best_index([0.5, 0.5, 0.1], rng) for _ in range(100)}
    assert seen == {0, 1}


def test_registry_knows_both_and_hook_detection() -> None:
    assert {"random", "least-request"} <= set(registry.names())
    assert registry.FALLBACK == "least-request"
    assert isinstance(registry.build("least-request", {"smoothing": 2}), LeastRequest)
    with pytest.raises(registry.OptionError):
        registry.build("least-request", {"bogus": 1})
    assert not overrides(LeastRequest(), "on_routed")

    class Hooked(Strategy):
        name = "hooked"

        def on_routed(self, request: RequestView, pod: PodView) -> None:
            pass

    assert overrides(Hooked(), "on_routed")
