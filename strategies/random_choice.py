"""``random``: a uniform choice among the candidates."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from strategies.base import PodView, RequestView, Strategy


@dataclass
class RandomChoice(Strategy):
    """Independent uniform scores: alone it is a uniform pick; in a weighted list it adds noise."""

    name = "random"
    seed: int | None = None
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def score(self, request: RequestView, pods: Sequence[PodView]) -> Sequence[float]:
        rand = self._rng.random
        return [rand() for _ in pods]
