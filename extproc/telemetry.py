"""Prometheus metrics, all prefixed ``extproc_``, in a registry owned by one server instance.

Labels are bounded: model names the registry knows (anything else is ``unknown``), strategy names
from the registry (weighted lists are ``weighted``), pod names from discovery. Never a user or a
request id.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    gc_collector,
    generate_latest,
    platform_collector,
    process_collector,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from extproc.fleet.registry import PodRegistry
from extproc.routing.accounting import Accounting
from extproc.scraping.readings import Readings

DECISION_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

# The *_created series only double the exposition size.
disable_created_metrics()  # type: ignore[no-untyped-call]


class Telemetry:
    """Every metric the server exports. One instance per server, so tests can run several."""

    def __init__(self) -> None:
        # Label children by label values, bounded like the labels themselves (known models,
        # strategy names or "weighted", HTTP statuses).
        self._request_counts: dict[tuple[str, str, str], Any] = {}
        self._request_times: dict[str, tuple[Any, Any]] = {}
        self._decision_times: dict[str, Any] = {}
        self._fallback_counts: dict[tuple[str, str], Any] = {}
        self._scrape_error_reasons: dict[str, set[str]] = {}
        self._ejection_reasons: dict[str, set[str]] = {}
        self.registry = CollectorRegistry(auto_describe=True)
        process_collector.ProcessCollector(registry=self.registry)
        platform_collector.PlatformCollector(registry=self.registry)
        gc_collector.GCCollector(registry=self.registry)
        r = self.registry
        self.requests = Counter(
            "extproc_requests",
            "Inference requests by model, strategy and final HTTP status (or 'cancelled').",
            ["model", "strategy", "status"],
            registry=r,
        )
        self.decision_seconds = Histogram(
            "extproc_routing_decision_seconds",
            "Time to choose a pod (strategy scoring, tie-break, hooks).",
            ["strategy"],
            buckets=DECISION_BUCKETS,
            registry=r,
        )
        self.request_seconds = Histogram(
            "extproc_request_duration_seconds",
            "Routed request life at the gateway, from routing to stream end.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.first_byte_seconds = Histogram(
            "extproc_time_to_response_headers_seconds",
            "From routing to the upstream response headers (time to first byte).",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.fallbacks = Counter(
            "extproc_routing_fallback",
            "Decisions in which a strategy could not score some or all candidates, which "
            "least-request scored instead.",
            ["strategy", "reason"],
            registry=r,
        )
        self.streams = Gauge(
            "extproc_streams_active", "Open ext_proc streams (one per HTTP request).", registry=r
        )
        self.usage = Counter(
            "extproc_response_usage",
            "Responses read for token usage, by where the numbers came from "
            "(reported by the pod, estimated from a stream without usage, or missing).",
            ["source"],
            registry=r,
        )
        self.scrape_errors = Counter(
            "extproc_scrape_errors",
            "Failed metrics scrapes by pod and reason (timeout, connect, status, parse).",
            ["pod", "reason"],
            registry=r,
        )
        self.scrape_seconds = Histogram(
            "extproc_scrape_duration_seconds",
            "Time to fetch and parse one pod's /metrics.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )
        self.prefix_match_ratio = Histogram(
            "extproc_prefix_match_ratio",
            "Share of the prompt's blocks the chosen pod was believed to hold already.",
            buckets=(0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0),
            registry=r,
        )
        self.tokenizer_fallbacks = Counter(
            "extproc_tokenizer_fallbacks",
            "Prompts tokenised by the character tokenizer because the configured one failed.",
            ["tokenizer"],
            registry=r,
        )
        self.discovery_errors = Counter(
            "extproc_discovery_errors",
            "Discovery updates rejected (the last good pod set is kept).",
            ["provider"],
            registry=r,
        )
        self.ejections = Counter(
            "extproc_pod_ejections",
            "Pods taken out of rotation by outlier detection, by reason (5xx, unreachable).",
            ["pod", "reason"],
            registry=r,
        )
        self.kv_events = Counter(
            "extproc_kv_events",
            "KV-cache event messages from pods, by kind: batch (applied), gap (sequence numbers "
            "skipped), replayed, malformed, resync_* (what the index knew of a pod dropped: "
            "restarted, reconnected, gap).",
            ["kind"],
            registry=r,
        )
        self.protocol_errors = Counter(
            "extproc_protocol_errors",
            "ext_proc streams ended because a message came out of order (never from Envoy).",
            registry=r,
        )
        self.internal_errors = Counter(
            "extproc_internal_errors",
            "Unexpected exceptions while processing a stream (answered with a 500 JSON error).",
            registry=r,
        )
        self.ratelimit_decisions = Counter(
            "extproc_ratelimit_decisions",
            "Rate-limit checks by outcome (admitted, rpm_exceeded, tpm_exceeded, unknown_user, "
            "failed_open, failed_closed).",
            ["decision"],
            registry=r,
        )
        self.ratelimit_seconds = Histogram(
            "extproc_ratelimit_check_seconds",
            "Time of one rate-limit check (the Redis round trip with a Redis store).",
            buckets=DECISION_BUCKETS,
            registry=r,
        )
        self.ratelimit_tokens = Counter(
            "extproc_ratelimit_charged_tokens",
            "Tokens charged to users' TPM windows, by source (reported by the pod, or "
            "estimated from a stream that carried no usage).",
            ["source"],
            registry=r,
        )
        self.redis_errors = Counter(
            "extproc_redis_errors",
            "Failed or timed-out Redis calls by operation (admit, charge, users_api).",
            ["operation"],
            registry=r,
        )
        self.tls_reloads = Counter(
            "extproc_tls_reloads",
            "Changed TLS files on the gRPC port: loaded (ok), or refused and the previous "
            "certificate kept (error).",
            ["result"],
            registry=r,
        )

    def count_request(self, model: str, strategy: str, status: str) -> None:
        """``extproc_requests_total``, its label child kept: a dict lookup instead of a lock."""
        key = (model, strategy, status)
        child = self._request_counts.get(key)
        if child is None:
            child = self._request_counts[key] = self.requests.labels(model, strategy, status)
        child.inc()

    def observe_request(self, model: str, seconds: float, first_byte: float | None) -> None:
        children = self._request_times.get(model)
        if children is None:
            children = self._request_times[model] = (
                self.request_seconds.labels(model),
                self.first_byte_seconds.labels(model),
            )
        children[0].observe(seconds)
        if first_byte is not None:
            children[1].observe(first_byte)

    def observe_decision(self, strategy: str, seconds: float) -> None:
        child = self._decision_times.get(strategy)
        if child is None:
            child = self._decision_times[strategy] = self.decision_seconds.labels(strategy)
        child.observe(seconds)

    def count_fallback(self, strategy: str, reason: str) -> None:
        key = (strategy, reason)
        child = self._fallback_counts.get(key)
        if child is None:
            child = self._fallback_counts[key] = self.fallbacks.labels(strategy, reason)
        child.inc()

    def count_scrape_error(self, pod: str, reason: str) -> None:
        self._scrape_error_reasons.setdefault(pod, set()).add(reason)
        self.scrape_errors.labels(pod, reason).inc()

    def count_ejection(self, pod: str, reason: str) -> None:
        self._ejection_reasons.setdefault(pod, set()).add(reason)
        self.ejections.labels(pod, reason).inc()

    def forget_pod(self, pod: str) -> None:
        """A pod left: its per-pod series go with it, so pod churn does not grow /metrics."""
        for reason in self._scrape_error_reasons.pop(pod, ()):
            self.scrape_errors.remove(pod, reason)
        for reason in self._ejection_reasons.pop(pod, ()):
            self.ejections.remove(pod, reason)

    def watch_fleet(self, pods: PodRegistry, readings: Readings, accounting: Accounting) -> None:
        self.registry.register(FleetCollector(pods, readings, accounting))

    def watch_indexes(self, sizes: Callable[[], Mapping[str, int]]) -> None:
        """``sizes``: entries per prefix index (``approximate``, ``exact``), read at scrape."""
        self.registry.register(IndexCollector(sizes))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class IndexCollector(Collector):
    """The prefix indexes' sizes, read at scrape time: memory grows with them (about 200 bytes
    an entry), and an exact index that stops growing while pods cache is a stream gone quiet."""

    def __init__(self, sizes: Callable[[], Mapping[str, int]]) -> None:
        self._sizes = sizes

    def collect(self) -> Iterable[Metric]:
        blocks = GaugeMetricFamily(
            "extproc_prefix_index_blocks",
            "Block hashes in each prefix index: approximate (what this server sent where) and "
            "exact (what the pods' KV-cache events say they hold).",
            labels=["index"],
        )
        for index, size in self._sizes().items():
            blocks.add_metric([index], size)
        yield blocks


class FleetCollector(Collector):
    """Per-pod gauges read at scrape time, so routing never touches them."""

    def __init__(self, pods: PodRegistry, readings: Readings, accounting: Accounting) -> None:
        self._pods = pods
        self._readings = readings
        self._accounting = accounting

    def collect(self) -> Iterable[Metric]:
        in_flight = GaugeMetricFamily(
            "extproc_pod_in_flight",
            "Requests this process routed to the pod that have not finished.",
            labels=["pod", "model"],
        )
        ready = GaugeMetricFamily(
            "extproc_pod_ready", "1 when the pod is a routing candidate.", labels=["pod", "model"]
        )
        age = GaugeMetricFamily(
            "extproc_pod_metrics_age_seconds",
            "Age of the pod's latest scraped metrics (absent until the first scrape).",
            labels=["pod", "model"],
        )
        coldstart = GaugeMetricFamily(
            "extproc_pod_coldstart_seconds",
            "From the pod becoming ready to its first scraped metrics.",
            labels=["pod", "model"],
        )
        now = time.monotonic()
        for pod in self._pods.pods():
            spec = pod.spec
            labels = [spec.name, spec.model]
            in_flight.add_metric(labels, self._accounting.counters(spec.name).in_flight)
            ready.add_metric(labels, 1.0 if spec.ready else 0.0)
            reading = self._readings.get(spec.name)
            if reading is not None:
                age.add_metric(labels, now - reading.at)
            first = self._readings.first_at(spec.name)
            if first is not None and pod.ready_since is not None:
                coldstart.add_metric(labels, max(0.0, first - pod.ready_since))
        yield in_flight
        yield ready
        yield age
        yield coldstart
