"""Plans from header values, fallback counting, hooks, and the weighted combination."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from extproc.errors import GatewayError
from extproc.router import Router
from extproc.telemetry import Telemetry
from strategies import registry
from strategies.base import CannotDecide, PodView, RequestView, Strategy, Timings, Usage


class Refuses(Strategy):
    name = "refuses"

    def score(self, request: RequestView, pods: Sequence[PodView]) -> Sequence[float]:
        raise CannotDecide("no-metrics")


class Crashes(Strategy):
    name = "crashes"

    def score(self, request: RequestView, pods: Sequence[PodView]) -> Sequence[float]:
        raise ZeroDivisionError


class Recorder(Strategy):
    name = "recorder"

    def __init__(self) -> None:
        self.routed: list[str] = []
        self.finished: list[str] = []

    def score(self, request: RequestView, pods: Sequence[PodView]) -> Sequence[float]:
        return [1.0 if p.name == "p2" else 0.0 for p in pods]

    def on_routed(self, request: RequestView, pod: PodView) -> None:
        self.routed.append(pod.name)

    def on_finished(
        self, request: RequestView, pod: PodView, usage: Usage | None, timings: Timings
    ) -> None:
        self.finished.append(pod.name)


@pytest.fixture
def router(monkeypatch: pytest.MonkeyPatch) -> Router:
    extra = {cls.name: cls for cls in (Refuses, Crashes, Recorder)}
    monkeypatch.setattr(registry, "STRATEGIES", {**registry.STRATEGIES, **extra})
    return Router(Telemetry(), seed=7)


def fleet(*loads: int) -> list[PodView]:
    return [
        PodView(name=f"p{i}", address=f"10.0.0.{i}:8000", model="m", in_flight=load)
        for i, load in enumerate(loads)
    ]


def view() -> RequestView:
    return RequestView(request_id="r", model="m", now=1.0)


def fallback_count(router: Router, strategy: str, reason: str) -> float:
    value = router._telemetry.registry.get_sample_value(
        "extproc_routing_fallback_total", {"strategy": strategy, "reason": reason}
    )
    return value or 0.0


def test_plans_are_cached_and_labelled(router: Router) -> None:
    plan = router.plan("random")
    assert plan is router.plan("random")
    assert plan.label == "random" and plan.metric_label == "random"
    weighted = router.plan("random:1,least-request:3")
    assert weighted.label == "random:1,least-request:3"
    assert weighted.metric_label == "weighted"
    assert weighted.weights == (1.0, 3.0)


def test_unknown_strategy_is_a_400_listing_valid_names(router: Router) -> None:
    with pytest.raises(GatewayError) as caught:
        router.plan("fastest")
    assert caught.value.status == 400
    assert "fastest" in caught.value.message
    assert "least-request" in caught.value.message
    with pytest.raises(GatewayError) as bad_weight:
        router.plan("random:abc")
    assert bad_weight.value.status == 400


def test_cannot_decide_falls_back_to_least_request_and_counts(router: Router) -> None:
    pods = fleet(4, 0, 9)
    decision = router.decide(router.plan("refuses"), view(), pods)
    assert decision.pod.name == "p1"
    assert decision.fallbacks == [("refuses", "no-metrics")]
    assert fallback_count(router, "refuses", "no-metrics") == 1


def test_a_crashing_strategy_never_fails_the_request(router: Router) -> None:
    decision = router.decide(router.plan("crashes"), view(), fleet(3, 1))
    assert decision.pod.name == "p1"
    assert fallback_count(router, "crashes", "error") == 1


def test_weights_steer_the_combination(router: Router) -> None:
    pods = fleet(0, 0, 50)
    # recorder wants p2 (the busiest); least-request wants p0/p1.
    assert router.decide(router.plan("recorder:10,least-request:1"), view(), pods).pod.name == "p2"
    assert router.decide(router.plan("recorder:1,least-request:10"), view(), pods).pod.name != "p2"


def test_hooks_run_for_every_routed_request_whichever_strategy_chose(router: Router) -> None:
    recorder = router.strategies["recorder"]
    assert isinstance(recorder, Recorder)
    pods = fleet(0, 5)
    decision = router.decide(router.plan("least-request"), view(), pods)
    router.routed(view(), decision.pod)
    router.finished(view(), decision.pod, None, Timings(routed_at=1.0))
    assert recorder.routed == ["p0"]
    assert recorder.finished == ["p0"]


def test_explain_has_no_side_effects(router: Router) -> None:
    explanation = router.explain(router.plan("refuses"), view(), fleet(1, 0))
    scores = explanation.per_strategy
    assert scores["refuses"][1] > scores["refuses"][0]
    assert explanation.combined == scores["refuses"]
    assert explanation.fallbacks == [("refuses", "no-metrics")]
    assert fallback_count(router, "refuses", "no-metrics") == 0
