"""One request's routing, stage by stage, behind one handle.

``Pipeline.open`` gives each request a ``Ticket``; the protocol adapter (the ext_proc exchange)
calls its stages as Envoy's messages arrive and hands the results back to Envoy:

1. ``admit``: the strategy plan named by the request (400 for an unknown one) and the user's
   rate limits (429, 401, 503);
2. ``route``: parse the body (400), find the model's candidates (404, 503), produce the data
   the plan consumes (tokens and prefix matches), read the candidates again after that wait,
   snapshot them, score, pick, and claim the pod;
3. ``response_started`` / ``feed``: the response's status and, when token usage is needed, its
   body;
4. ``release``: ends the request's accounting exactly once, however the stream ended: the
   claim, the strategies' ``on_finished``, the TPM charge, metrics and the access-log line.

A dry run (the debug API's Explain) runs the same stages with no side effect: no rate-limit
check, no claim, no hook, no index write, no counter, and its own random generator.
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from extproc import errors
from extproc.config import RoutingSettings
from extproc.fleet.health import STATUS, UNREACHABLE, PodHealth
from extproc.fleet.registry import ANY_MODEL, PodRegistry
from extproc.routing import openai_request
from extproc.routing.access_log import AccessLog
from extproc.routing.accounting import Accounting, Claim
from extproc.routing.adapter_affinity import prefer_running
from extproc.routing.holds import Holds
from extproc.routing.openai_request import Endpoint, InferenceRequest
from extproc.routing.plans import Plan, Plans
from extproc.routing.producer import Producer
from extproc.routing.scoring import Decision, decide
from extproc.routing.snapshots import Snapshots
from extproc.routing.usage import UsageReader, UsageStripper
from extproc.scraping.readings import Readings
from extproc.telemetry import Telemetry
from extproc.users.ratelimit import RateLimiter
from strategies.context import Finished, PodSnapshot, RoutingContext, Usage

log = logging.getLogger(__name__)

OnHold = Callable[[float], Awaitable[None]]
"""Told, before a request waits for a model's first pod, the longest it may wait."""
UNOBSERVED = "unobserved"
"""The status of a request whose response the server chose not to see."""
CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class RequestHead:
    """What the request's headers say, read by the protocol adapter."""

    request_id: str
    endpoint: Endpoint
    user: str | None = None
    strategy: str | None = None
    """The ``routing-strategy`` header's value (``None``: the configured default)."""
    subset: frozenset[str] | None = None
    """Endpoints (``ip:port``) the gateway allows for this request; ``None``: any."""


@dataclass(slots=True)
class Route:
    """Where the request goes. ``pod`` is ``None`` when it is routed by model only."""

    model: str
    plan: Plan | None
    pod: PodSnapshot | None = None
    endpoints: tuple[str, ...] = ()
    """The chosen pod's address, then fallbacks best first (``routing.fallback_endpoints``)."""
    ctx: RoutingContext | None = None
    decision: Decision | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """How the request ended, as the protocol adapter saw it."""

    status: str
    """The response's HTTP status, or ``cancelled`` (the stream ended first) or
    ``unobserved`` (the response was not shown to the server)."""
    upstream: bool | None = None
    """Whether the response came from the pod (False: Envoy answered itself, the pod could
    not be reached); None when Envoy did not say (its ``response.code_details``)."""


class Pipeline:
    def __init__(
        self,
        settings: RoutingSettings,
        *,
        registry: PodRegistry,
        readings: Readings,
        accounting: Accounting,
        plans: Plans,
        producers: Sequence[Producer],
        limiter: RateLimiter,
        holds: Holds,
        health: PodHealth,
        telemetry: Telemetry,
        access_log: AccessLog,
        any_model: bool = False,
        seed: int | None = None,
    ) -> None:
        self.registry = registry
        self.readings = readings
        self.accounting = accounting
        self.plans = plans
        self.producers = tuple(producers)
        self.limiter = limiter
        self.holds = holds
        self.health = health
        self.telemetry = telemetry
        self.access_log = access_log
        self.snapshots = Snapshots(readings, accounting)
        self.retry_after = settings.retry_after_seconds
        self.fallback_endpoints = settings.fallback_endpoints
        self.any_model = any_model
        """Endpoint-picker mode: every pod of the pool serves whatever model a request names
        (the gateway routed it to the pool); a model no pod lists is routed among them all."""
        self.rng = random.Random(seed)
        self._keys = itertools.count(1)

    def open(self, head: RequestHead, *, dry_run: bool = False) -> Ticket:
        return Ticket(self, head, next(self._keys), dry_run)

    def candidate_key(self, model: str) -> str:
        """The registry key a request for ``model`` takes candidates from."""
        if self.any_model and not self.registry.candidates(model):
            return ANY_MODEL
        return model

    def model_label(self, model: str) -> str:
        """A metric label for ``model``: only models the fleet serves, never a client's typo."""
        return model if self.registry.knows_model(model) else "unknown"


class Ticket:
    """One request's passage through the pipeline; see the module docstring for its stages."""

    __slots__ = (
        "_charge_tokens",
        "_claim",
        "_model_counted",
        "_pipeline",
        "_prepared",
        "_reader",
        "_released",
        "_stripper",
        "decision_seconds",
        "dry_run",
        "first_byte_at",
        "head",
        "key",
        "plan",
        "request",
        "route_result",
        "routed_at",
    )

    def __init__(self, pipeline: Pipeline, head: RequestHead, key: int, dry_run: bool) -> None:
        self._pipeline = pipeline
        self.head = head
        self.key = key
        self.dry_run = dry_run
        self.plan: Plan | None = None
        self.request: InferenceRequest | None = None
        self.route_result: Route | None = None
        self.routed_at = 0.0
        self.first_byte_at: float | None = None
        self.decision_seconds = 0.0
        self._charge_tokens = False
        self._claim: Claim | None = None
        self._prepared: list[tuple[Producer, object]] = []
        self._reader: UsageReader | None = None
        self._stripper: UsageStripper | None = None
        self._model_counted = False
        self._released = False

    @property
    def request_id(self) -> str:
        return self.head.request_id

    # -- admit ---------------------------------------------------------------------------------

    async def admit(self) -> None:
        """Choose the plan and check the user's limits. Raises ``GatewayError``."""
        pipeline = self._pipeline
        value = self.head.strategy
        plans = pipeline.plans
        self.plan = plans.parse(value, remember=not self.dry_run) if value else plans.default
        user = self.head.user
        if user is not None and not self.dry_run:
            self._charge_tokens = await pipeline.limiter.admit(user)

    @property
    def needs_usage(self) -> bool:
        """Whether the response's token usage must be read (a TPM limit, or a strategy)."""
        return self._charge_tokens or (self.plan is not None and self.plan.needs_usage)

    # -- route ---------------------------------------------------------------------------------

    async def route(self, body: bytes, on_hold: OnHold | None = None) -> Route:
        """Parse, find candidates (waiting for a first pod when the model has none: then
        ``on_hold`` is told how long it may take), produce data, pick and (unless a dry run)
        claim."""
        return await self.route_request(openai_request.parse(self.head.endpoint, body), on_hold)

    async def route_request(
        self, request: InferenceRequest, on_hold: OnHold | None = None
    ) -> Route:
        """``route`` for a body already parsed."""
        self.request = request
        route = await self._route(request, on_hold)
        self.route_result = route
        return route

    async def _route(self, request: InferenceRequest, on_hold: OnHold | None) -> Route:
        pipeline = self._pipeline
        model = pipeline.candidate_key(request.model)
        registry = pipeline.registry
        if model != ANY_MODEL and not registry.knows_model(model):
            raise errors.model_not_found(request.model)
        if not self.dry_run:
            pipeline.accounting.model_started(request.model)
            self._model_counted = True
        plan = self.plan
        route = Route(request.model, plan)
        info = registry.model(model)
        if not registry.candidates(model):
            holds = pipeline.holds
            if self.dry_run and plan is None:
                return route
            if info is not None and info.parent and registry.candidates(info.parent):
                # The base model's pods are up but none holds the adapter now: waiting for a
                # first pod would not help.
                raise errors.adapter_not_loaded(model, info.parent, pipeline.retry_after)
            if self.dry_run or not holds.may_hold(model):
                raise errors.no_ready_pod(request.model, pipeline.retry_after)
            if on_hold is not None:
                await on_hold(holds.timeout)
            await holds.wait(model)
        if plan is None and not self.dry_run:
            return route
        for producer in pipeline.producers:
            if self.dry_run or (plan is not None and producer.wanted(plan)):
                prepared = await producer.prepare(request, dry_run=self.dry_run)
                self._prepared.append((producer, prepared))
        # After the last wait: candidates as they are now (a pod may have left meanwhile).
        pods = registry.candidates(model)
        if not pods:
            raise errors.no_ready_pod(request.model, pipeline.retry_after)
        started = time.perf_counter()
        now = time.monotonic()
        snapshots = pipeline.snapshots.take(model, pods, now)
        subset = self.head.subset
        if subset is not None:
            snapshots = tuple(p for p in snapshots if p.address in subset)
            if not snapshots:
                raise errors.no_endpoint_in_subset(pipeline.retry_after)
        snapshots = pipeline.health.usable(snapshots, now)
        if info is not None and info.parent:
            snapshots = prefer_running(snapshots, model)
        ctx = RoutingContext(
            key=self.key,
            model=request.model,
            user=self.head.user,
            now=now,
            prompt_tokens=request.prompt_tokens,
            prompt_tokens_exact=request.token_ids is not None,
            max_tokens=request.max_tokens,
            stream=request.stream,
            pods=snapshots,
            rng=random.Random() if self.dry_run else pipeline.rng,
        )
        for producer, prepared in self._prepared:
            producer.fill(prepared, ctx)
        route.ctx = ctx
        if plan is None:
            return route
        decision = route.decision = decide(plan, ctx, pipeline.plans.fallback, self.request_id)
        pod = route.pod = ctx.pods[decision.index]
        ranked = decision.ranked(1 + pipeline.fallback_endpoints)
        route.endpoints = tuple(ctx.pods[i].address for i in ranked)
        if self.dry_run:
            return route
        self._claim = pipeline.accounting.claim(
            pod.name, pipeline.readings.get(pod.name), ctx.prompt_tokens
        )
        self.routed_at = now
        pipeline.plans.routed(ctx, pod)
        for producer, prepared in self._prepared:
            producer.claimed(prepared, ctx, decision.index)
        telemetry = pipeline.telemetry
        for name, reason in decision.fallbacks:
            telemetry.count_fallback(name, reason)
        self.decision_seconds = time.perf_counter() - started
        telemetry.observe_decision(plan.metric_label, self.decision_seconds)
        return route

    def served_by(self, address: str) -> None:
        """The gateway reports the endpoint that really served (it may have tried the next one
        of the list): the request's accounting moves there."""
        route = self.route_result
        if route is None or route.pod is None or route.pod.address == address:
            return
        if self._claim is None or self._claim.released or route.ctx is None:
            return
        pipeline = self._pipeline
        served = next((p for p in pipeline.registry.pods() if p.address == address), None)
        if served is None:
            return  # not a pod of ours: keep the accounting where it is
        snapshot = pipeline.snapshots.of(served, time.monotonic())
        self._claim.release()
        self._claim = pipeline.accounting.claim(
            served.name, pipeline.readings.get(served.name), route.ctx.prompt_tokens
        )
        route.pod = snapshot

    # -- response ------------------------------------------------------------------------------

    def ask_pod_for_usage(self, body: bytes) -> bytes | None:
        """The body to send instead, asking the pod for a usage event the client did not ask
        for, when this request's usage is needed (``None``: send it as it is). The event is
        taken out of the response again (``feed``)."""
        request = self.request
        if request is None or self.dry_run or not self.needs_usage:
            return None
        rewritten = openai_request.with_usage_requested(body, request)
        if rewritten is not None:
            self._stripper = UsageStripper()
        return rewritten

    def response_started(self, status: str) -> bool:
        """The response headers arrived; true when its body must be fed (for token usage, or
        to take out the usage event the server asked for)."""
        self.first_byte_at = time.monotonic()
        if self.needs_usage and status.startswith("2") and self.request is not None:
            self._reader = UsageReader(streaming=self.request.stream)
            return True
        self._stripper = None
        return False

    def feed(self, chunk: bytes, end_of_stream: bool = False) -> bytes | None:
        """Read a response body chunk; returns what to send on instead of it, or ``None`` to
        send it unchanged."""
        reader = self._reader
        if reader is None:
            return None
        reader.feed(chunk)
        stripper = self._stripper
        if stripper is None:
            return None
        passed = stripper.feed(chunk, end_of_stream)
        return None if passed == chunk else passed

    # -- release -------------------------------------------------------------------------------

    def release(self, outcome: Outcome) -> None:
        """End the request's accounting. Idempotent: the first call does the work."""
        if self._released or self.dry_run:
            return
        self._released = True
        pipeline = self._pipeline
        telemetry = pipeline.telemetry
        request = self.request
        usage = self._usage(outcome) if request is not None else None
        user = self.head.user
        if usage is not None and self._charge_tokens and user is not None:
            pipeline.limiter.charge(user, usage)
        if self._model_counted and request is not None:
            pipeline.accounting.model_finished(request.model)
        route = self.route_result
        claim = self._claim
        strategy = self.plan.metric_label if self.plan is not None else "none"
        if claim is None or route is None or route.pod is None or request is None:
            model = pipeline.model_label(request.model) if request is not None else "unknown"
            telemetry.count_request(model, strategy, outcome.status)
            if pipeline.access_log.enabled:
                pipeline.access_log.write(
                    "routed" if route is not None else "not routed",
                    {
                        "request_id": self.request_id,
                        "model": model,
                        "strategy": self.plan.label if self.plan is not None else "none",
                        "pod": None,
                        "status": outcome.status,
                    },
                    request,
                )
            return
        claim.release()
        now = time.monotonic()
        pod = route.pod
        _judge(pipeline.health, pod.name, outcome)
        pipeline.plans.finished(
            Finished(
                key=self.key,
                pod=pod.name,
                user=user,
                prompt_tokens=usage.prompt_tokens if usage is not None else request.prompt_tokens,
                usage=usage,
                routed_at=self.routed_at,
                finished_at=now,
                first_byte_at=self.first_byte_at,
            )
        )
        telemetry.count_request(request.model, strategy, outcome.status)
        first_byte = self.first_byte_at
        telemetry.observe_request(
            request.model,
            now - self.routed_at,
            None if first_byte is None else first_byte - self.routed_at,
        )
        if pipeline.access_log.enabled:
            assert self.plan is not None
            pipeline.access_log.write(
                "routed",
                {
                    "request_id": self.request_id,
                    "model": request.model,
                    "strategy": self.plan.label,
                    "pod": pod.name,
                    "status": outcome.status,
                    "decision_ms": round(self.decision_seconds * 1000, 3),
                    "duration_ms": round((now - self.routed_at) * 1000, 3),
                },
                request,
            )

    def _usage(self, outcome: Outcome) -> Usage | None:
        """The response's token usage when it was needed (counted by source), else ``None``."""
        request = self.request
        if request is None or not self.needs_usage:
            return None
        usage_counter = self._pipeline.telemetry.usage
        if outcome.status == UNOBSERVED:
            # No response to read: the request's own size and max_tokens stand for its usage.
            usage_counter.labels("estimated").inc()
            return Usage(request.prompt_tokens, request.max_tokens or 0, estimated=True)
        reader = self._reader
        if reader is None:
            return None
        usage = reader.result(request.prompt_tokens)
        source = "missing" if usage is None else "estimated" if usage.estimated else "reported"
        usage_counter.labels(source).inc()
        return usage


def _judge(health: PodHealth, pod: str, outcome: Outcome) -> None:
    """What the outcome says about the pod that served it."""
    status = outcome.status
    if not status.isdigit():
        return  # cancelled, unobserved: no verdict on the pod
    if status[0] == "5":
        health.failed(pod, UNREACHABLE if outcome.upstream is False else STATUS)
    else:
        health.succeeded(pod)
