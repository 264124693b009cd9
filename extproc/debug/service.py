"""The ``extproc.debug.v1.RouterDebug`` gRPC service: explain a routing decision, list the fleet.

Explain runs what a real request runs, in the same order (strategy plan, body size, body
parsing, model check, candidates, prefix lookup, strategy scores) so its answer and errors agree
with the gateway's, but it claims no pod, records nothing in the prefix index, calls no strategy
hook and counts nothing (``Router.explain``). It is off the hot path: nothing here is reached by
an ext_proc stream.
"""

from __future__ import annotations

import os
import random
import time
from typing import Any

import grpc
import orjson

from extproc import errors, openai_request
from extproc.debug.v1 import debug_pb2 as pb
from extproc.debug.v1 import debug_pb2_grpc
from extproc.errors import GatewayError
from extproc.gateway import DESTINATION_ENDPOINT, MODEL, REQUEST_ID, TARGET_POD, Gateway
from extproc.openai_request import INFERENCE_PATHS, Endpoint
from extproc.pods import Pod
from strategies import registry
from strategies.base import PodView
from strategies.selection import TIE_TOLERANCE, best_index

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
    def __init__(self, gateway: Gateway) -> None:
        self._gw = gateway
        self._rng = random.Random()  # its own: drawing from the router's would shift its picks

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
        index = self._gw.prefix.index
        now = time.monotonic()
        pods = [
            _pod_message(pod, now, index.held(pod.spec.name))
            for pod in self._gw.registry.pods()
            if not request.model
            or request.model == pod.spec.model
            or request.model in pod.spec.adapters
        ]
        return pb.ListPodsResponse(pods=pods)

    async def ListModels(
        self, request: pb.ListModelsRequest, context: Context
    ) -> pb.ListModelsResponse:
        fleet = self._gw.registry
        serving: dict[str, int] = {}
        for pod in fleet.pods():
            for name in (pod.spec.model, *pod.spec.adapters):
                serving[name] = serving.get(name, 0) + 1
        models = [
            pb.Model(
                id=info.id,
                parent=info.parent or "",
                ready_pods=len(fleet.candidates(info.id)),
                pods=serving.get(info.id, 0),
            )
            for info in fleet.models()
        ]
        return pb.ListModelsResponse(models=models)

    # -- Explain -------------------------------------------------------------------------------

    async def _explain(self, request: pb.ExplainRequest) -> pb.ExplainResponse:
        gw = self._gw
        settings = gw.settings
        headers = {key.lower(): value for key, value in request.headers.items()}
        strategy = (request.strategy or headers.get(settings.strategy_header, "")).strip()
        user = request.user or headers.get(settings.user_header) or None
        request_id = headers.get(REQUEST_ID) or os.urandom(16).hex()
        path = request.path or PATHS[Endpoint.COMPLETIONS if request.prompt else Endpoint.CHAT]
        endpoint = INFERENCE_PATHS.get(path.partition("?")[0])
        if endpoint is None:
            raise errors.bad_request(
                f"{path} is not an inference path, so the gateway passes it through unrouted; "
                f"inference paths: {', '.join(INFERENCE_PATHS)}",
                param="path",
            )
        plan = gw.router.plan(strategy, settings.strategy_header) if strategy else gw.default_plan
        body = _body(request, endpoint)
        if len(body) > settings.max_body_bytes:
            raise errors.body_too_large(settings.max_body_bytes)
        parsed = openai_request.parse(endpoint, body)
        prepared = await gw.prepare(parsed, plan, request_id, user, explain=True)
        pods, view = prepared.pods, prepared.view
        model, now = parsed.model, view.now
        hashes, matches = prepared.hashes or [], prepared.matches
        answer = pb.ExplainResponse(
            model=model,
            path=path,
            user=user or "",
            request_id=request_id,
            prompt_blocks=len(hashes),
            prompt_length=parsed.prompt_length,
            uses_prefix=plan is not None and plan.needs_prefix,
            candidates=[_candidate(pod, now, matches) for pod in pods],
        )
        answer.upstream_headers[MODEL] = model
        answer.upstream_headers[REQUEST_ID] = request_id
        if plan is None:
            answer.routed_by_model = True
            return answer

        explanation = gw.router.explain(plan, view, pods)
        combined = explanation.combined
        top = max(combined)
        for i, candidate in enumerate(answer.candidates):
            candidate.score = combined[i]
            candidate.best = combined[i] >= top - TIE_TOLERANCE
            for name, scores in explanation.per_strategy.items():
                candidate.scores.add(strategy=name, score=scores[i])
        chosen = pods[best_index(combined, self._rng)]
        answer.strategy = plan.label
        answer.pod = chosen.name
        answer.address = chosen.address
        answer.fallbacks.extend(
            pb.Fallback(strategy=name, reason=reason, used=registry.FALLBACK)
            for name, reason in explanation.fallbacks
        )
        answer.upstream_headers[TARGET_POD] = chosen.address
        answer.upstream_headers[settings.strategy_header] = plan.label
        if settings.destination_endpoint_header:
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


def _candidate(pod: PodView, now: float, matches: dict[str, int]) -> pb.Candidate:
    return pb.Candidate(
        pod=pod.name,
        address=pod.address,
        load=pod.load(now),
        in_flight=pod.in_flight,
        sent_since_scrape=pod.sent_since_scrape,
        prefix_match_blocks=matches.get(pod.name, 0),
        metrics_fresh=pod.fresh_metrics(now) is not None,
    )


def _pod_message(pod: Pod, now: float, prefix_blocks: int) -> pb.Pod:
    spec, view = pod.spec, pod.view
    message = pb.Pod(
        name=spec.name,
        address=spec.address,
        model=spec.model,
        adapters=sorted(spec.adapters),
        ready=view.ready,
        namespace=spec.namespace,
        metrics_url=spec.effective_metrics_url,
        in_flight=view.in_flight,
        sent_since_scrape=view.sent_since_scrape,
        load=view.load(now),
        metrics_fresh=view.fresh_metrics(now) is not None,
        prefix_blocks=prefix_blocks,
    )
    if pod.became_ready_at is not None and view.ready:
        message.ready_for_seconds = now - pod.became_ready_at
    if pod.first_metrics_at is not None and pod.became_ready_at is not None:
        message.coldstart_seconds = max(0.0, pod.first_metrics_at - pod.became_ready_at)
    metrics = view.metrics
    if metrics is None:
        return message
    message.metrics_age_seconds = now - view.metrics_at
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
