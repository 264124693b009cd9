"""The plain data a strategy sees: one context per request, one snapshot per candidate pod.

Nothing here knows about gRPC, Envoy, Redis or Kubernetes. The server fills these from its own
state (the pod registry, the scraper's readings, its accounting, the prefix index), so every
algorithm can be exercised with hand-made pods in a unit test. Everything is immutable during a
decision: a strategy reads one consistent picture of the fleet.

Prompt size has one unit everywhere: tokens. ``prompt_tokens`` is exact when the prompt was
tokenised (or was token ids) and otherwise an estimate of four UTF-8 bytes a token.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Final

PREFIX: Final = "prefix"
"""Data key: ``RoutingContext.prefix`` (the prompt's cached-prefix matches per candidate)."""
USAGE: Final = "usage"
"""Data key: the response's token usage, delivered to ``on_finished`` (the server then reads
the response body)."""
DATA_KEYS: Final = frozenset({PREFIX, USAGE})


@dataclass(frozen=True, slots=True)
class Histogram:
    """A Prometheus histogram's running ``_sum`` and ``_count`` (buckets are not needed)."""

    sum: float = 0.0
    count: float = 0.0


@dataclass(frozen=True, slots=True)
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


@dataclass(frozen=True, slots=True)
class PodMetrics:
    """One reading of a pod's metrics, normalised (fractions in 0..1, seconds).

    A field is ``None`` when the pod does not export it; strategies treat that as unknown.
    ``window`` is derived from successive readings (``None`` until there are two).
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
    hash_algo: str | None = None
    """``--prefix-caching-hash-algo`` of the pod (the names of its KV-cache blocks)."""
    running_adapters: tuple[str, ...] = ()
    waiting_adapters: tuple[str, ...] = ()
    window: MetricsWindow | None = None


@dataclass(frozen=True, slots=True)
class PodSnapshot:
    """A candidate pod as of this decision.

    ``in_flight`` counts requests this server routed to the pod and has not seen finish;
    ``sent_since_scrape`` counts those routed since the pod's queue was last read and still
    open, so a burst between two readings is not invisible, while a request that already
    finished (and so is in no queue) does not count twice. ``sent_prompt_tokens`` is the prompt
    tokens routed to the pod since its token counters were last read.
    """

    name: str
    address: str
    in_flight: int = 0
    sent_since_scrape: int = 0
    sent_prompt_tokens: int = 0
    metrics: PodMetrics | None = None
    """The latest reading when it is fresh; ``None`` when missing or stale."""
    metrics_missing: bool = True
    """No reading at all yet (cold start), as opposed to a stale one."""
    load: float = 0.0
    """The load estimate every load-aware strategy uses:
    ``max(in_flight, running + waiting + sent_since_scrape)``, or ``in_flight`` without fresh
    metrics (cold start, a hung exporter)."""

    @property
    def unknown(self) -> Unknown:
        """Why a metric-based score for this pod is unknown."""
        return NO_METRICS if self.metrics_missing else STALE_METRICS


def load_estimate(in_flight: int, sent_since_scrape: int, metrics: PodMetrics | None) -> float:
    """``max(in_flight, running + waiting + sent_since_scrape)``; ``in_flight`` without a
    fresh reading of ``running``."""
    if metrics is None or metrics.running is None:
        return float(in_flight)
    queued = metrics.running + (metrics.waiting or 0.0) + sent_since_scrape
    return max(float(in_flight), queued)


@dataclass(frozen=True, slots=True)
class PrefixMatches:
    """What each candidate caches of the prompt, in tokens, aligned with
    ``RoutingContext.pods``."""

    block_tokens: int
    """The granularity of a match: a strategy's thresholds in blocks are this many tokens."""
    prompt_tokens: int
    """The prompt's tokens in full blocks (a trailing partial block is never cached)."""
    matched: tuple[int, ...]
    """Leading prompt tokens each candidate holds."""
    held: tuple[int, ...]
    """Tokens this server placed on each candidate and still counts as cached, in all: where
    to put a prompt no pod holds yet. Its own record even where pods publish events, because
    under cache pressure every pod's true count is "full"."""
    precise: tuple[bool, ...]
    """True where the pod's own KV-cache events say so; false where the server guesses from
    what it routed there."""
    sent: tuple[int, ...] = ()
    """Where some pod is precise: the leading prompt tokens this server last routed to each
    candidate (its own index), whatever the pods hold now. Empty otherwise (``matched`` is
    then that already)."""

    def affinity(self, minimum: int) -> tuple[int, ...]:
        """The match to score: ``matched``, made sticky where this server sent the prompt, so
        under cache pressure each prefix keeps one home instead of scattering copies that evict
        each other.

        - no candidate holds ``minimum`` tokens: ``sent`` (the prefix every pod evicted goes back
          to the pod its traffic went to);
        - a candidate that still holds ``minimum`` tokens of what was sent there (its tail was
          evicted, the head is left): credited with all that was sent, so partial eviction does
          not move the prefix to a pod holding none of it;
        - a candidate that holds nothing of it counts as holding nothing.
        """
        sent = self.sent
        if not sent:
            return self.matched
        if max(self.matched) < minimum:
            return sent
        return tuple(
            max(held, was_sent) if held >= minimum else held
            for held, was_sent in zip(self.matched, sent, strict=True)
        )


@dataclass(frozen=True, slots=True)
class Unknown:
    """A pod a strategy cannot score; ``reason`` becomes a metric label (a small fixed set)."""

    reason: str


NO_METRICS: Final = Unknown("no-metrics")
STALE_METRICS: Final = Unknown("stale-metrics")

Score = float | Unknown


@dataclass(slots=True)
class RoutingContext:
    """What a strategy may know about the request being routed, and its candidates."""

    key: int
    """Unique per request within this process (never the client's x-request-id)."""
    model: str
    user: str | None
    now: float
    prompt_tokens: int
    max_tokens: int | None
    pods: tuple[PodSnapshot, ...]
    rng: random.Random
    """The only randomness a strategy may use, so a dry run (Explain) leaves the live
    generator untouched."""
    stream: bool = False
    prompt_tokens_exact: bool = False
    prefix: PrefixMatches | None = None
    """Filled when a strategy of the plan consumes ``PREFIX``."""


@dataclass(frozen=True, slots=True)
class Usage:
    """Token usage of a finished request; ``estimated`` when the pod reported none."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimated: bool = False


@dataclass(frozen=True, slots=True)
class Finished:
    """A request that ended, as ``on_finished`` hooks see it (timestamps are monotonic)."""

    key: int
    pod: str
    user: str | None
    prompt_tokens: int
    usage: Usage | None
    routed_at: float
    finished_at: float
    first_byte_at: float | None = None
