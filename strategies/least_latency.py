"""``least-latency``: the pod with the lowest expected latency for this request."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from strategies.base import CannotDecide, Strategy
from strategies.context import MetricsWindow, RoutingContext, Score
from strategies.selection import lower_is_better


@dataclass(slots=True)
class _Profile:
    """Per-pod rates measured over the scraper's window."""

    e2e: float
    prefill_per_token: float
    decode_per_token: float
    mean_output: float
    mean_running: float


@dataclass
class LeastLatency(Strategy):
    """Expected latency ``queue + prefill + decode`` from the pod's recent window and its
    current load:
    - ``batch = running + sent_since_scrape + 1``: the batch this request would join;
    - ``queue = waiting x e2e / max(running, 1)`` when the pod queues (``waiting > 0``), with
      the requests sent since the last reading counted as waiting too: with continuous batching
      a slot frees about every ``e2e / running`` seconds; 0 when nothing waits;
    - ``prefill = (ttft - queue_time) / mean_prompt_tokens x this prompt's tokens``;
    - ``decode = (e2e - ttft) / mean_output_tokens x output tokens x batch / (mean_running + 1)``
      where output is ``max_tokens`` (else the pod's recent mean): per-token decode time was
      measured at the window's mean batch and grows with the batch, so a pod already running
      more requests than usual is predicted slower at once, and a burst does not herd onto
      the pod with the best history.
    A pod that finished no request in the window borrows the median profile of the pods that
    did (same model, usually the same hardware); a pod without a fresh reading is unknown.
    Score ``1 - latency / (max_latency + 1 ms)``.
    """

    algorithm = "least-latency"

    def score(self, ctx: RoutingContext) -> Sequence[Score]:
        pods = ctx.pods
        profiles = [_profile(p.metrics.window) if p.metrics is not None else None for p in pods]
        known = [p for p in profiles if p is not None]
        if not known:
            if all(p.metrics is None for p in pods):
                return [p.unknown for p in pods]
            raise CannotDecide("no-latency-data")
        median = _median_profile(known)
        prompt_tokens = ctx.prompt_tokens
        latencies: list[float] = []
        for pod, profile in zip(pods, profiles, strict=True):
            metrics = pod.metrics
            if metrics is None:
                continue
            profile = profile or median
            running = metrics.running or 0.0
            waiting = metrics.waiting or 0.0
            sent = pod.sent_since_scrape
            queue = (waiting + sent) * profile.e2e / max(running, 1.0) if waiting > 0 else 0.0
            batch = running + sent + 1.0
            output = ctx.max_tokens if ctx.max_tokens is not None else profile.mean_output
            decode = profile.decode_per_token * output * batch / (profile.mean_running + 1.0)
            latencies.append(queue + profile.prefill_per_token * prompt_tokens + decode)
        scores = iter(lower_is_better(latencies, 0.001))
        return [next(scores) if p.metrics is not None else p.unknown for p in pods]


def _profile(window: MetricsWindow | None) -> _Profile | None:
    if window is None or window.requests <= 0:
        return None
    if window.e2e_seconds is None or window.ttft_seconds is None:
        return None
    queue = window.queue_seconds or 0.0
    mean_prompt = max(1.0, window.prompt_tokens / window.requests)
    mean_output = max(1.0, window.generation_tokens / window.requests)
    return _Profile(
        e2e=window.e2e_seconds,
        prefill_per_token=max(0.0, window.ttft_seconds - queue) / mean_prompt,
        decode_per_token=max(0.0, window.e2e_seconds - window.ttft_seconds) / mean_output,
        mean_output=mean_output,
        mean_running=window.mean_running,
    )


def _median_profile(profiles: Sequence[_Profile]) -> _Profile:
    return _Profile(
        e2e=statistics.median(p.e2e for p in profiles),
        prefill_per_token=statistics.median(p.prefill_per_token for p in profiles),
        decode_per_token=statistics.median(p.decode_per_token for p in profiles),
        mean_output=statistics.median(p.mean_output for p in profiles),
        mean_running=statistics.median(p.mean_running for p in profiles),
    )
