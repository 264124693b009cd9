"""Scraping every ready pod's ``/metrics`` on a short interval, off the request path.

One ticker walks the pods in slices spread over the interval and asks each pod's persistent
connection (``PageFetcher``) for its page; the page is parsed and published in the connection's
callback. No coroutine or timer exists per scrape, and a pod whose exporter hangs holds up only
itself: its request times out, its metrics age past ``metrics_stale_after``, and strategies fall
back for it. Routing never waits for a scrape; it reads the last good reading from ``Readings``,
which only the scraper writes.

The gauges (running, waiting, KV usage) are read on every scrape; counters, histograms and info
labels, which feed one-second statistics, once a second.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field, replace

from extproc.config import ScrapingSettings
from extproc.fleet.registry import PodRegistry, PodSpec
from extproc.scraping.page_fetcher import PageCallback, PageFetcher
from extproc.scraping.parser import Hints, MetricsParseError, parse
from extproc.scraping.readings import Reading, Readings
from extproc.tasks import cancel_and_wait
from extproc.telemetry import Telemetry
from strategies.context import Histogram, MetricsWindow, PodMetrics

log = logging.getLogger(__name__)

FULL_PARSE_EVERY = 1.0
"""Seconds between full parses (counters, histograms, labels) of a pod's page."""
SLICES = 10
"""The pods are scraped in this many slices per interval, so pages do not arrive in bursts."""


@dataclass(slots=True)
class _Sample:
    at: float
    prompt: float
    generation: float
    requests: float
    running: float
    queue: Histogram | None
    ttft: Histogram | None
    e2e: Histogram | None


@dataclass(eq=False)
class _Target:
    """One pod's scrape state."""

    spec: PodSpec
    url: str
    fetcher: PageFetcher | None = None
    sent_at: float | None = None
    percent_units: bool = False
    hints: Hints = field(default_factory=dict)
    full: PodMetrics | None = None
    full_at: float = float("-inf")
    window: MetricsWindow | None = None
    history: deque[_Sample] = field(default_factory=deque)
    failures: int = 0


class Scraper:
    def __init__(
        self,
        settings: ScrapingSettings,
        registry: PodRegistry,
        readings: Readings,
        telemetry: Telemetry,
    ) -> None:
        self._registry = registry
        self._readings = readings
        self._telemetry = telemetry
        self._interval = settings.interval
        self._timeout = settings.timeout
        self._window = settings.window
        self._targets: dict[str, _Target] = {}
        self._ticker: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._registry.on_change(self.sync)
        self._ticker = asyncio.get_running_loop().create_task(self._tick(), name="scraper")
        self.sync()

    async def stop(self) -> None:
        await cancel_and_wait([self._ticker])
        self._ticker = None
        for target in self._targets.values():
            if target.fetcher is not None:
                target.fetcher.abort()
        self._targets.clear()

    def sync(self) -> None:
        """Track every ready pod; forget pods gone, no longer ready, or moved."""
        if self._ticker is None:
            return
        wanted = {pod.name: pod.spec for pod in self._registry.pods() if pod.spec.ready}
        for name in list(self._targets):
            target = self._targets[name]
            spec = wanted.get(name)
            if (
                spec is None
                or spec.address != target.spec.address
                or spec.effective_metrics_url != target.url
            ):
                if target.fetcher is not None:
                    target.fetcher.abort()
                del self._targets[name]
                self._readings.forget(name)
                if spec is None:
                    self._telemetry.forget_pod(name)
        for name, spec in wanted.items():
            if name not in self._targets:
                target = _Target(spec, spec.effective_metrics_url)
                try:
                    target.fetcher = PageFetcher(target.url, self._callback(target))
                except ValueError:
                    log.error(
                        "bad metrics URL; pod not scraped", extra={"pod": name, "url": target.url}
                    )
                    continue
                self._targets[name] = target

    async def _tick(self) -> None:
        step = self._interval / SLICES
        index = 0
        while True:
            targets = list(self._targets.values())
            now = time.monotonic()
            for target in targets[index % SLICES :: SLICES]:
                self._poll(target, now)
            index += 1
            await asyncio.sleep(step)

    def _poll(self, target: _Target, now: float) -> None:
        fetcher = target.fetcher
        if fetcher is None:
            return
        if target.sent_at is not None:
            if now - target.sent_at < self._timeout:
                return  # still waiting; a hung pod never holds up the others
            fetcher.abort()
            target.sent_at = None
            self._failed(target, "timeout")
        target.sent_at = now
        fetcher.fetch()

    def _callback(self, target: _Target) -> PageCallback:
        def on_page(page: bytes | None, reason: str) -> None:
            sent_at = target.sent_at
            target.sent_at = None
            now = time.monotonic()
            if sent_at is not None:
                self._telemetry.scrape_seconds.observe(now - sent_at)
            if page is None:
                self._failed(target, reason)
                return
            full = now - target.full_at >= FULL_PARSE_EVERY
            try:
                metrics = parse(page, target.hints, full=full)
            except MetricsParseError:
                self._failed(target, "parse")
                return
            target.failures = 0
            self._publish(target, metrics, now, full)

        return on_page

    def _failed(self, target: _Target, reason: str) -> None:
        self._telemetry.count_scrape_error(target.spec.name, reason)
        target.failures += 1
        if target.failures == 1 or target.failures % 100 == 0:
            log.warning(
                "scrape failed (%s); metrics will go stale",
                reason,
                extra={"pod": target.spec.name, "url": target.url, "failures": target.failures},
            )

    def _publish(self, target: _Target, metrics: PodMetrics, now: float, full: bool) -> None:
        usage = metrics.kv_cache_usage
        if usage is not None:
            # A value above 1 can only be a percent; once seen, the pod is known to use
            # percents, so its later small values (0.5 meaning 0.5 %) are read right too.
            if usage > 1.0:
                target.percent_units = True
            if target.percent_units:
                usage /= 100.0
            usage = min(1.0, max(0.0, usage))
        if full:
            target.window = self._window_of(target, metrics, now)
            metrics = replace(metrics, kv_cache_usage=usage, window=target.window)
            target.full, target.full_at = metrics, now
        elif target.full is not None:
            # A gauges-only page: the slower fields come from the last full parse.
            metrics = replace(
                target.full,
                running=metrics.running,
                waiting=metrics.waiting,
                kv_cache_usage=usage,
            )
        else:
            metrics = replace(metrics, kv_cache_usage=usage)
        name = target.spec.name
        first = self._readings.first_at(name) is None
        self._readings.publish(name, Reading(metrics, now, target.full_at))
        if first:
            ready_at = self._ready_since(name, now)
            log.info("first metrics %.1fs after ready", now - ready_at, extra={"pod": name})

    def _ready_since(self, name: str, now: float) -> float:
        pod = self._registry.get(name)
        if pod is None or pod.ready_since is None:
            return now
        return pod.ready_since

    def _window_of(self, target: _Target, metrics: PodMetrics, now: float) -> MetricsWindow | None:
        sample = _Sample(
            at=now,
            prompt=metrics.prompt_tokens or 0.0,
            generation=metrics.generation_tokens or 0.0,
            requests=metrics.e2e_latency.count if metrics.e2e_latency else 0.0,
            running=metrics.running or 0.0,
            queue=metrics.queue_time,
            ttft=metrics.ttft,
            e2e=metrics.e2e_latency,
        )
        history = target.history
        if history and _reset(history[-1], sample):
            history.clear()  # the pod restarted: its counters began again at zero
        history.append(sample)
        horizon = now - self._window
        while len(history) > 2 and history[1].at <= horizon:
            history.popleft()
        oldest = history[0]
        if oldest is sample:
            return None
        return MetricsWindow(
            seconds=now - oldest.at,
            requests=sample.requests - oldest.requests,
            prompt_tokens=sample.prompt - oldest.prompt,
            generation_tokens=sample.generation - oldest.generation,
            queue_seconds=_mean(oldest.queue, sample.queue),
            ttft_seconds=_mean(oldest.ttft, sample.ttft),
            e2e_seconds=_mean(oldest.e2e, sample.e2e),
            mean_running=sum(s.running for s in history) / len(history),
        )


def _reset(before: _Sample, after: _Sample) -> bool:
    return (
        after.prompt < before.prompt
        or after.generation < before.generation
        or after.requests < before.requests
    )


def _mean(before: Histogram | None, after: Histogram | None) -> float | None:
    if before is None or after is None:
        return None
    count = after.count - before.count
    if count <= 0:
        return None
    return max(0.0, (after.sum - before.sum) / count)
