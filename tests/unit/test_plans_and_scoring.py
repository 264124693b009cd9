"""Plans from header values, fallbacks (whole and per pod), hooks, and the weighted combination."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from extproc.config import RoutingSettings
from extproc.errors import GatewayError
from extproc.routing.plans import Plans
from extproc.routing.scoring import decide
from strategies import registry
from strategies.base import CannotDecide, Strategy
from strategies.context import Finished, PodMetrics, PodSnapshot, RoutingContext, Score, Unknown
from tests.helpers import context, fleet, snapshot


class Refuses(Strategy):
    algorithm = "refuses"

    def score(self, ctx: RoutingContext) -> Sequence[Score]:
        raise CannotDecide("no-metrics")


class Crashes(Strategy):
    algorithm = "crashes"

    def score(self, ctx: RoutingContext) -> Sequence[Score]:
        raise ZeroDivisionError


class HalfKnown(Strategy):
    """Knows only pods with metrics; prefers the one with the most running requests."""

    algorithm = "half-known"

    def score(self, ctx: RoutingContext) -> Sequence[Score]:
        return [
            (p.metrics.running or 0) / 100 if p.metrics is not None else p.unknown for p in ctx.pods
        ]


class Recorder(Strategy):
    algorithm = "recorder"

    def __init__(self) -> None:
        self.routed: list[str] = []
        self.finished: list[str] = []

    def score(self, ctx: RoutingContext) -> Sequence[Score]:
        return [1.0 if p.name == "p2" else 0.0 for p in ctx.pods]

    def on_routed(self, ctx: RoutingContext, pod: PodSnapshot) -> None:
        self.routed.append(pod.name)

    def on_finished(self, done: Finished) -> None:
        self.finished.append(done.pod)


@pytest.fixture
def plans(monkeypatch: pytest.MonkeyPatch) -> Plans:
    extra = {cls.algorithm: cls for cls in (Refuses, Crashes, HalfKnown, Recorder)}
    monkeypatch.setattr(registry, "ALGORITHMS", {**registry.ALGORITHMS, **extra})
    return Plans(RoutingSettings())


def pick(plans: Plans, value: str, pods: list[PodSnapshot]) -> str:
    ctx = context(pods)
    return ctx.pods[decide(plans.parse(value), ctx, plans.fallback, "r").index].name


def test_plans_are_cached_and_labelled(plans: Plans) -> None:
    plan = plans.parse("random")
    assert plan is plans.parse("random")
    assert plan.label == "random" and plan.metric_label == "random"
    weighted = plans.parse("random:1,least-request:3")
    assert weighted.label == "random:1,least-request:3"
    assert weighted.metric_label == "weighted"
    assert weighted.weights == (1.0, 3.0)
    assert plans.parse("vtc-basic").needs_usage and not plan.needs_usage
    assert "prefix" in plans.parse("prefix-cache:1,random:1").consumes


def test_unknown_strategy_is_a_400_listing_valid_names(plans: Plans) -> None:
    with pytest.raises(GatewayError) as caught:
        plans.parse("fastest")
    assert caught.value.status == 400
    assert "fastest" in caught.value.message
    assert "least-request" in caught.value.message
    with pytest.raises(GatewayError) as bad_weight:
        plans.parse("random:abc")
    assert bad_weight.value.status == 400


def test_a_dry_run_parse_leaves_the_cache_alone(plans: Plans) -> None:
    plans.parse("random", remember=False)
    assert "random" not in plans._cache


def test_cannot_decide_falls_back_to_least_request(plans: Plans) -> None:
    ctx = context(fleet(4, 0, 9))
    decision = decide(plans.parse("refuses"), ctx, plans.fallback, "r")
    assert ctx.pods[decision.index].name == "p1"
    assert decision.fallbacks == [("refuses", "no-metrics")]


def test_a_crashing_strategy_never_fails_the_request(plans: Plans) -> None:
    assert pick(plans, "crashes", fleet(3, 1)) == "p1"


def test_an_unknown_pod_is_scored_by_the_fallback_and_the_others_keep_their_scores(
    plans: Plans,
) -> None:
    pods = [
        snapshot("busy", PodMetrics(running=50), in_flight=50),
        snapshot("calm", PodMetrics(running=10), in_flight=10),
        snapshot("new"),
    ]
    ctx = context(pods)
    decision = decide(plans.parse("half-known"), ctx, plans.fallback, "r")
    scores = decision.per_strategy["half-known"]
    assert scores[0] == pytest.approx(0.5) and scores[1] == pytest.approx(0.1)
    # the new pod (no metrics yet) is idle: least-request gives it 1.0, and it wins
    assert scores[2] == pytest.approx(1.0)
    assert ctx.pods[decision.index].name == "new"
    assert decision.fallbacks == [("half-known", "no-metrics")]
    assert snapshot("new").unknown == Unknown("no-metrics")


def test_weights_steer_the_combination(plans: Plans) -> None:
    pods = fleet(0, 0, 50)
    # recorder wants p2 (the busiest); least-request wants p0/p1.
    assert pick(plans, "recorder:10,least-request:1", pods) == "p2"
    assert pick(plans, "recorder:1,least-request:10", pods) != "p2"


def test_hooks_run_for_every_routed_request_whichever_strategy_chose(plans: Plans) -> None:
    recorder = plans.strategies["recorder"]
    assert isinstance(recorder, Recorder)
    ctx = context(fleet(0, 5))
    decision = decide(plans.parse("least-request"), ctx, plans.fallback, "r")
    plans.routed(ctx, ctx.pods[decision.index])
    plans.finished(Finished(ctx.key, ctx.pods[decision.index].name, None, 0, None, 1.0, 2.0))
    assert recorder.routed == ["p0"]
    assert recorder.finished == ["p0"]


def test_named_instances_answer_to_their_names(plans: Plans) -> None:
    named = Plans(
        RoutingSettings(
            strategies={"heavy-load": {"algorithm": "least-request", "smoothing": 100}},
            default_strategy="heavy-load:1,least-request:1",
        )
    )
    assert named.default is not None
    assert [s.name for s in named.default.strategies] == ["heavy-load", "least-request"]
    with pytest.raises(GatewayError):
        plans.parse("heavy-load")
