"""``prefix-cache-and-load``: the pod where this request costs least, counting prefill to redo,
queue to wait behind and cache pressure, all in one unit."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from strategies.base import PodView, RequestView, Strategy
from strategies.selection import lower_is_better


@dataclass
class PrefixCacheAndLoad(Strategy):
    """Score ``1 - cost / (max_cost + 1)``, where a pod's cost is counted in prompt blocks
    (a block is 64 characters, about 16 tokens):

    ``cost = (prompt_blocks - matched_blocks) + load_blocks x load + kv_blocks x kv_usage``

    - the prefill still to do there: the prompt's blocks the pod is not believed to hold;
    - ``load`` (the load estimate) priced at ``load_blocks`` blocks of prefill per request:
      what a request already there delays this one by. A pod caching a hot prefix but queueing
      loses to an idle pod once its extra load costs more than the prefill saved; the idle pod
      then caches the prefix too, so hot prefixes replicate instead of pinning every session to
      one pod. Long shared histories (multi-turn chats) keep their pod through small load
      differences; a short prompt saves little, so its match cannot outweigh load (no ratio
      scores);
    - ``kv_usage`` priced at ``kv_blocks``, when every candidate has fresh metrics (else left
      out): a full cache evicts, so what is sent there is soon forgotten.

    On a miss (no candidate holds ``min_match_blocks``) every pod would prefill the whole
    prompt, and ``room_blocks x cached_blocks / max_cached_blocks`` is added: the pod believed
    to cache the least takes the new prefix, so distinct prefixes spread over the caches
    instead of crowding and evicting each other on one pod.
    """

    name = "prefix-cache-and-load"
    needs_prefix = True
    load_blocks: float = 32.0
    kv_blocks: float = 8.0
    room_blocks: float = 32.0
    min_match_blocks: int = 2

    def __post_init__(self) -> None:
        if min(self.load_blocks, self.kv_blocks, self.room_blocks) < 0:
            raise ValueError("load_blocks, kv_blocks and room_blocks must be >= 0")
        if self.min_match_blocks < 1:
            raise ValueError("min_match_blocks must be >= 1")

    def score(self, request: RequestView, pods: Sequence[PodView]) -> Sequence[float]:
        now = request.now
        total = request.prefix_blocks
        minimum = self.min_match_blocks
        matches = request.prefix_matches
        costs = []
        for pod in pods:
            matched = matches.get(pod.name, 0)
            costs.append(
                total - (matched if matched >= minimum else 0) + self.load_blocks * pod.load(now)
            )
        if self.kv_blocks:
            usages = []
            for pod in pods:
                metrics = pod.fresh_metrics(now)
                if metrics is None or metrics.kv_cache_usage is None:
                    break
                usages.append(metrics.kv_cache_usage)
            else:
                costs = [c + self.kv_blocks * u for c, u in zip(costs, usages, strict=True)]
        if self.room_blocks and not any(matches.get(p.name, 0) >= minimum for p in pods):
            fullest = max(pod.cached_blocks for pod in pods)
            if fullest:
                costs = [
                    c + self.room_blocks * pod.cached_blocks / fullest
                    for c, pod in zip(costs, pods, strict=True)
                ]
        return lower_is_better(costs, 1.0)
