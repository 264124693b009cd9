"""``prefix-cache``: the pod holding the longest prefix of the prompt, unless load says no."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from strategies.base import Strategy
from strategies.context import PREFIX, RoutingContext, Score
from strategies.selection import lower_is_better


@dataclass
class PrefixCache(Strategy):
    """A match is the leading prompt tokens a candidate caches (``ctx.prefix``): exactly, from
    the pod's own KV-cache events, or as the server believes from what it sent there.

    - load imbalanced (``max_load - min_load > imbalance_abs``): least load decides;
    - best match shorter than ``min_match_blocks`` blocks (a miss, or a short shared preamble
      that saves nothing): least load decides, so misses still spread, and among equally loaded
      pods the one believed to cache the least takes the new prefix;
    - otherwise the longest match wins; pods matching equally are ordered by load, so a hot
      prefix cached on several pods spreads over them.

    Scores: ``0.999 x match / best_match + 0.001 x load_score`` (the match decides, load
    breaks ties), or ``0.999 x load_score + 0.001 x room`` with ``load_score = 1 - load /
    (max_load + 1)`` and ``room = 1 - held / (max_held + 1)``, ``held`` in blocks.
    """

    algorithm = "prefix-cache"
    consumes = frozenset({PREFIX})
    imbalance_abs: float = 8.0
    min_match_blocks: int = 2

    def __post_init__(self) -> None:
        if self.imbalance_abs < 0 or self.min_match_blocks < 1:
            raise ValueError("imbalance_abs must be >= 0 and min_match_blocks >= 1")

    def score(self, ctx: RoutingContext) -> Sequence[Score]:
        prefix = ctx.prefix
        assert prefix is not None, "prefix-cache consumes PREFIX"
        loads = [pod.load for pod in ctx.pods]
        load_scores = lower_is_better(loads, 1.0)
        if max(loads) - min(loads) > self.imbalance_abs:
            return load_scores
        block = prefix.block_tokens
        matches = prefix.affinity(self.min_match_blocks * block)
        best = max(matches)
        if best < self.min_match_blocks * block:
            held_blocks = [held // block for held in prefix.held]
            fullest = max(held_blocks) + 1
            return [
                0.999 * load + 0.001 * (1.0 - held / fullest)
                for held, load in zip(held_blocks, load_scores, strict=True)
            ]
        return [
            0.999 * match / best + 0.001 * load
            for match, load in zip(matches, load_scores, strict=True)
        ]
