"""Filter, score, pick: the plan's strategies score the candidates, unknowns fall back, the
weighted scores combine and the best pod wins (ties at random).

A strategy may leave single pods ``Unknown`` (a pod without a fresh reading, say): those pods
take the fallback strategy's score, the others keep theirs, and the decision records the
fallback with its reason. A strategy that cannot decide at all, or fails, is replaced by the
fallback for every pod. Nothing here changes state: counting and hooks are the pipeline's, so
the same function serves a real request and a dry run.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from extproc.routing.plans import Plan
from strategies.base import CannotDecide, Strategy
from strategies.context import RoutingContext, Unknown
from strategies.selection import best_index, combine

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Decision:
    index: int
    """The chosen candidate's position in ``ctx.pods``."""
    combined: list[float]
    """The weighted mean the pick is the best of, per candidate."""
    per_strategy: dict[str, Sequence[float]]
    """Each strategy's scores after fallbacks, per candidate."""
    fallbacks: list[tuple[str, str]] = field(default_factory=list)
    """``(strategy, reason)`` for each strategy that could not score some or all candidates."""

    def ranked(self, limit: int) -> list[int]:
        """Up to ``limit`` candidate positions, the chosen one first, then by combined score."""
        if limit <= 1:
            return [self.index]
        combined = self.combined
        rest = heapq.nlargest(
            limit - 1,
            (i for i in range(len(combined)) if i != self.index),
            key=combined.__getitem__,
        )
        return [self.index, *rest]


def decide(plan: Plan, ctx: RoutingContext, fallback: Strategy, request_id: str) -> Decision:
    """Score ``ctx.pods`` (non-empty) with every strategy of ``plan`` and pick the best."""
    fallbacks: list[tuple[str, str]] = []
    cache: list[list[float]] = []
    per_strategy: dict[str, Sequence[float]] = {}
    for strategy in plan.strategies:
        per_strategy[strategy.name] = _scores(strategy, ctx, fallback, fallbacks, cache, request_id)
    lists = list(per_strategy.values())
    combined = combine(lists, plan.weights, len(ctx.pods))
    return Decision(best_index(combined, ctx.rng), combined, per_strategy, fallbacks)


def _scores(
    strategy: Strategy,
    ctx: RoutingContext,
    fallback: Strategy,
    fallbacks: list[tuple[str, str]],
    cache: list[list[float]],
    request_id: str,
) -> Sequence[float]:
    try:
        scores = strategy.score(ctx)
        if len(scores) != len(ctx.pods):
            raise ValueError(f"{len(scores)} scores for {len(ctx.pods)} pods")
    except CannotDecide as exc:
        fallbacks.append((strategy.name, exc.reason))
        return _fallback(ctx, fallback, cache)
    except Exception:
        log.exception(
            "strategy failed; falling back",
            extra={"strategy": strategy.name, "request_id": request_id},
        )
        fallbacks.append((strategy.name, "error"))
        return _fallback(ctx, fallback, cache)
    for value in scores:
        if value.__class__ is Unknown:
            break
    else:
        return scores  # type: ignore[return-value]  # all known: floats
    result: list[float] = []
    reason = ""
    for i, value in enumerate(scores):
        if isinstance(value, Unknown):
            reason = reason or value.reason
            value = _fallback(ctx, fallback, cache)[i]
        result.append(value)
    fallbacks.append((strategy.name, reason))
    return result


def _fallback(ctx: RoutingContext, fallback: Strategy, cache: list[list[float]]) -> list[float]:
    """The fallback strategy's scores, computed at most once per decision."""
    if not cache:
        cache.append([float(v) for v in _known(fallback.score(ctx))])
    return cache[0]


def _known(scores: Sequence[float | Unknown]) -> list[float]:
    return [0.0 if isinstance(v, Unknown) else v for v in scores]
