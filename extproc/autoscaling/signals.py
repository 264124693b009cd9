"""Per-model load signals, computed on demand from what the server already keeps.

One row per model name the registry knows (base models and LoRA adapters, declared models with
no pod included), so no client-chosen value ever becomes a label. A row's gateway side (requests
in flight and held) counts requests for exactly that name; its pod side (queue, KV cache, token
rates, cold start) is read from the ready pods serving that name, so an adapter's row shares its
pods' numbers with its base model's row. Nothing here is written on the request path: the
collector and the KEDA scaler compute a view when asked.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from extproc.fleet.registry import ModelInfo, PodRegistry
from extproc.routing.accounting import Accounting
from extproc.routing.holds import Holds
from extproc.scraping.readings import Readings


@dataclass(frozen=True, slots=True)
class ModelSignals:
    """One model's (or adapter's) load as of one moment."""

    model: str
    adapter: str
    """The LoRA adapter's name, or "" for the base model itself."""
    in_flight: int
    """Admitted requests for this name not yet finished, held ones included."""
    held: int
    """Requests waiting at the gateway for the name's first ready pod."""
    ready_pods: int
    running: float
    """``vllm:num_requests_running`` summed over the ready pods with fresh metrics."""
    waiting: float
    """``vllm:num_requests_waiting`` summed likewise: requests queued at the pods."""
    kv_cache_usage_mean: float | None
    """0..1 over the ready pods with fresh metrics; ``None`` when there are none."""
    kv_cache_usage_max: float | None
    prompt_tokens_per_second: float
    generation_tokens_per_second: float
    coldstart_seconds: float | None
    """The most recent cold start among the name's pods: ready to first metrics."""

    @property
    def name(self) -> str:
        """The name clients ask for: the adapter's, or the base model's."""
        return self.adapter or self.model


def row_labels(info: ModelInfo) -> tuple[str, str]:
    """``(model, adapter)`` of a registry entry: an adapter is filed under its base model."""
    if info.parent is not None:
        return info.parent, info.id
    return info.id, ""


CountOf = Callable[[str], int]


class Signals:
    """The per-model view over the registry, the pods' readings, accounting and holds."""

    def __init__(
        self, registry: PodRegistry, readings: Readings, accounting: Accounting, holds: Holds
    ) -> None:
        self.registry = registry
        self._readings = readings
        self._accounting = accounting
        self._holds = holds

    def known(self) -> tuple[ModelInfo, ...]:
        return tuple(self.registry.models())

    def of(
        self,
        info: ModelInfo,
        now: float | None = None,
        in_flight: CountOf | None = None,
        held: CountOf | None = None,
        coldstarts: dict[str, float] | None = None,
    ) -> ModelSignals:
        """The row of ``info``. ``in_flight`` and ``held`` count requests per name; by default
        this process's own (the KEDA scaler passes every replica's)."""
        now = time.monotonic() if now is None else now
        if coldstarts is None:
            coldstarts = self.coldstarts()
        count_in_flight = in_flight or self._accounting.model_in_flight
        count_held = held or self._holds.held
        model, adapter = row_labels(info)
        pods = self.registry.candidates(info.id)
        running = waiting = prompt_rate = generation_rate = 0.0
        usages: list[float] = []
        for pod in pods:
            metrics = self._readings.fresh(pod.name, now)
            if metrics is None:
                continue
            running += metrics.running or 0.0
            waiting += metrics.waiting or 0.0
            if metrics.kv_cache_usage is not None and math.isfinite(metrics.kv_cache_usage):
                usages.append(min(1.0, max(0.0, metrics.kv_cache_usage)))
            window = metrics.window
            if window is not None and window.seconds > 0:
                prompt_rate += window.prompt_tokens / window.seconds
                generation_rate += window.generation_tokens / window.seconds
        return ModelSignals(
            model=model,
            adapter=adapter,
            in_flight=count_in_flight(info.id),
            held=count_held(info.id),
            ready_pods=len(pods),
            running=running,
            waiting=waiting,
            kv_cache_usage_mean=sum(usages) / len(usages) if usages else None,
            kv_cache_usage_max=max(usages) if usages else None,
            prompt_tokens_per_second=prompt_rate,
            generation_tokens_per_second=generation_rate,
            coldstart_seconds=coldstarts.get(info.id),
        )

    def all(self, now: float | None = None) -> list[ModelSignals]:
        now = time.monotonic() if now is None else now
        coldstarts = self.coldstarts()
        return [self.of(info, now, coldstarts=coldstarts) for info in self.known()]

    def coldstarts(self) -> dict[str, float]:
        """Name -> ready-to-first-metrics of the pod serving it that became ready last and has
        been read since (a pod still starting has no cold start to report yet)."""
        latest: dict[str, tuple[float, float]] = {}
        for pod in self.registry.pods():
            spec = pod.spec
            first = self._readings.first_at(spec.name)
            if first is None or pod.ready_since is None:
                continue
            entry = (pod.ready_since, max(0.0, first - pod.ready_since))
            for name in (spec.model, *self.registry.serving(pod)):
                if name not in latest or entry[0] > latest[name][0]:
                    latest[name] = entry
        return {name: seconds for name, (_, seconds) in latest.items()}


LABELS = ["model", "adapter"]


class SignalsCollector(Collector):
    """``extproc_model_*`` gauges, computed at scrape time (this process's own counts)."""

    def __init__(self, signals: Signals) -> None:
        self._signals = signals

    def collect(self) -> Iterable[Metric]:
        families = {
            "in_flight": GaugeMetricFamily(
                "extproc_model_in_flight",
                "Requests for the model in flight at this gateway process, held ones included.",
                labels=LABELS,
            ),
            "waiting": GaugeMetricFamily(
                "extproc_model_waiting",
                "vllm:num_requests_waiting summed over the model's ready pods.",
                labels=LABELS,
            ),
            "ready_pods": GaugeMetricFamily(
                "extproc_model_ready_pods", "Ready pods serving the model.", labels=LABELS
            ),
            "kv_cache_usage_mean": GaugeMetricFamily(
                "extproc_model_kv_cache_usage_mean",
                "Mean KV-cache usage (0..1, whatever unit the pods report) over the model's "
                "ready pods with fresh metrics.",
                labels=LABELS,
            ),
            "kv_cache_usage_max": GaugeMetricFamily(
                "extproc_model_kv_cache_usage_max",
                "Highest KV-cache usage (0..1) among the model's ready pods with fresh metrics.",
                labels=LABELS,
            ),
            "prompt_tokens_per_second": GaugeMetricFamily(
                "extproc_model_prompt_tokens_per_second",
                "Prompt tokens the model's ready pods processed per second over the scrape window.",
                labels=LABELS,
            ),
            "generation_tokens_per_second": GaugeMetricFamily(
                "extproc_model_generation_tokens_per_second",
                "Tokens the model's ready pods generated per second over the scrape window.",
                labels=LABELS,
            ),
            "held": GaugeMetricFamily(
                "extproc_model_held_requests",
                "Requests held at this gateway process waiting for the model's first ready pod.",
                labels=LABELS,
            ),
            "coldstart_seconds": GaugeMetricFamily(
                "extproc_model_coldstart_seconds",
                "The model's latest pod cold start: from ready to its first scraped metrics.",
                labels=LABELS,
            ),
        }
        for row in self._signals.all():
            labels = [row.model, row.adapter]
            for field, family in families.items():
                value = getattr(row, field)
                if value is not None:
                    family.add_metric(labels, float(value))
        yield from families.values()
