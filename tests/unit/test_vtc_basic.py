"""``vtc-basic`` on crafted states: users' counters, pods' loads, the window."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from strategies import registry
from strategies.context import USAGE, Finished, PodSnapshot, Usage
from strategies.least_request import LeastRequest
from strategies.vtc_basic import VtcBasic
from tests.helpers import context, snapshot


def pods(*loads: int, names: Sequence[str] = ("b", "c", "a")) -> list[PodSnapshot]:
    """Pods given out of name order (positions go by name: a=0, b=1/2, c=1)."""
    return [snapshot(name, in_flight=load) for name, load in zip(names, loads, strict=False)]


def finished(user: str | None, usage: Usage | None, at: float = 100.0) -> Finished:
    return Finished(1, "a", user, 0, usage, at, at)


def charge(
    strategy: VtcBasic, user: str, prompt: int, completion: int = 0, at: float = 100.0
) -> None:
    strategy.on_finished(finished(user, Usage(prompt, completion), at))


def scores(
    strategy: VtcBasic | LeastRequest, user: str | None, candidates: list[PodSnapshot]
) -> list[float]:
    values = strategy.score(context(candidates, user=user, now=100.0))
    assert all(isinstance(s, float) and 0.0 <= s <= 1.0 for s in values)
    return [float(s) for s in values]  # type: ignore[arg-type]


def best(strategy: VtcBasic, user: str | None, candidates: list[PodSnapshot]) -> str:
    values = scores(strategy, user, candidates)
    return candidates[max(range(len(values)), key=values.__getitem__)].name


def test_without_a_user_it_is_least_request() -> None:
    strategy = VtcBasic()
    charge(strategy, "heavy", 100_000)
    candidates = pods(3, 0, 1)
    assert scores(strategy, None, candidates) == scores(LeastRequest(), None, candidates)
    assert best(strategy, None, candidates) == "c"


def test_heavy_and_light_users_sit_at_opposite_ends() -> None:
    strategy = VtcBasic()
    charge(strategy, "heavy", 100_000)
    for light in ("l1", "l2", "l3"):
        charge(strategy, light, 10)
    assert strategy.share("heavy", 100.0) > 0.99
    assert strategy.share("l1", 100.0) < 0.01
    idle = pods(0, 0, 0)
    assert best(strategy, "heavy", idle) == "c"
    assert best(strategy, "l1", idle) == "a"
    assert best(strategy, "newcomer", idle) == "a"  # nothing used yet: the lightest


def test_users_like_the_others_are_routed_by_load_alone() -> None:
    strategy = VtcBasic()
    charge(strategy, "u1", prompt=10)
    charge(strategy, "u2", prompt=0, completion=5)  # completion counts double: also 10
    assert strategy.share("u1", 100.0) == pytest.approx(0.5)
    candidates = pods(2, 1, 3)
    assert scores(strategy, "u1", candidates) == pytest.approx(
        scores(LeastRequest(), "u1", candidates)
    )


def test_a_sole_active_user_is_neutral() -> None:
    strategy = VtcBasic()
    charge(strategy, "only", 50_000)
    assert strategy.share("only", 100.0) == 0.5
    assert best(strategy, "only", pods(1, 1, 0)) == "a"


def test_load_outweighs_fairness_only_past_fairness_requests() -> None:
    strategy = VtcBasic(fairness_requests=4.0)
    charge(strategy, "heavy", 1_000_000)
    charge(strategy, "light", 1)
    # "a" is the light end; one request more there is not enough to leave it...
    assert best(strategy, "light", pods(0, 0, 1)) == "a"
    # ...but ten more is.
    assert best(strategy, "light", pods(0, 0, 10)) == "b"
    assert best(VtcBasic(fairness_requests=0), "light", pods(1, 1, 0)) == "a"


def test_counters_leave_the_window() -> None:
    strategy = VtcBasic(window_seconds=60.0)
    charge(strategy, "heavy", 100_000, at=100.0)
    charge(strategy, "light", 10, at=150.0)
    assert strategy.share("heavy", 150.0) > 0.99
    later = 100.0 + 61.0  # the heavy user's usage has left; the light one's has not
    assert strategy.share("heavy", later) == 0.0
    assert strategy.share("light", later) == 0.5
    assert strategy.share("light", 220.0) == 0.5  # nobody active


def test_requests_without_usage_or_user_are_not_counted() -> None:
    strategy = VtcBasic()
    strategy.on_finished(finished("u", None))
    strategy.on_finished(finished(None, Usage(100, 100)))
    strategy.on_finished(finished("u", Usage(0, 0)))
    assert strategy.share("u", 100.0) == 0.5
    assert strategy.share("v", 100.0) == 0.5


def test_the_least_recently_active_users_are_dropped_past_max_users() -> None:
    strategy = VtcBasic(max_users=2)
    charge(strategy, "old", 5)
    charge(strategy, "mid", 5)
    charge(strategy, "new", 5)
    assert list(strategy._users) == ["mid", "new"]


def test_a_user_dropped_past_max_users_takes_its_tokens_along() -> None:
    # Two users like each other stay neutral after a third, far heavier, is dropped: its
    # tokens must not linger in the total the others are compared with.
    strategy = VtcBasic(max_users=2)
    charge(strategy, "whale", 1_000_000)
    charge(strategy, "u1", 10)
    charge(strategy, "u2", 10)
    assert list(strategy._users) == ["u1", "u2"]
    assert strategy.share("u1", 100.0) == pytest.approx(0.5)


def test_scoring_changes_nothing() -> None:
    strategy = VtcBasic()
    charge(strategy, "heavy", 100_000, at=100.0)
    charge(strategy, "light", 10, at=100.0)
    before = (list(strategy._users), strategy._all.total(1000))
    strategy.score(context(pods(0, 0, 0), user="light", now=10_000.0))
    assert (list(strategy._users), strategy._all.total(1000)) == before


def test_options_are_validated_and_registered() -> None:
    assert registry.build("vtc-basic", {"fairness_requests": 2}).name == "vtc-basic"
    assert USAGE in registry.ALGORITHMS["vtc-basic"].consumes
    for options in ({"fairness_requests": -1}, {"window_seconds": 0}, {"max_users": 0}):
        with pytest.raises(registry.OptionError):
            registry.build("vtc-basic", options)
