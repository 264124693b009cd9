"""random and least-request on crafted pods, the weighted-list parser and the tie-break."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from strategies import registry
from strategies.base import Strategy, overrides
from strategies.context import PodMetrics, PodSnapshot, RoutingContext
from strategies.least_request import LeastRequest
from strategies.random_choice import RandomChoice
from strategies.selection import PlanSyntaxError, best_index, combine, parse_weighted
from tests.helpers import context, snapshot
from tests.helpers import fleet as pods


def test_random_scores_are_in_range_and_spread() -> None:
    strategy = RandomChoice()
    ctx = context(pods(0, 0, 0, 0), seed=1)
    picks: Counter[int] = Counter()
    rng = random.Random(2)
    for _ in range(4000):
        scores = [float(s) for s in strategy.score(ctx)]  # type: ignore[arg-type]
        assert all(0.0 <= s <= 1.0 for s in scores)
        picks[best_index(scores, rng)] += 1
    assert set(picks) == {0, 1, 2, 3}
    assert min(picks.values()) > 800


def test_least_request_prefers_the_least_loaded() -> None:
    scores = LeastRequest().score(context(pods(5, 0, 3)))
    assert max(range(3), key=lambda i: scores[i]) == 1  # type: ignore[arg-type,return-value]
    assert all(isinstance(s, float) and 0.0 <= s <= 1.0 for s in scores)


def test_least_request_uses_fresh_metrics_in_the_load_estimate() -> None:
    busy = snapshot("a", PodMetrics(running=10, waiting=5), in_flight=1, sent=1)
    assert busy.load == 16
    scores = LeastRequest().score(context([busy, snapshot("b", in_flight=1)]))
    assert scores[1] > scores[0]  # type: ignore[operator]
    # Stale metrics count as missing: the load falls back to the gateway's own in-flight count.
    assert snapshot("a", PodMetrics(running=10, waiting=5), in_flight=1, stale=True).load == 1


def test_load_never_below_in_flight() -> None:
    assert snapshot("a", PodMetrics(running=1, waiting=0), in_flight=7).load == 7


def test_idle_fleet_scores_equal() -> None:
    scores = LeastRequest().score(context(pods(0, 0, 0)))
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
    built = registry.build("least-request", {"smoothing": 2})
    assert isinstance(built, LeastRequest) and built.name == "least-request"
    with pytest.raises(registry.OptionError):
        registry.build("least-request", {"bogus": 1})
    assert not overrides(LeastRequest(), "on_routed")

    class Hooked(Strategy):
        algorithm = "hooked"

        def on_routed(self, ctx: RoutingContext, pod: PodSnapshot) -> None:
            pass

    assert overrides(Hooked(), "on_routed")


def test_named_instances_carry_their_own_options() -> None:
    instances = registry.build_all(
        {
            "least-request": {"smoothing": 3},
            "gentle": {"algorithm": "least-request", "smoothing": 50},
        }
    )
    assert instances["least-request"].smoothing == 3  # type: ignore[attr-defined]
    gentle = instances["gentle"]
    assert isinstance(gentle, LeastRequest) and gentle.name == "gentle"
    assert gentle.smoothing == 50
    assert set(registry.names()) < set(instances)


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ({"nope": {}}, "nope"),
        ({"x": {"algorithm": "nope"}}, "x.algorithm"),
        ({"least-request": {"algorithm": "random"}}, "least-request.algorithm"),
        ({"Bad Name": {"algorithm": "random"}}, "Bad Name"),
        ({"x": {"algorithm": "random", "seed": 1}}, "x.seed"),
    ],
)
def test_bad_instances_name_their_key(config: dict[str, dict[str, object]], key: str) -> None:
    with pytest.raises(registry.OptionError) as caught:
        registry.build_all(config)
    assert caught.value.key == key
