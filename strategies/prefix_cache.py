"""``prefix-cache``: the pod holding the longest prefix of the prompt, unless load says no."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from strategies.base import PodView, RequestView, Strategy
from strategies.selection import lower_is_better


@dataclass
class PrefixCache(Strategy):
    """A match is ``prefix_matches[pod]`` leading blocks of the prompt believed cached there.

    - load imbalanced (``max_load - min_load > imbalance_abs``): least load decides;
    - best match shorter than ``min_match_blocks`` (a miss, or a short shared preamble that
      saves nothing): least load decides, so misses still spread, and among equally loaded
      pods the one believed to cache the least takes the new prefix;
    - otherwise the longest match wins; pods matching equally are ordered by load, so a hot
      prefix cached on several pods spreads over them.

    Scores: ``0.999 x match / best_match + 0.001 x load_score`` (the match decides, load
    breaks ties), or ``0.999 x load_score + 0.001 x room`` with ``load_score = 1 - load /
    (max_load + 1)`` and ``room = 1 - cached_blocks / (max_cached_blocks + 1)``.
    """

    name = "prefix-cache"
    needs_prefix = True
    imbalance_abs: float = 8.0
    min_match_blocks: int = 2

    def __post_init__(self) -> None:
        if self.imbalance_abs < 0 or self.min_match_blocks < 1:
            raise ValueError("imbalance_abs must be >= 0 and min_match_blocks >= 1")

    def score(self, request: RequestView, pods: Sequence[PodView]) -> Sequence[float]:
        now = request.now
        loads = [pod.load(now) for pod in pods]
        load_scores = lower_is_better(loads, 1.0)
        matches = [request.prefix_matches.get(pod.name, 0) for pod in pods]
        best = max(matches)
        if max(loads) - min(loads) > self.imbalance_abs:
            return load_scores
        if best < self.min_match_blocks:
            fullest = max(pod.cached_blocks for pod in pods) + 1
            return [
                0.999 * load + 0.001 * (1.0 - pod.cached_blocks / fullest)
                for pod, load in zip(pods, load_scores, strict=True)
            ]
        return [
            0.999 * match / best + 0.001 * load
            for match, load in zip(matches, load_scores, strict=True)
        ]
