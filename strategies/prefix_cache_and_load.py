"""``prefix-cache-and-load``: one score trading prefix reuse against load and KV pressure."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from strategies.base import PodView, RequestView, Strategy


@dataclass
class PrefixCacheAndLoad(Strategy):
    """Weighted mean of three terms per pod, each in 0..1:

    - match: ``matched_blocks / max(prompt_blocks, full_weight_blocks)``, and 0 below
      ``min_match_blocks``: a short prompt matched in full saves little prefill, so it must
      not outweigh load (ratio scores let short prompts pile onto one pod);
    - load: ``exp(-(load - min_load) / load_scale)`` over the load estimate: 1 for the least
      loaded candidate, falling fast with every request more. With ``load_weight`` above
      ``match_weight``, a full match is worth about ``load_scale x ln(load_weight /
      (load_weight - match_weight))`` extra requests (2.8 with the defaults): a pod that caches
      a hot prefix but queues requests loses to an idle one, which then caches the prefix
      too, so hot prefixes replicate instead of pinning every session to one pod;
    - kv: ``1 - kv_cache_usage`` when every candidate has fresh metrics (else left out, the
      other weights rescaled): a full cache evicts, so what is sent there is soon forgotten.

    On a miss the match term is 0 everywhere and load and KV decide.
    """

    name = "prefix-cache-and-load"
    needs_prefix = True
    match_weight: float = 1.0
    load_weight: float = 2.0
    kv_weight: float = 0.25
    load_scale: float = 4.0
    full_weight_blocks: int = 16
    min_match_blocks: int = 2

    def __post_init__(self) -> None:
        if min(self.match_weight, self.load_weight, self.kv_weight) < 0:
            raise ValueError("weights must be >= 0")
        if self.match_weight + self.load_weight + self.kv_weight <= 0:
            raise ValueError("at least one weight must be > 0")
        if self.load_scale <= 0:
            raise ValueError("load_scale must be > 0")
        if self.full_weight_blocks < 1 or self.min_match_blocks < 1:
            raise ValueError("full_weight_blocks and min_match_blocks must be >= 1")

    def score(self, request: RequestView, pods: Sequence[PodView]) -> Sequence[float]:
        now = request.now
        scale = float(max(request.prefix_blocks, self.full_weight_blocks))
        minimum = self.min_match_blocks
        loads = [pod.load(now) for pod in pods]
        least = min(loads)
        load_scores = [math.exp((least - load) / self.load_scale) for load in loads]
        kv_weight = self.kv_weight
        usages: list[float] = []
        if kv_weight:
            for pod in pods:
                metrics = pod.fresh_metrics(now)
                if metrics is None or metrics.kv_cache_usage is None:
                    kv_weight = 0.0
                    break
                usages.append(metrics.kv_cache_usage)
        total = self.match_weight + self.load_weight + kv_weight
        scores = []
        for index, pod in enumerate(pods):
            matched = request.prefix_matches.get(pod.name, 0)
            match = matched / scale if matched >= minimum else 0.0
            value = self.match_weight * min(1.0, match) + self.load_weight * load_scores[index]
            if kv_weight:
                value += kv_weight * (1.0 - usages[index])
            scores.append(value / total)
        return scores
