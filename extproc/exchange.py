"""One HTTP request's passage through the gateway: the state machine behind one ext_proc stream.

Envoy sends the request headers, then the body (one buffered message, or chunks), then the
response headers (and the response body only when this exchange asked for it). The exchange
answers each, routes once the whole body is in, and releases the request's accounting exactly
once in ``close``, however the stream ends.

Body modes: with BUFFERED the headers are answered at once and the route goes in the body
answer. When Envoy sends the body without waiting for the headers answer (FULL_DUPLEX_STREAMED,
or STREAMED with ``send_body_without_waiting_for_header_response``), the headers answer is held
until the last chunk and carries the route; in FULL_DUPLEX_STREAMED the server also hands the
body back to Envoy, unchanged.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from enum import Enum, auto

from envoy.service.ext_proc.v3.external_processor_pb2 import (
    HttpBody,
    HttpHeaders,
    ProcessingRequest,
    ProcessingResponse,
)

from extproc import envoy_messages as msgs
from extproc import errors, openai_request
from extproc.errors import GatewayError
from extproc.gateway import (
    DESTINATION_ENDPOINT,
    MODEL,
    POD_NAME,
    REQUEST_ID,
    TARGET_POD,
    Gateway,
)
from extproc.openai_request import INFERENCE_PATHS, MODELS_PATH, Endpoint, InferenceRequest
from extproc.router import Plan
from extproc.usage import CHARS_PER_TOKEN, UsageReader
from strategies.base import PodView, RequestView, Timings, Usage

log = logging.getLogger(__name__)
access_log = logging.getLogger("extproc.access")

BodyMode = msgs.BodyMode
NO_RESPONSES: tuple[ProcessingResponse, ...] = ()
UNOBSERVED = "unobserved"
"""The status label of a request whose response the server chose not to see."""


class State(Enum):
    HEADERS = auto()
    """Waiting for the request headers."""
    BODY = auto()
    """An inference request: collecting its body."""
    PASSTHROUGH = auto()
    """Not ours to route: answer whatever comes with 'continue'."""
    ROUTED = auto()
    """Routed (to a pod, or by model only); waiting for the response."""
    DONE = auto()
    """An immediate response was sent; Envoy sends nothing more that matters."""


class Exchange:
    __slots__ = (
        "_body_chunks",
        "_body_mode",
        "_body_size",
        "_charge_tokens",
        "_closed",
        "_decision_seconds",
        "_duplex",
        "_endpoint",
        "_gw",
        "_held_chunks",
        "_hold_headers",
        "_model",
        "_needs_usage",
        "_plan",
        "_pod",
        "_prompt",
        "_request",
        "_scrape_mark",
        "_skip_response",
        "_status",
        "_strip",
        "_timings",
        "_usage",
        "_user",
        "request_id",
        "state",
    )

    def __init__(self, gateway: Gateway) -> None:
        self._gw = gateway
        self.state = State.HEADERS
        self.request_id = ""
        self._endpoint: Endpoint | None = None
        self._plan: Plan | None = None
        self._user: str | None = None
        self._strip: list[str] = []
        self._body_chunks: list[bytes] = []
        self._body_size = 0
        self._duplex = False
        self._hold_headers = False
        self._held_chunks = 0
        self._model = ""
        self._pod: PodView | None = None
        self._prompt: object = None  # kept only under the log_prompts debug setting
        self._request: RequestView | None = None
        self._scrape_mark = 0.0
        self._timings: Timings | None = None
        self._status = ""
        self._closed = False
        self._decision_seconds = 0.0
        self._needs_usage = False
        self._usage: UsageReader | None = None
        self._charge_tokens = False  # the user has a TPM limit: charge the response's usage
        self._body_mode: int | None = None
        self._skip_response = False

    # -- dispatch ------------------------------------------------------------------------------

    async def handle(self, message: ProcessingRequest) -> Sequence[ProcessingResponse]:
        """The responses to send for one message from Envoy (possibly none, possibly several)."""
        kind = message.WhichOneof("request")
        try:
            if kind == "request_headers":
                if message.HasField("protocol_config"):
                    self._read_protocol(message)
                return await self._on_request_headers(message.request_headers)
            if kind == "request_body":
                return await self._on_request_body(message.request_body)
            if kind == "response_headers":
                return self._on_response_headers(message.response_headers)
            if kind == "response_body":
                if self._usage is not None:
                    self._usage.feed(message.response_body.body)
                return (msgs.CONTINUE_RESPONSE_BODY,)
            if kind == "request_trailers":
                return await self._on_request_trailers()
            if kind == "response_trailers":
                return (msgs.CONTINUE_RESPONSE_TRAILERS,)
        except GatewayError as err:
            return self._fail(err)
        return NO_RESPONSES

    def _read_protocol(self, message: ProcessingRequest) -> None:
        config = message.protocol_config
        mode = config.request_body_mode
        self._body_mode = mode
        self._duplex = mode == BodyMode.FULL_DUPLEX_STREAMED
        self._hold_headers = self._duplex or (
            mode in (BodyMode.STREAMED, BodyMode.BUFFERED_PARTIAL)
            and config.send_body_without_waiting_for_header_response
        )

    # -- request headers -----------------------------------------------------------------------

    async def _on_request_headers(self, message: HttpHeaders) -> Sequence[ProcessingResponse]:
        gw = self._gw
        settings = gw.settings
        strategy_header = settings.strategy_header
        user_header = settings.user_header
        path = method = strategy = None
        for entry in message.headers.headers:
            key = entry.key
            if key == ":path":
                path = _value(entry)
            elif key == ":method":
                method = _value(entry)
            elif key == strategy_header:
                strategy = _value(entry).strip()
            elif key == user_header:
                self._user = _value(entry) or None
            elif key == REQUEST_ID:
                self.request_id = _value(entry)
            elif key in (TARGET_POD, DESTINATION_ENDPOINT):
                # Only the gateway may pick a pod: a client-supplied target is an open proxy.
                self._strip.append(key)
        if not self.request_id:
            self.request_id = os.urandom(16).hex()

        route_path = (path or "").partition("?")[0]
        endpoint = INFERENCE_PATHS.get(route_path)
        if endpoint is None or method != "POST":
            if route_path == MODELS_PATH and method == "GET":
                self.state = State.DONE
                self._status = "200"
                return (msgs.immediate(200, gw.models_body(), details="extproc_models"),)
            self.state = State.PASSTHROUGH
            return (self._passthrough_headers(),)

        self._endpoint = endpoint
        self.state = State.BODY
        if strategy:
            self._plan = gw.router.plan(strategy, strategy_header)
        else:
            self._plan = gw.default_plan
        if message.end_of_stream:
            raise errors.invalid_json("the body is empty")
        if self._user is not None:
            # Before the body is read; README "When the check happens, and what it costs".
            self._charge_tokens = await gw.limiter.admit(self._user)
        if gw.settings.response_phase == "never":
            self._skip_response = True
        if self._hold_headers:
            return NO_RESPONSES
        if self._strip:
            return (msgs.request_headers(msgs.mutation((), self._strip), clear_route_cache=True),)
        if gw.settings.response_phase == "when-needed" and not self._needs_response():
            skip = msgs.CONTINUE_SKIP_RESPONSE.get(self._body_mode)
            if skip is not None:
                self._skip_response = True
                return (skip,)
        return (msgs.CONTINUE_REQUEST_HEADERS,)

    def _needs_response(self) -> bool:
        """Whether the response must be seen: for token usage (TPM limit, a strategy)."""
        return self._charge_tokens or (self._plan is not None and self._plan.needs_usage)

    def _passthrough_headers(self) -> ProcessingResponse:
        if not self._strip:
            return msgs.request_headers(mode=msgs.SKIP_BODY_AND_RESPONSE)
        return msgs.request_headers(
            msgs.mutation((), self._strip), clear_route_cache=True, mode=msgs.SKIP_BODY_AND_RESPONSE
        )

    # -- request body --------------------------------------------------------------------------

    async def _on_request_body(self, message: HttpBody) -> Sequence[ProcessingResponse]:
        state = self.state
        if state is State.PASSTHROUGH:
            if self._duplex:
                return (msgs.streamed_request_body(message.body, message.end_of_stream),)
            return (msgs.CONTINUE_REQUEST_BODY,)
        if state is not State.BODY:
            return NO_RESPONSES
        chunk = message.body
        self._body_size += len(chunk)
        limit = self._gw.settings.max_body_bytes
        if self._body_size > limit:
            raise errors.body_too_large(limit)
        if not message.end_of_stream:
            self._body_chunks.append(chunk)
            if self._hold_headers:
                self._held_chunks += 1
                return NO_RESPONSES
            return (msgs.CONTINUE_REQUEST_BODY,)
        if self._body_chunks:
            self._body_chunks.append(chunk)
            chunk = b"".join(self._body_chunks)
            self._body_chunks = []
        return await self._route(chunk, trailers=False)

    async def _on_request_trailers(self) -> Sequence[ProcessingResponse]:
        if self.state is not State.BODY:
            return (msgs.CONTINUE_REQUEST_TRAILERS,)
        body = b"".join(self._body_chunks)
        self._body_chunks = []
        return await self._route(body, trailers=True)

    # -- routing -------------------------------------------------------------------------------

    async def _route(self, body: bytes, trailers: bool) -> Sequence[ProcessingResponse]:
        gw = self._gw
        assert self._endpoint is not None
        request = openai_request.parse(self._endpoint, body)
        if gw.settings.log_prompts:
            self._prompt = _prompt_of(request)
        model = self._model = request.model
        plan = self._plan
        prepared = await gw.prepare(request, plan, self.request_id, self._user)
        view = prepared.view
        request_id = self.request_id.encode()
        headers = [msgs.fixed_header(MODEL, model.encode()), msgs.header(REQUEST_ID, request_id)]
        if plan is not None:
            pods = prepared.pods
            now = view.now
            self._needs_usage = self._charge_tokens or plan.needs_usage
            hashes = prepared.hashes
            decision = gw.router.decide(plan, view, pods)
            self._decision_seconds = decision.seconds
            pod = decision.pod
            if hashes is not None:
                gw.prefix.record(hashes, pod, view.prefix_matches.get(pod.name, 0))
            self._claim(pod, view, now)
            address = pod.address.encode()
            headers.append(msgs.fixed_header(TARGET_POD, address))
            headers.append(msgs.fixed_header(gw.settings.strategy_header, plan.header_value))
            if gw.settings.destination_endpoint_header:
                headers.append(msgs.fixed_header(DESTINATION_ENDPOINT, address))
            if self._skip_response:
                # No response phase to name the pod to the client: Envoy copies this header.
                headers.append(msgs.fixed_header(POD_NAME, pod.name.encode()))
        elif self._charge_tokens:
            # Routed by model only, but the user's TPM limit needs the response's usage.
            self._needs_usage = True
            self._request = view
        self.state = State.ROUTED
        if self._skip_response:
            self._status = UNOBSERVED
        mutation = msgs.mutation(headers, self._strip)
        if not self._hold_headers:
            return (msgs.request_body(mutation, clear_route_cache=True),)
        responses = [msgs.request_headers(mutation, clear_route_cache=True)]
        if self._duplex:
            responses.append(msgs.streamed_request_body(body, end_of_stream=not trailers))
        else:
            responses.extend([msgs.CONTINUE_REQUEST_BODY] * (self._held_chunks + (not trailers)))
        if trailers:
            responses.append(msgs.CONTINUE_REQUEST_TRAILERS)
        return responses

    def _claim(self, pod: PodView, view: RequestView, now: float) -> None:
        """Count the request against ``pod`` until ``close`` releases it."""
        pod.in_flight += 1
        pod.sent_since_scrape += 1
        self._scrape_mark = pod.metrics_at
        self._pod = pod
        self._request = view
        self._timings = Timings(routed_at=now)
        self._gw.router.routed(view, pod)

    # -- response ------------------------------------------------------------------------------

    def _on_response_headers(self, message: HttpHeaders) -> Sequence[ProcessingResponse]:
        for entry in message.headers.headers:
            if entry.key == ":status":
                self._status = _value(entry)
                break
        if self.state is not State.ROUTED:
            return (msgs.CONTINUE_RESPONSE_HEADERS,)
        headers = [msgs.header(REQUEST_ID, self.request_id.encode())]
        pod, plan = self._pod, self._plan
        if pod is not None and plan is not None:
            assert self._timings is not None
            self._timings.first_byte_at = time.monotonic()
            headers.append(msgs.fixed_header(TARGET_POD, pod.name.encode()))
            headers.append(msgs.fixed_header(self._gw.settings.strategy_header, plan.header_value))
        if self._needs_usage and self._status.startswith("2"):
            assert self._request is not None
            self._usage = UsageReader(streaming=self._request.stream)
            return (msgs.response_headers(msgs.mutation(headers), msgs.STREAM_RESPONSE_BODY),)
        return (msgs.response_headers(msgs.mutation(headers)),)

    # -- errors and the end --------------------------------------------------------------------

    def _fail(self, err: GatewayError) -> Sequence[ProcessingResponse]:
        self.state = State.DONE
        self._status = str(err.status)
        if err.status >= 500:
            log.warning("%s", err, extra={"request_id": self.request_id})
        return (msgs.error(err, self.request_id),)

    def fail_internal(self) -> ProcessingResponse | None:
        """A 500 JSON answer after an unexpected exception, when it can still reach the client."""
        if self.state in (State.HEADERS, State.BODY):
            self.state = State.DONE
            self._status = "500"
            return msgs.error(errors.internal(self.request_id), self.request_id)
        return None

    def close(self) -> None:
        """Release the request's accounting. Idempotent: the first call does the work."""
        if self._closed:
            return
        self._closed = True
        gw = self._gw
        usage = self._read_usage()
        if usage is not None and self._charge_tokens and self._user is not None:
            gw.limiter.charge(self._user, usage)
        status = self._status or "cancelled"
        pod = self._pod
        if pod is None:
            if self._endpoint is not None:
                # Only models the fleet serves become labels: a client's typo must not.
                model = self._model if gw.registry.knows_model(self._model) else "unknown"
                strategy = self._plan.metric_label if self._plan else "none"
                gw.telemetry.count_request(model, strategy, status)
                if access_log.isEnabledFor(logging.INFO):
                    self._log_access(
                        "routed" if self.state is State.ROUTED else "not routed",
                        {
                            "request_id": self.request_id,
                            "model": model,
                            "strategy": self._plan.label if self._plan else "none",
                            "pod": None,
                            "status": status,
                        },
                    )
            return
        self._pod = None
        pod.in_flight -= 1
        if pod.metrics_at == self._scrape_mark and pod.sent_since_scrape > 0:
            pod.sent_since_scrape -= 1  # finished before any scrape could have seen it
        telemetry = gw.telemetry
        timings = self._timings
        request = self._request
        assert timings is not None and request is not None and self._plan is not None
        now = time.monotonic()
        timings.finished_at = now
        gw.router.finished(request, pod, usage, timings)
        telemetry.count_request(self._model, self._plan.metric_label, status)
        first_byte = timings.first_byte_at
        telemetry.observe_request(
            self._model,
            now - timings.routed_at,
            None if first_byte is None else first_byte - timings.routed_at,
        )
        if access_log.isEnabledFor(logging.INFO):
            self._log_access(
                "routed",
                {
                    "request_id": self.request_id,
                    "model": self._model,
                    "strategy": self._plan.label,
                    "pod": pod.name,
                    "status": status,
                    "decision_ms": round(self._decision_seconds * 1000, 3),
                    "duration_ms": round((now - timings.routed_at) * 1000, 3),
                },
            )

    def _log_access(self, message: str, fields: dict[str, object]) -> None:
        """The request's one access-log line: never a header, and the prompt only when the
        ``log_prompts`` debug setting kept it."""
        if self._prompt is not None:
            fields["prompt"] = self._prompt
        access_log.info(message, extra=fields)

    def _read_usage(self) -> Usage | None:
        """The response's token usage, when this exchange read the body for it (counted by
        source); ``None`` otherwise or when nothing usable was seen."""
        reader, request = self._usage, self._request
        if request is not None and self._skip_response and self._needs_usage:
            # ``response_phase: never``: no response to read, so the request's own size and
            # max_tokens stand for its usage (counted as an estimate).
            self._gw.telemetry.usage.labels("estimated").inc()
            return Usage(
                prompt_tokens=request.prompt_length // CHARS_PER_TOKEN,
                completion_tokens=request.max_tokens or 0,
                estimated=True,
            )
        if reader is None or request is None:
            return None
        usage = reader.result(request.prompt_length)
        source = "missing" if usage is None else "estimated" if usage.estimated else "reported"
        self._gw.telemetry.usage.labels(source).inc()
        return usage


def _prompt_of(request: InferenceRequest) -> object:
    """The prompt as ``log_prompts`` writes it: chat turns, text, or token ids."""
    if request.messages is not None:
        return [{"role": role, "content": content} for role, content in request.messages]
    return request.text if request.text is not None else request.token_ids


def _value(entry: object) -> str:
    """A header's value: Envoy sends ``raw_value`` bytes (``value`` in older versions)."""
    raw: bytes = entry.raw_value  # type: ignore[attr-defined]
    if raw:
        return raw.decode("utf-8", "replace")
    value: str = entry.value  # type: ignore[attr-defined]
    return value
