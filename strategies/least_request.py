"""``least-request``: the pod with the smallest load estimate; also every strategy's fallback."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from strategies.base import PodView, RequestView, Strategy


@dataclass
class LeastRequest(Strategy):
    """Score ``1 - load / (max_load + smoothing)``.

    Relative to the busiest candidate, so in a weighted list a one-request difference between two
    busy pods moves the score a little, not from 0 to 1; ``smoothing`` keeps an idle fleet from
    dividing by zero and softens the swing between 0 and 1 request.
    """

    name = "least-request"
    smoothing: float = 1.0

    def __post_init__(self) -> None:
        if self.smoothing <= 0:
            raise ValueError("smoothing must be > 0")

    def score(self, request: RequestView, pods: Sequence[PodView]) -> Sequence[float]:
        now = request.now
        loads = [pod.load(now) for pod in pods]
        scale = max(loads) + self.smoothing
        return [1.0 - load / scale for load in loads]
