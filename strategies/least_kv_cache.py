"""``least-kv-cache``: the pod with the lowest KV-cache usage."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from strategies.base import Strategy
from strategies.context import RoutingContext, Score, Unknown

NO_KV_METRIC = Unknown("no-kv-metric")


@dataclass
class LeastKvCache(Strategy):
    """Score ``1 - (kv_usage + sent_since_scrape x request_share)``, clamped to 0..1.

    ``kv_usage`` is the read fraction of KV blocks in use. Between two readings a burst would
    otherwise all land on the same emptiest pod, so each request routed since the last reading
    adds this request's estimated share of the pod's cache: ``(prompt_tokens + max_tokens) /
    (block_size x num_gpu_blocks)``, when the pod exports ``vllm:cache_config_info``. A pod
    without a fresh reading is unknown (scored by the fallback).
    """

    algorithm = "least-kv-cache"
    default_max_tokens: int = 256

    def __post_init__(self) -> None:
        if self.default_max_tokens < 0:
            raise ValueError("default_max_tokens must be >= 0")

    def score(self, ctx: RoutingContext) -> Sequence[Score]:
        max_tokens = ctx.max_tokens if ctx.max_tokens is not None else self.default_max_tokens
        tokens = ctx.prompt_tokens + max_tokens
        scores: list[Score] = []
        for pod in ctx.pods:
            metrics = pod.metrics
            if metrics is None:
                scores.append(pod.unknown)
                continue
            usage = metrics.kv_cache_usage
            if usage is None:
                scores.append(NO_KV_METRIC)
                continue
            if metrics.block_size and metrics.num_gpu_blocks:
                share = tokens / (metrics.block_size * metrics.num_gpu_blocks)
                usage += pod.sent_since_scrape * share
            scores.append(max(0.0, 1.0 - usage))
        return scores
