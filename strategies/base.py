"""The plain data a strategy sees, and the interface every strategy implements.

Nothing here knows about gRPC, Envoy, Redis or Kubernetes: the server translates its own state into
these views, so every algorithm can be exercised with hand-made pods in a unit test.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar


class CannotDecide(Exception):
    """Raised by a strategy that has no basis for a choice; the router falls back and counts it.

    ``reason`` becomes a metric label, so it must come from a small fixed set per strategy.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(slots=True)
class Histogram:
    """A Prometheus histogram's running ``_sum`` and ``_count`` (buckets are not needed)."""

    sum: float = 0.0
    count: float = 0.0


@dataclass(slots=True)
class MetricsWindow:
    """What a pod did over the scraper's recent window, from counter and histogram deltas.

    Means are ``None`` when no request finished on the pod during the window.
    """

    seconds: float = 0.0
    requests: float = 0.0
    prompt_tokens: float = 0.0
    generation_tokens: float = 0.0
    queue_seconds: float | None = None
    ttft_seconds: float | None = None
    e2e_seconds: float | None = None
    mean_running: float = 0.0
    """Average batch size (``running``) over the window's samples: the batch the latency means
    were measured at."""

    @property
    def weighted_tokens(self) -> float:
        """Prefill is roughly twice the work of decode per token: ``2 x prompt + completion``."""
        return 2.0 * self.prompt_tokens + self.generation_tokens


@dataclass(slots=True)
class PodMetrics:
    """One scrape of a pod's ``/metrics``, normalised (fractions in 0..1, seconds).

    A field is ``None`` when the pod does not export it; strategies must treat that as unknown.
    ``window`` is derived by the scraper from successive scrapes (``None`` until it has two).
    """

    running: float | None = None
    waiting: float | None = None
    kv_cache_usage: float | None = None
    prefix_cache_queries: float | None = None
    prefix_cache_hits: float | None = None
    prompt_tokens: float | None = None
    generation_tokens: float | None = None
    ttft: Histogram | None = None
    e2e_latency: Histogram | None = None
    queue_time: Histogram | None = None
    block_size: int | None = None
    num_gpu_blocks: int | None = None
    running_adapters: tuple[str, ...] = ()
    waiting_adapters: tuple[str, ...] = ()
    window: MetricsWindow | None = None


@dataclass(slots=True, eq=False)
class PodView:
    """A pod as strategies see it. The server owns these objects and updates them in place.

    ``in_flight`` counts requests this gateway process routed to the pod and has not seen finish;
    ``sent_since_scrape`` counts those routed since the last successful scrape and still open,
    so a burst between two scrapes is not invisible to the load estimate, while a request that
    already finished (and so is in no queue) does not count twice.
    """

    name: str
    address: str
    model: str
    adapters: frozenset[str] = frozenset()
    ready: bool = True
    ready_since: float = 0.0
    in_flight: int = 0
    sent_since_scrape: int = 0
    metrics: PodMetrics | None = None
    metrics_at: float = 0.0
    stale_after: float = 2.0
    cached_blocks: int = 0
    """Prompt blocks the gateway believes the pod holds (set when the prefix index is read)."""

    def fresh_metrics(self, now: float) -> PodMetrics | None:
        """The last scrape, or ``None`` when there is none or it is older than ``stale_after``."""
        metrics = self.metrics
        if metrics is None or now - self.metrics_at > self.stale_after:
            return None
        return metrics

    def metrics_or_raise(self, now: float) -> PodMetrics:
        """Fresh metrics, else ``CannotDecide`` saying whether they are missing or stale."""
        metrics = self.fresh_metrics(now)
        if metrics is None:
            raise CannotDecide("no-metrics" if self.metrics is None else "stale-metrics")
        return metrics

    def load(self, now: float) -> float:
        """The one load estimate every load-aware strategy uses (DESIGN section 5).

        ``max(in_flight_here, running + waiting + sent_since_last_scrape)``; without fresh metrics
        (cold start, a hung exporter) it is the gateway's own in-flight count.
        """
        metrics = self.fresh_metrics(now)
        if metrics is None or metrics.running is None:
            return float(self.in_flight)
        queued = metrics.running + (metrics.waiting or 0.0) + self.sent_since_scrape
        return max(float(self.in_flight), queued)


@dataclass(slots=True)
class RequestView:
    """What a strategy may know about the request being routed."""

    request_id: str
    model: str
    user: str | None = None
    now: float = 0.0
    prompt_length: int = 0
    """Prompt size in tokenizer units (bytes for the ``character`` tokenizer)."""
    max_tokens: int | None = None
    stream: bool = False
    prefix_blocks: int = 0
    """Number of full prefix blocks in the prompt (0 when the plan needs no prefix hashing)."""
    prefix_matches: Mapping[str, int] = field(default_factory=dict)
    """Pod name -> number of leading prompt blocks that pod is believed to hold in its cache."""


@dataclass(slots=True)
class Usage:
    """Token usage of a finished request; ``estimated`` when no ``usage`` object was seen."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimated: bool = False


@dataclass(slots=True)
class Timings:
    """Monotonic timestamps of one request's life at the gateway (``None`` when not reached)."""

    routed_at: float
    first_byte_at: float | None = None
    finished_at: float | None = None


class Strategy:
    """A routing algorithm: scores candidates, higher is better, each score in 0..1.

    Subclasses set ``name`` (the exact ``routing-strategy`` header value) and may override the
    hooks to keep state. The router calls hooks on every strategy instance that overrides them,
    for every routed request, whichever strategy chose the pod: state such as a per-pod token
    window describes the pods, not one strategy's own decisions.
    """

    name: ClassVar[str]
    needs_prefix: ClassVar[bool] = False
    """The router tokenises the prompt and fills ``prefix_matches`` only when this is true."""
    needs_usage: ClassVar[bool] = False
    """The router asks Envoy for the response body (to read ``usage``) only when this is true."""

    def score(self, request: RequestView, pods: Sequence[PodView]) -> Sequence[float]:
        """One score per pod, in the order given. Raise ``CannotDecide`` to fall back."""
        raise NotImplementedError

    def on_routed(self, request: RequestView, pod: PodView) -> None:
        """Called once the request has been sent to ``pod``."""

    def on_finished(
        self, request: RequestView, pod: PodView, usage: Usage | None, timings: Timings
    ) -> None:
        """Called exactly once when the request ends, however it ends."""

    def forget_pod(self, name: str) -> None:
        """Called when a pod leaves the fleet, so per-pod state does not outlive it."""


def overrides(strategy: Strategy, hook: str) -> bool:
    """Whether ``strategy`` implements ``hook`` itself, so the router can skip no-op calls."""
    return getattr(type(strategy), hook) is not getattr(Strategy, hook)
