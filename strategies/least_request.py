"""``least-request``: the pod with the smallest load estimate; also every strategy's fallback."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from strategies.base import Strategy
from strategies.context import RoutingContext, Score
from strategies.selection import lower_is_better


@dataclass
class LeastRequest(Strategy):
    """Score ``1 - load / (max_load + smoothing)`` over the load estimate
    (``PodSnapshot.load``)."""

    algorithm = "least-request"
    smoothing: float = 1.0

    def __post_init__(self) -> None:
        if self.smoothing <= 0:
            raise ValueError("smoothing must be > 0")

    def score(self, ctx: RoutingContext) -> Sequence[Score]:
        return lower_is_better([pod.load for pod in ctx.pods], self.smoothing)
