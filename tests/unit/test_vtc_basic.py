"""``vtc-basic`` on crafted states: users' counters, pods' loads, the window."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from strategies import registry
from strategies.base import PodView, RequestView, Timings, Usage
from strategies.least_request import LeastRequest
from strategies.vtc_basic import VtcBasic


def pods(*loads: int, names: Sequence[str] = ("b", "c", "a")) -> list[PodView]:
    """Pods given out of name order (positions go by name: a=0, b=1/2, c=1)."""
    return [
        PodView(name=name, address=f"10.0.0.{i}:8000", model="m", in_flight=load)
        for i, (name, load) in enumerate(zip(names, loads, strict=False))
    ]


def request(user: str | None, now: float = 100.0) -> RequestView:
    return RequestView(request_id="r", model="m", user=user, now=now)


def charge(
    strategy: VtcBasic, user: str, prompt: int, completion: int = 0, at: float = 100.0
) -> None:
    pod = PodView(name="a", address="10.0.0.9:8000", model="m")
    strategy.on_finished(
        request(user, at), pod, Usage(prompt, completion), Timings(routed_at=at, finished_at=at)
    )


def best(strategy: VtcBasic, user: str | None, candidates: list[PodView]) -> str:
    scores = strategy.score(request(user), candidates)
    assert all(0.0 <= s <= 1.0 for s in scores)
    return candidates[max(range(len(scores)), key=scores.__getitem__)].name


def test_without_a_user_it_is_least_request() -> None:
    strategy = VtcBasic()
    charge(strategy, "heavy", 100_000)
    candidates = pods(3, 0, 1)
    assert list(strategy.score(request(None), candidates)) == list(
        LeastRequest().score(request(None), candidates)
    )
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
    assert list(strategy.score(request("u1"), candidates)) == pytest.approx(
        list(LeastRequest().score(request("u1"), candidates))
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
    pod = PodView(name="a", address="10.0.0.9:8000", model="m")
    timings = Timings(routed_at=100.0, finished_at=100.0)
    strategy.on_finished(request("u"), pod, None, timings)
    strategy.on_finished(request(None), pod, Usage(100, 100), timings)
    strategy.on_finished(request("u"), pod, Usage(0, 0), timings)
    assert strategy.share("u", 100.0) == 0.5
    assert strategy.share("v", 100.0) == 0.5


def test_the_least_recently_active_users_are_dropped_past_max_users() -> None:
    strategy = VtcBasic(max_users=2)
    charge(strategy, "old", 5)
    charge(strategy, "mid", 5)
    charge(strategy, "new", 5)
    assert list(strategy._users) == ["mid", "new"]


def test_options_are_validated_and_registered() -> None:
    assert registry.build("vtc-basic", {"fairness_requests": 2}).name == "vtc-basic"
    assert registry.STRATEGIES["vtc-basic"].needs_usage
    for options in ({"fairness_requests": -1}, {"window_seconds": 0}, {"max_users": 0}):
        with pytest.raises(registry.OptionError):
            registry.build("vtc-basic", options)
