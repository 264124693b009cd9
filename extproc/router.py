"""Turns a ``routing-strategy`` value into a plan, and a plan plus candidates into one pod.

Owns one instance of every registered strategy (they may keep state), the fallback rule
(``least-request``, counted with a reason), the weighted combination and the random tie-break.
"""

from __future__ import annotations

import logging
import random
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from extproc import errors
from extproc.telemetry import Telemetry
from strategies import registry
from strategies.base import CannotDecide, PodView, RequestView, Strategy, Timings, Usage, overrides
from strategies.selection import PlanSyntaxError, best_index, combine, parse_weighted

log = logging.getLogger(__name__)

PLAN_CACHE_SIZE = 256


@dataclass(frozen=True, slots=True)
class Plan:
    """A parsed strategy list, cached by its header value."""

    label: str
    """Normalised form, e.g. ``prefix-cache:2,least-kv-cache:1``; a bare name for one strategy."""
    metric_label: str
    """The strategy name, or ``weighted`` for a list, so metric labels stay bounded."""
    strategies: tuple[Strategy, ...]
    weights: tuple[float, ...]
    needs_prefix: bool
    needs_usage: bool
    header_value: bytes


@dataclass(slots=True)
class Decision:
    pod: PodView
    scores: list[float]
    fallbacks: list[tuple[str, str]] = field(default_factory=list)
    """``(strategy, reason)`` for each strategy that could not decide."""
    seconds: float = 0.0


@dataclass(slots=True)
class Explanation:
    per_strategy: dict[str, list[float]]
    """Strategy name -> one score per pod, in the plan's order."""
    combined: list[float]
    """The weighted mean ``decide`` picks the best of."""
    fallbacks: list[tuple[str, str]]


class Router:
    def __init__(
        self,
        telemetry: Telemetry,
        strategy_options: Mapping[str, Mapping[str, Any]] | None = None,
        seed: int | None = None,
    ) -> None:
        options = strategy_options or {}
        self._telemetry = telemetry
        self._rng = random.Random(seed)
        self.strategies: dict[str, Strategy] = {
            name: registry.build(name, options.get(name)) for name in registry.names()
        }
        self._fallback = self.strategies[registry.FALLBACK]
        self._routed_hooks = [s for s in self.strategies.values() if overrides(s, "on_routed")]
        self._finished_hooks = [s for s in self.strategies.values() if overrides(s, "on_finished")]
        self._forget_hooks = [s for s in self.strategies.values() if overrides(s, "forget_pod")]
        self._plans: OrderedDict[str, Plan] = OrderedDict()

    def plan(self, value: str, header: str = "routing-strategy") -> Plan:
        """The plan for a header value; a 400 ``GatewayError`` names a bad or unknown strategy."""
        cached = self._plans.get(value)
        if cached is not None:
            self._plans.move_to_end(value)
            return cached
        try:
            entries = parse_weighted(value)
        except PlanSyntaxError as exc:
            raise errors.invalid_strategy(str(exc), header) from None
        for name, _ in entries:
            if name not in self.strategies:
                raise errors.unknown_strategy(name, registry.names(), header)
        chosen = tuple(self.strategies[name] for name, _ in entries)
        single = len(entries) == 1
        label = entries[0][0] if single else ",".join(f"{n}:{w:g}" for n, w in entries)
        plan = Plan(
            label=label,
            metric_label=entries[0][0] if single else "weighted",
            strategies=chosen,
            weights=tuple(w for _, w in entries),
            needs_prefix=any(s.needs_prefix for s in chosen),
            needs_usage=any(s.needs_usage for s in chosen),
            header_value=label.encode(),
        )
        self._plans[value] = plan
        if len(self._plans) > PLAN_CACHE_SIZE:
            self._plans.popitem(last=False)
        return plan

    def decide(self, plan: Plan, request: RequestView, pods: Sequence[PodView]) -> Decision:
        """Score ``pods`` (non-empty) with every strategy of ``plan`` and pick the best."""
        started = time.perf_counter()
        fallbacks: list[tuple[str, str]] = []
        score_lists = [
            self._scores(strategy, request, pods, fallbacks) for strategy in plan.strategies
        ]
        scores = combine(score_lists, plan.weights, len(pods))
        pod = pods[best_index(scores, self._rng)]
        seconds = time.perf_counter() - started
        self._telemetry.observe_decision(plan.metric_label, seconds)
        return Decision(pod, scores, fallbacks, seconds)

    def explain(self, plan: Plan, request: RequestView, pods: Sequence[PodView]) -> Explanation:
        """What ``decide`` would weigh, without side effects on strategy state or metrics."""
        fallbacks: list[tuple[str, str]] = []
        per_strategy = {
            strategy.name: list(self._scores(strategy, request, pods, fallbacks, count=False))
            for strategy in plan.strategies
        }
        combined = combine(list(per_strategy.values()), plan.weights, len(pods))
        return Explanation(per_strategy, combined, fallbacks)

    def _scores(
        self,
        strategy: Strategy,
        request: RequestView,
        pods: Sequence[PodView],
        fallbacks: list[tuple[str, str]],
        count: bool = True,
    ) -> Sequence[float]:
        try:
            scores = strategy.score(request, pods)
            if len(scores) != len(pods):
                raise ValueError(f"{len(scores)} scores for {len(pods)} pods")
            return scores
        except CannotDecide as exc:
            reason = exc.reason
        except Exception:
            log.exception(
                "strategy failed; falling back to %s",
                registry.FALLBACK,
                extra={"strategy": strategy.name, "request_id": request.request_id},
            )
            reason = "error"
        fallbacks.append((strategy.name, reason))
        if count:
            self._telemetry.fallbacks.labels(strategy.name, reason).inc()
        return self._fallback.score(request, pods)

    def routed(self, request: RequestView, pod: PodView) -> None:
        for strategy in self._routed_hooks:
            try:
                strategy.on_routed(request, pod)
            except Exception:
                log.exception("on_routed hook failed", extra={"strategy": strategy.name})

    def finished(
        self, request: RequestView, pod: PodView, usage: Usage | None, timings: Timings
    ) -> None:
        for strategy in self._finished_hooks:
            try:
                strategy.on_finished(request, pod, usage, timings)
            except Exception:
                log.exception("on_finished hook failed", extra={"strategy": strategy.name})

    def forget_pod(self, name: str) -> None:
        for strategy in self._forget_hooks:
            strategy.forget_pod(name)
