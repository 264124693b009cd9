"""KEDA's external scaler (``externalscaler.ExternalScaler``) on the router's gRPC port.

A ScaledObject trigger names a model in its metadata; the scaler answers for it:

- ``model`` (required): a model the gateway knows. Unknown: ``NOT_FOUND``, missing:
  ``INVALID_ARGUMENT``, so a typo shows in KEDA's events instead of scaling on zero.
- ``adapter`` (optional): one LoRA adapter of that model; without it, the model and all its
  adapters (everything its pods serve).
- ``metric``: ``concurrency`` (default), ``waiting`` or ``kv-cache`` (see ``METRICS``).
- ``targetSize``: the per-replica target (``DEFAULT_TARGETS``).

``IsActive`` is true while the model has requests in flight or held at any replica, or running or
queued at its pods; ``StreamIsActive`` sends the answer when the stream opens and again the moment
it changes (a request held for a model with no ready pod turns it on at once). Counts of other
replicas come from ``counts.RedisCounts`` when replicas share a Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from extproc.autoscaling.counts import LocalCounts
from extproc.autoscaling.externalscaler import externalscaler_pb2 as pb
from extproc.autoscaling.externalscaler import externalscaler_pb2_grpc
from extproc.autoscaling.signals import ModelSignals, Signals
from extproc.fleet.registry import ModelInfo

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ExternalScaler"].full_name

DEFAULT_TARGETS = {"concurrency": 16.0, "waiting": 4.0, "kv-cache": 0.7}
"""Per-replica targets when the trigger's metadata sets no ``targetSize``.

``concurrency``: requests in flight for the model (held ones included), summed over the router
replicas, or the pods' own running + waiting when that is larger. A total: use the trigger's
default ``metricType: AverageValue`` (replicas = ceil(total / target)).
``waiting``: requests queued for a slot, at the pods (``vllm:num_requests_waiting``) or held at
the gateway. A total as well.
``kv-cache``: the mean KV-cache usage of the model's ready pods, 0..1 whatever unit the pods
report. A per-pod mean: set ``metricType: Value`` (replicas = ceil(current x mean / target)).
"""
METRICS = tuple(DEFAULT_TARGETS)
RECHECK_SECONDS = 0.25
"""A stream also re-reads the pods' side this often (scrapes carry no change notice)."""

Context = Any
"""``grpc.aio.ServicerContext`` (grpc ships no type information)."""


class ScalerError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Query:
    """What one trigger asks for, resolved against the registry."""

    model: str
    adapter: str
    metric: str
    target: float
    names: tuple[ModelInfo, ...]
    """Registry entries whose requests count: the adapter, or the model and its adapters."""
    pods_of: ModelInfo
    """The entry whose ready pods give the pod-side numbers."""

    @property
    def metric_name(self) -> str:
        parts = ["extproc", self.metric, self.model] + ([self.adapter] if self.adapter else [])
        return re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")


def parse(metadata: Mapping[str, str], signals: Signals) -> Query:
    """The trigger's metadata as a ``Query``; ``ScalerError`` says what is wrong with it."""
    registry = signals.registry
    model = metadata.get("model", "").strip()
    if not model:
        raise ScalerError(
            grpc.StatusCode.INVALID_ARGUMENT,
            "the trigger's metadata needs `model`: the model name clients send",
        )
    adapter = metadata.get("adapter", "").strip()
    info = registry.model(model)
    if info is None:
        raise ScalerError(
            grpc.StatusCode.NOT_FOUND,
            f"model {model!r} is not known to the gateway (no pod, route, Deployment or "
            "static entry serves it)",
        )
    if info.parent is not None and not adapter:
        model, adapter = info.parent, info.id  # the adapter named as the model
        info = registry.model(model) or ModelInfo(model)
    metric = metadata.get("metric", "concurrency").strip() or "concurrency"
    if metric not in DEFAULT_TARGETS:
        raise ScalerError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"metric {metric!r} is not one of {', '.join(METRICS)}",
        )
    target = DEFAULT_TARGETS[metric]
    raw_target = metadata.get("targetSize", "").strip()
    if raw_target:
        try:
            target = float(raw_target)
        except ValueError:
            target = math.nan
        if not math.isfinite(target) or target <= 0:
            raise ScalerError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"targetSize {raw_target!r} must be a number > 0",
            )
    if adapter:
        entry = registry.model(adapter)
        if entry is None or entry.parent != model:
            raise ScalerError(
                grpc.StatusCode.NOT_FOUND,
                f"adapter {adapter!r} is not a known LoRA adapter of model {model!r}",
            )
        return Query(model, adapter, metric, target, (entry,), entry)
    names = tuple(m for m in registry.models() if m.id == model or m.parent == model)
    return Query(model, "", metric, target, names, info)


@dataclass(frozen=True, slots=True)
class Reading:
    value: float
    active: bool
    held: bool


class ExternalScaler(externalscaler_pb2_grpc.ExternalScalerServicer):
    def __init__(self, signals: Signals, counts: LocalCounts) -> None:
        self._signals = signals
        self._counts = counts
        self._watchers: dict[str, set[asyncio.Event]] = {}
        self._closing = asyncio.Event()
        counts.on_change(self._changed)

    def close(self) -> None:
        """End every open ``StreamIsActive`` (the server is shutting down)."""
        self._closing.set()
        for events in self._watchers.values():
            for event in events:
                event.set()

    # -- the service ---------------------------------------------------------------------------

    async def IsActive(self, request: pb.ScaledObjectRef, context: Context) -> pb.IsActiveResponse:
        query = await self._query(request.scalerMetadata, context)
        return pb.IsActiveResponse(result=self.read(query).active)

    async def StreamIsActive(
        self, request: pb.ScaledObjectRef, context: Context
    ) -> AsyncIterator[pb.IsActiveResponse]:
        query = await self._query(request.scalerMetadata, context)
        wake = asyncio.Event()
        watched = {query.pods_of.id, *(m.id for m in query.names)}
        for name in watched:
            self._watchers.setdefault(name, set()).add(wake)
        try:
            sent: bool | None = None
            was_held = False
            while not self._closing.is_set():
                wake.clear()
                reading = self._reread(request.scalerMetadata)
                # A request newly held means a model at zero wants a pod now: say so even if
                # the last answer was already "active".
                if reading.active != sent or (reading.held and not was_held):
                    yield pb.IsActiveResponse(result=reading.active)
                    sent = reading.active
                was_held = reading.held
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(RECHECK_SECONDS):
                        await wake.wait()
        finally:
            for name in watched:
                events = self._watchers.get(name)
                if events is not None:
                    events.discard(wake)
                    if not events:
                        del self._watchers[name]

    async def GetMetricSpec(
        self, request: pb.ScaledObjectRef, context: Context
    ) -> pb.GetMetricSpecResponse:
        query = await self._query(request, context)
        spec = pb.MetricSpec(
            metricName=query.metric_name,
            targetSize=max(1, round(query.target)),
            targetSizeFloat=query.target,
        )
        return pb.GetMetricSpecResponse(metricSpecs=[spec])

    async def GetMetrics(
        self, request: pb.GetMetricsRequest, context: Context
    ) -> pb.GetMetricsResponse:
        query = await self._query(request.scaledObjectRef, context)
        value = self.read(query).value
        metric = pb.MetricValue(
            metricName=request.metricName or query.metric_name,
            metricValue=round(value),
            metricValueFloat=value,
        )
        return pb.GetMetricsResponse(metricValues=[metric])

    # -- answers -------------------------------------------------------------------------------

    def read(self, query: Query) -> Reading:
        """The metric's value and whether the model is active, across replicas."""
        counts = self._counts
        in_flight = sum(counts.in_flight(m.id) for m in query.names)
        held = sum(counts.held(m.id) for m in query.names)
        pods: ModelSignals = self._signals.of(query.pods_of)
        at_pods = pods.running + pods.waiting
        if query.metric == "concurrency":
            value = float(in_flight)
            if not query.adapter:  # the pods' queues hold every name they serve
                value = max(value, at_pods)
        elif query.metric == "waiting":
            value = pods.waiting + held
        else:
            value = pods.kv_cache_usage_mean or 0.0
        active = in_flight > 0 or held > 0 or (not query.adapter and at_pods > 0)
        return Reading(value, active, held > 0)

    def _reread(self, metadata: Mapping[str, str]) -> Reading:
        """A stream's answer now: its model may have gained adapters since, or gone."""
        try:
            query = parse(metadata, self._signals)
        except ScalerError:
            return Reading(0.0, False, False)
        return self.read(query)

    async def _query(
        self, source: pb.ScaledObjectRef | Mapping[str, str], context: Context
    ) -> Query:
        metadata = source.scalerMetadata if isinstance(source, pb.ScaledObjectRef) else source
        try:
            return parse(metadata, self._signals)
        except ScalerError as err:
            await context.abort(err.code, err.message)
            raise  # abort raises; this only tells type checkers the function ends here

    def _changed(self, name: str) -> None:
        for event in self._watchers.get(name, ()):
            event.set()
