"""``random``: a uniform choice among the candidates."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from strategies.base import Strategy
from strategies.context import RoutingContext, Score


@dataclass
class RandomChoice(Strategy):
    """Independent uniform scores: alone it is a uniform pick; in a weighted list it adds noise.
    Draws from the request's generator, so a dry run does not shift live picks."""

    algorithm = "random"

    def score(self, ctx: RoutingContext) -> Sequence[Score]:
        rand = ctx.rng.random
        return [rand() for _ in ctx.pods]
