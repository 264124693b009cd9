"""Parsing a ``routing-strategy`` value and turning per-strategy scores into one pick."""

from __future__ import annotations

import random
from collections.abc import Sequence

WEIGHT_MAX = 1000.0
TIE_TOLERANCE = 1e-9
"""Scores this close to the best count as tied (and ties break at random)."""


class PlanSyntaxError(ValueError):
    """The header is not a strategy name nor a ``name:weight,...`` list."""


def parse_weighted(value: str) -> list[tuple[str, float]]:
    """``"prefix-cache:2,least-kv-cache:1"`` -> ``[("prefix-cache", 2), ("least-kv-cache", 1)]``.

    A bare name has weight 1. Names repeat at most once; weights are finite, > 0 and <= 1000.
    """
    entries: list[tuple[str, float]] = []
    seen: set[str] = set()
    for raw in value.split(","):
        part = raw.strip()
        if not part:
            raise PlanSyntaxError(f"empty entry in routing strategy list {value!r}")
        name, sep, weight_text = part.partition(":")
        name = name.strip()
        weight = 1.0
        if sep:
            try:
                weight = float(weight_text)
            except ValueError:
                raise PlanSyntaxError(
                    f"weight {weight_text.strip()!r} of strategy {name!r} is not a number"
                ) from None
            if not 0 < weight <= WEIGHT_MAX:
                raise PlanSyntaxError(
                    f"weight of strategy {name!r} must be > 0 and <= {WEIGHT_MAX:g}"
                )
        if name in seen:
            raise PlanSyntaxError(f"strategy {name!r} is listed twice")
        seen.add(name)
        entries.append((name, weight))
    return entries


def lower_is_better(values: Sequence[float], smoothing: float) -> list[float]:
    """Scores ``1 - v / (max(v) + smoothing)``: the smallest value scores highest.

    Relative to the largest candidate value, so in a weighted list a small difference between
    two busy pods moves the score a little; ``smoothing`` (in the values' unit) keeps an idle
    fleet from dividing by zero and damps swings between near-zero values.
    """
    scale = max(values) + smoothing
    return [1.0 - value / scale for value in values]


def combine(
    score_lists: Sequence[Sequence[float]], weights: Sequence[float], size: int
) -> list[float]:
    """Weighted mean of the strategies' scores, per pod."""
    if len(score_lists) == 1:
        return list(score_lists[0])
    total_weight = sum(weights)
    combined = [0.0] * size
    for scores, weight in zip(score_lists, weights, strict=True):
        share = weight / total_weight
        for i, value in enumerate(scores):
            combined[i] += share * value
    return combined


def best_index(
    scores: Sequence[float], rng: random.Random, tolerance: float = TIE_TOLERANCE
) -> int:
    """Index of the highest score; ties (within ``tolerance``) break uniformly at random."""
    top = max(scores)
    tied = [i for i, value in enumerate(scores) if value >= top - tolerance]
    return tied[0] if len(tied) == 1 else rng.choice(tied)
