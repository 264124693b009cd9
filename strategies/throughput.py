"""``throughput``: the pod that processed the fewest weighted tokens in the recent window."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from strategies.base import Strategy
from strategies.context import RoutingContext, Score, Unknown
from strategies.selection import lower_is_better

NO_WINDOW = Unknown("no-window")


@dataclass
class Throughput(Strategy):
    """Score ``1 - work / (max_work + smoothing)`` with, per pod,
    ``work = (2 x prompt_tokens + generation_tokens over the window + backlog) / window_seconds``
    and ``backlog = 2 x sent_prompt_tokens + load x mean_output_tokens``.

    The token counts come from the pod's own counters (``vllm:prompt_tokens_total``,
    ``vllm:generation_tokens_total``), so traffic from every gateway replica counts, not only
    this one's. Prefill costs about twice decode per token, hence the weight 2. The backlog
    counts work already committed but not yet in the counters: the prompt tokens routed to the
    pod since its counters were read, and the outputs still being generated; without it a pod
    that just took long generations keeps looking idle and draws every request until its
    counters catch up. A pod without a window (no reading, or only one) is unknown.
    """

    algorithm = "throughput"
    smoothing: float = 1.0

    def __post_init__(self) -> None:
        if self.smoothing <= 0:
            raise ValueError("smoothing must be > 0")

    def score(self, ctx: RoutingContext) -> Sequence[Score]:
        work: list[float | None] = []
        for pod in ctx.pods:
            metrics = pod.metrics
            window = metrics.window if metrics is not None else None
            if window is None or window.seconds <= 0:
                work.append(None)
                continue
            mean_output = window.generation_tokens / window.requests if window.requests else 0.0
            backlog = 2.0 * pod.sent_prompt_tokens + pod.load * mean_output
            work.append((window.weighted_tokens + backlog) / window.seconds)
        known = [w for w in work if w is not None]
        if not known:
            return [pod.unknown if pod.metrics is None else NO_WINDOW for pod in ctx.pods]
        scores = iter(lower_is_better(known, self.smoothing))
        return [
            next(scores) if w is not None else (pod.unknown if pod.metrics is None else NO_WINDOW)
            for w, pod in zip(work, ctx.pods, strict=True)
        ]
