"""``least-kv-cache``: the pod with the lowest KV-cache usage."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from strategies.base import CannotDecide, PodView, RequestView, Strategy


@dataclass
class LeastKvCache(Strategy):
    """Score ``1 - (kv_usage + sent_since_scrape x request_share)``, clamped to 0..1.

    ``kv_usage`` is the scraped fraction of KV blocks in use. Between two scrapes a burst would
    otherwise all land on the same emptiest pod, so each request routed since the last scrape
    adds this request's estimated share of the pod's cache: ``(prompt_tokens + max_tokens) /
    (block_size x num_gpu_blocks)``, when the pod exports ``vllm:cache_config_info``.
    """

    name = "least-kv-cache"
    chars_per_token: float = 4.0
    default_max_tokens: int = 256

    def __post_init__(self) -> None:
        if self.chars_per_token <= 0 or self.default_max_tokens < 0:
            raise ValueError("chars_per_token must be > 0 and default_max_tokens >= 0")

    def score(self, request: RequestView, pods: Sequence[PodView]) -> Sequence[float]:
        now = request.now
        tokens = request.prompt_length / self.chars_per_token + (
            request.max_tokens if request.max_tokens is not None else self.default_max_tokens
        )
        scores = []
        for pod in pods:
            metrics = pod.metrics_or_raise(now)
            usage = metrics.kv_cache_usage
            if usage is None:
                raise CannotDecide("no-kv-metric")
            if metrics.block_size and metrics.num_gpu_blocks:
                share = tokens / (metrics.block_size * metrics.num_gpu_blocks)
                usage += pod.sent_since_scrape * share
            scores.append(max(0.0, 1.0 - usage))
        return scores
