"""``prefix-cache-and-load``: the pod where this request costs least, counting prefill to redo,
queue to wait behind and cache pressure, all in one unit: tokens of prefill."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from strategies.base import Strategy
from strategies.context import PREFIX, RoutingContext, Score
from strategies.selection import lower_is_better

SMOOTHING_TOKENS = 16.0


@dataclass
class PrefixCacheAndLoad(Strategy):
    """Score ``1 - cost / (max_cost + 16)``, where a pod's cost is counted in prompt tokens:

    ``cost = (prompt_tokens - matched_tokens) + load_tokens x load + kv_tokens x kv_usage``

    - the prefill still to do there: the prompt's full blocks the pod is not believed to hold,
      in tokens;
    - ``load`` (the load estimate) priced at ``load_tokens`` tokens of prefill per request:
      what a request already there delays this one by. A pod caching a hot prefix but queueing
      loses to an idle pod once its extra load costs more than the prefill saved; the idle pod
      then caches the prefix too, so hot prefixes replicate instead of pinning every session to
      one pod. Long shared histories (multi-turn chats) keep their pod through small load
      differences; a short prompt saves little, so its match cannot outweigh load;
    - ``kv_usage`` priced at ``kv_tokens``, when every candidate has a fresh reading (else left
      out): a full cache evicts, so what is sent there is soon forgotten.

    On a miss (no candidate holds ``min_match_blocks`` blocks) every pod would prefill the
    whole prompt, and ``room_tokens x held / max_held`` is added: the pod believed to cache the
    least takes the new prefix, so distinct prefixes spread over the caches instead of crowding
    and evicting each other on one pod. Where pods publish KV-cache events and none holds the
    prompt any more, ``matched_tokens`` is where this server sent it
    (``PrefixMatches.affinity``): the prefix keeps one home under cache pressure.
    """

    algorithm = "prefix-cache-and-load"
    consumes = frozenset({PREFIX})
    load_tokens: float = 512.0
    kv_tokens: float = 128.0
    room_tokens: float = 512.0
    min_match_blocks: int = 2

    def __post_init__(self) -> None:
        if min(self.load_tokens, self.kv_tokens, self.room_tokens) < 0:
            raise ValueError("load_tokens, kv_tokens and room_tokens must be >= 0")
        if self.min_match_blocks < 1:
            raise ValueError("min_match_blocks must be >= 1")

    def score(self, ctx: RoutingContext) -> Sequence[Score]:
        prefix = ctx.prefix
        assert prefix is not None, "prefix-cache-and-load consumes PREFIX"
        pods = ctx.pods
        total = prefix.prompt_tokens
        minimum = self.min_match_blocks * prefix.block_tokens
        load_tokens = self.load_tokens
        matches = prefix.affinity(minimum)
        costs = [
            total - (matched if matched >= minimum else 0) + load_tokens * pod.load
            for matched, pod in zip(matches, pods, strict=True)
        ]
        if self.kv_tokens:
            usages = []
            for pod in pods:
                metrics = pod.metrics
                if metrics is None or metrics.kv_cache_usage is None:
                    break
                usages.append(metrics.kv_cache_usage)
            else:
                costs = [c + self.kv_tokens * u for c, u in zip(costs, usages, strict=True)]
        if self.room_tokens and max(matches) < minimum:
            fullest = max(prefix.held)
            if fullest:
                costs = [
                    c + self.room_tokens * held / fullest
                    for c, held in zip(costs, prefix.held, strict=True)
                ]
        return lower_is_better(costs, SMOOTHING_TOKENS)
