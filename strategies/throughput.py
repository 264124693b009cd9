"""``throughput``: the pod that processed the fewest weighted tokens in the recent window."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from strategies.base import CannotDecide, PodView, RequestView, Strategy
from strategies.selection import lower_is_better


@dataclass
class Throughput(Strategy):
    """Score ``1 - work / (max_work + smoothing)`` with, per pod,
    ``work = (2 x prompt_tokens + generation_tokens over the window + backlog) / window_seconds``
    and ``backlog = sent_since_scrape x 2 x this prompt's tokens + load x mean_output_tokens``.

    The token counts come from the pod's own counters (``vllm:prompt_tokens_total``,
    ``vllm:generation_tokens_total``), so traffic from every gateway replica counts, not only
    this one's. Prefill costs about twice decode per token, hence the weight 2. The backlog
    counts work already committed but not yet in the counters (prompts not yet scraped, outputs
    still being generated); without it a pod that just took long generations keeps looking idle
    and draws every request until its counters catch up.
    """

    name = "throughput"
    chars_per_token: float = 4.0
    smoothing: float = 1.0

    def __post_init__(self) -> None:
        if self.chars_per_token <= 0 or self.smoothing <= 0:
            raise ValueError("chars_per_token and smoothing must be > 0")

    def score(self, request: RequestView, pods: Sequence[PodView]) -> Sequence[float]:
        now = request.now
        pending = 2.0 * request.prompt_length / self.chars_per_token
        work = []
        for pod in pods:
            window = pod.metrics_or_raise(now).window
            if window is None or window.seconds <= 0:
                raise CannotDecide("no-window")
            mean_output = window.generation_tokens / window.requests if window.requests else 0.0
            backlog = pod.sent_since_scrape * pending + pod.load(now) * mean_output
            work.append((window.weighted_tokens + backlog) / window.seconds)
        return lower_is_better(work, self.smoothing)
