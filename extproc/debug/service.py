"""The ``extproc.debug.v1.RouterDebug`` gRPC service: explain a routing decision, list the fleet.

Explain opens a dry-run ticket of the routing pipeline and runs its stages (plan, body parsing,
model check, candidates, producers, scores, pick), so its answer and its errors are the ones
a real request would get; the dry run claims no pod, records nothing in the prefix index,
calls no strategy hook, counts nothing and draws from its own random generator. It is off the
hot path: nothing here is reached by an ext_proc stream.
"""

from __future__ import annotations

import time
from typing import Any

import grpc
import orjson

from extproc import errors
from extproc.debug.v1 import debug_pb2 as pb
from extproc.debug.v1 import debug_pb2_grpc
from extproc.envoy.headers import DESTINATION_ENDPOINT, MODEL, REQUEST_ID, TARGET_POD
from extproc.envoy.headers import request_id as accepted_request_id
from extproc.errors import GatewayError
from extproc.fleet.registry import Pod
from extproc.kvevents.events import KvEvents
from extproc.prefix.index import PrefixIndex
from extproc.routing.accounting import Accounting
from extproc.routing.openai_request import INFERENCE_PATHS, Endpoint
from extproc.routing.pipeline import Pipeline, RequestHead
from extproc.scraping.readings import Readings
from strategies import registry
from strategies.context import PREFIX, PodSnapshot, RoutingContext, load_estimate
from strategies.selection import TIE_TOLERANCE

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RouterDebug"].full_name
PATHS = {endpoint: path for path, endpoint in INFERENCE_PATHS.items()}
STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
}
Context = Any
"""``grpc.aio.ServicerContext`` (grpc ships no type information)."""


class RouterDebug(debug_pb2_grpc.RouterDebugServicer):
    def __init__(
        self,
        pipeline: Pipeline,
        *,
        strategy_header: str,
        user_header: str,
        max_body_bytes: int,
        destination_endpoint_header: bool,
        prefix_index: PrefixIndex | None,
        kv_events: KvEvents | None = None,
    ) -> None:
        self._pipeline = pipeline
        self._strategy_header = strategy_header
        self._user_header = user_header
        self._max_body_bytes = max_body_bytes
        self._destination_header = destination_endpoint_header
        self._index = prefix_index
        self._kv = kv_events

    async def Explain(self, request: pb.ExplainRequest, context: Context) -> pb.ExplainResponse:
        try:
            return await self._explain(request)
        except GatewayError as err:
            await context.abort(
                STATUS_CODES.get(err.status, grpc.StatusCode.INTERNAL),
                err.message,
                trailing_metadata=(("http-status", str(err.status)), ("error-code", str(err.code))),
            )
            raise  # abort raises; this only tells type checkers the function ends here

    async def ListPods(self, request: pb.ListPodsRequest, context: Context) -> pb.ListPodsResponse:
        pipeline = self._pipeline
        now = time.monotonic()
        pods = [
            self._describe(
                _pod_message(
                    pod,
                    now,
                    pipeline.readings,
                    pipeline.accounting,
                    self._index.held(pod.name) if self._index is not None else 0,
                    pipeline.registry.serving(pod),
                ),
                now,
            )
            for pod in pipeline.registry.pods()
            if not request.model
            or request.model == pod.spec.model
            or request.model in pipeline.registry.serving(pod)
        ]
        return pb.ListPodsResponse(pods=pods)

    async def ListModels(
        self, request: pb.ListModelsRequest, context: Context
    ) -> pb.ListModelsResponse:
        pipeline = self._pipeline
        fleet = pipeline.registry
        serving: dict[str, int] = {}
        for pod in fleet.pods():
            for name in (pod.spec.model, *fleet.serving(pod)):
                serving[name] = serving.get(name, 0) + 1
        models = [
            pb.Model(
                id=info.id,
                parent=info.parent or "",
                ready_pods=len(fleet.candidates(info.id)),
                pods=serving.get(info.id, 0),
                in_flight=pipeline.accounting.model_in_flight(info.id),
                held_requests=pipeline.holds.held(info.id),
            )
            for info in fleet.models()
        ]
        return pb.ListModelsResponse(models=models)

    def _describe(self, message: pb.Pod, now: float) -> pb.Pod:
        """Add what outlier detection and the KV-event subscriber know of the pod."""
        state = self._pipeline.health.state(message.name)
        if state is not None and state.ejected_until > now:
            message.ejected = True
            message.ejected_for_seconds = state.ejected_until - now
            message.ejection_reason = state.reason
        kv = self._kv
        events = kv.states.get(message.name) if kv is not None else None
        if kv is not None and events is not None:
            out = message.kv_events
            out.endpoint = events.endpoint
            out.connected = events.connected
            out.precise = kv.hasher(message.name, now) is not None
            lag = kv.lag(message.name)
            if lag is not None:
                out.lag_seconds = lag
            out.messages = events.received
            out.gaps = events.gaps
            out.resyncs = events.resyncs
            out.blocks = kv.index.held(message.name)
            if events.block_size:
                out.block_size = events.block_size
            out.error = events.error
        return message

    # -- Explain -------------------------------------------------------------------------------

    async def _explain(self, request: pb.ExplainRequest) -> pb.ExplainResponse:
        headers = {key.lower(): value for key, value in request.headers.items()}
        strategy = (request.strategy or headers.get(self._strategy_header, "")).strip()
        user = request.user or headers.get(self._user_header) or None
        request_id = accepted_request_id(headers.get(REQUEST_ID))
        path = request.path or PATHS[Endpoint.COMPLETIONS if request.prompt else Endpoint.CHAT]
        endpoint = INFERENCE_PATHS.get(path.partition("?")[0])
        if endpoint is None:
            raise errors.bad_request(
                f"{errors.clip(path, 64)} is not an inference path, so the gateway passes it "
                f"through unrouted; inference paths: {', '.join(INFERENCE_PATHS)}",
                param="path",
            )
        ticket = self._pipeline.open(
            RequestHead(request_id, endpoint, user, strategy or None), dry_run=True
        )
        await ticket.admit()
        body = _body(request, endpoint)
        if len(body) > self._max_body_bytes:
            raise errors.body_too_large(self._max_body_bytes)
        route = await ticket.route(body)
        ctx, plan, decision = route.ctx, route.plan, route.decision
        assert ticket.request is not None
        prefix = ctx.prefix if ctx is not None else None
        answer = pb.ExplainResponse(
            model=route.model,
            path=path,
            user=user or "",
            request_id=request_id,
            prompt_blocks=prefix.prompt_tokens // prefix.block_tokens if prefix is not None else 0,
            prompt_length=ctx.prompt_tokens if ctx is not None else ticket.request.prompt_tokens,
            uses_prefix=plan is not None and PREFIX in plan.consumes,
            held_requests=self._pipeline.holds.held(route.model),
            candidates=[_candidate(ctx, i) for i in range(len(ctx.pods))] if ctx else [],
        )
        answer.upstream_headers[MODEL] = route.model
        answer.upstream_headers[REQUEST_ID] = request_id
        if plan is None or decision is None or ctx is None:
            answer.routed_by_model = True
            return answer
        combined = decision.combined
        top = max(combined)
        for i, candidate in enumerate(answer.candidates):
            candidate.score = combined[i]
            candidate.best = combined[i] >= top - TIE_TOLERANCE
            for name, scores in decision.per_strategy.items():
                candidate.scores.add(strategy=name, score=scores[i])
        chosen = ctx.pods[decision.index]
        answer.strategy = plan.label
        answer.pod = chosen.name
        answer.address = chosen.address
        answer.fallbacks.extend(
            pb.Fallback(strategy=name, reason=reason, used=registry.FALLBACK)
            for name, reason in decision.fallbacks
        )
        answer.upstream_headers[TARGET_POD] = chosen.address
        answer.upstream_headers[self._strategy_header] = plan.label
        if self._destination_header:
            answer.upstream_headers[DESTINATION_ENDPOINT] = chosen.address
        return answer


def _body(request: pb.ExplainRequest, endpoint: Endpoint) -> bytes:
    """The request body: ``body`` as given, or one built from the parts for ``endpoint``."""
    parts = request.model or request.messages or request.prompt or request.HasField("max_tokens")
    if request.body:
        if parts:
            raise errors.bad_request(
                "give either body or model/messages/prompt/max_tokens, not both", param="body"
            )
        return request.body.encode()
    if request.messages and request.prompt:
        raise errors.bad_request("give either messages or prompt, not both", param="prompt")
    document: dict[str, object] = {"model": request.model}
    if request.messages:
        turns = [{"role": m.role, "content": m.content} for m in request.messages]
        document["input" if endpoint is Endpoint.RESPONSES else "messages"] = turns
    if request.prompt:
        document["prompt" if endpoint is Endpoint.COMPLETIONS else "input"] = request.prompt
    if request.HasField("max_tokens"):
        document["max_tokens"] = request.max_tokens
    return orjson.dumps(document)


def _candidate(ctx: RoutingContext, index: int) -> pb.Candidate:
    pod: PodSnapshot = ctx.pods[index]
    prefix = ctx.prefix
    return pb.Candidate(
        pod=pod.name,
        address=pod.address,
        load=pod.load,
        in_flight=pod.in_flight,
        sent_since_scrape=pod.sent_since_scrape,
        prefix_match_blocks=prefix.matched[index] // prefix.block_tokens if prefix else 0,
        prefix_match_tokens=prefix.matched[index] if prefix else 0,
        prefix_precise=prefix.precise[index] if prefix else False,
        metrics_fresh=pod.metrics is not None,
    )


def _pod_message(
    pod: Pod,
    now: float,
    readings: Readings,
    accounting: Accounting,
    prefix_blocks: int,
    adapters: frozenset[str],
) -> pb.Pod:
    spec = pod.spec
    reading = readings.get(spec.name)
    counters = accounting.counters(spec.name)
    sent = counters.sent_since(reading)
    fresh = readings.fresh(spec.name, now)

    message = pb.Pod(
        name=spec.name,
        address=spec.address,
        model=spec.model,
        adapters=sorted(adapters),
        ready=spec.ready,
        namespace=spec.namespace,
        metrics_url=spec.effective_metrics_url,
        in_flight=counters.in_flight,
        sent_since_scrape=sent,
        load=load_estimate(counters.in_flight, sent, fresh),
        metrics_fresh=fresh is not None,
        prefix_blocks=prefix_blocks,
    )
    if pod.ready_since is not None and spec.ready:
        message.ready_for_seconds = now - pod.ready_since
    first = readings.first_at(spec.name)
    if first is not None and pod.ready_since is not None:
        message.coldstart_seconds = max(0.0, first - pod.ready_since)
    if reading is None:
        return message
    metrics = reading.metrics
    message.metrics_age_seconds = now - reading.at
    out = message.metrics
    for name in (
        "running",
        "waiting",
        "kv_cache_usage",
        "prefix_cache_queries",
        "prefix_cache_hits",
        "prompt_tokens",
        "generation_tokens",
        "block_size",
        "num_gpu_blocks",
    ):
        value = getattr(metrics, name)
        if value is not None:
            setattr(out, name, value)
    out.running_adapters.extend(metrics.running_adapters)
    out.waiting_adapters.extend(metrics.waiting_adapters)
    out.SetInParent()
    window = metrics.window
    if window is not None:
        out.window.CopyFrom(
            pb.MetricsWindow(
                seconds=window.seconds,
                requests=window.requests,
                prompt_tokens=window.prompt_tokens,
                generation_tokens=window.generation_tokens,
                queue_seconds=window.queue_seconds,
                ttft_seconds=window.ttft_seconds,
                e2e_seconds=window.e2e_seconds,
                mean_running=window.mean_running,
            )
        )
    return message
