"""``prefix-cache-and-load``: the pod where this request costs least, counting prefill to redo,
queue to wait behind and cache pressure, all in one unit: tokens of prefill."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from strategies.base import Strategy
from strategies.context import PREFIX, PodSnapshot, RoutingContext, Score
from strategies.selection import lower_is_better

SMOOTHING_TOKENS = 16.0


@dataclass
class PrefixCacheAndLoad(Strategy):
    """Score ``1 - cost / (max_cost + 16)``, where a pod's cost is counted in prompt tokens:

    ``cost = prefill x (1 + evict_weight x fullness) + load_tokens x load + kv_tokens x kv_usage``

    - ``prefill``, the prefill still to do there: the prompt's full blocks the pod is not
      believed to hold, in tokens (``prompt_tokens - matched_tokens``);
    - ``fullness``, how full the pod's cache is with what this server placed there
      (``held / (num_gpu_blocks x block_size)``, at most 1; left out unless every candidate
      reports its cache size): on a full cache every token prefilled evicts a cached one that
      some later request recomputes, so a miss there costs up to twice its prefill. Under cache
      pressure this keeps a prefix on its pod through load differences that would otherwise
      copy it to a second pod, where both copies evict other prefixes;
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
    and evicting each other on one pod. Where pods publish KV-cache events, ``matched_tokens``
    is made sticky (``PrefixMatches.affinity``): a pod that kept the head of what this server
    sent it counts as holding all of it, and a prompt no pod holds any more goes back where it
    was sent, so under cache pressure the prefix keeps one home.
    """

    algorithm = "prefix-cache-and-load"
    consumes = frozenset({PREFIX})
    load_tokens: float = 512.0
    kv_tokens: float = 128.0
    room_tokens: float = 512.0
    evict_weight: float = 1.0
    min_match_blocks: int = 2

    def __post_init__(self) -> None:
        if min(self.load_tokens, self.kv_tokens, self.room_tokens, self.evict_weight) < 0:
            raise ValueError("load_tokens, kv_tokens, room_tokens and evict_weight must be >= 0")
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
        prefill: list[float] = [total - (m if m >= minimum else 0) for m in matches]
        if self.evict_weight:
            fullness = cache_fullness(prefix.held, pods)
            if fullness is not None:
                weight = self.evict_weight
                prefill = [p * (1.0 + weight * f) for p, f in zip(prefill, fullness, strict=True)]
        costs = [p + load_tokens * pod.load for p, pod in zip(prefill, pods, strict=True)]
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


def cache_fullness(held: Sequence[int], pods: Sequence[PodSnapshot]) -> list[float] | None:
    """Per pod, ``held`` tokens over its KV cache's tokens (at most 1); ``None`` unless every
    pod has a fresh reading of its cache size, so no pod looks emptier for lack of one."""
    fullness = []
    for tokens, pod in zip(held, pods, strict=True):
        metrics = pod.metrics
        if metrics is None or not metrics.num_gpu_blocks or not metrics.block_size:
            return None
        fullness.append(min(1.0, tokens / (metrics.num_gpu_blocks * metrics.block_size)))
    return fullness
