"""One ext_proc stream: Envoy's messages in, routing pipeline calls, Envoy's answers out.

Envoy sends the request headers, then the body (one buffered message, or chunks), then the
response headers (and the response body only when this exchange asked for it). The exchange
admits the request at its headers, routes it once the whole body is in, and releases it in
``close`` however the stream ends. It only translates: what to route on, and what a route
means, is the pipeline's.

Body modes: with BUFFERED the headers are answered at once and the route goes in the body
answer. When Envoy sends the body without waiting for the headers answer (FULL_DUPLEX_STREAMED,
or STREAMED with ``send_body_without_waiting_for_header_response``), the headers answer is held
until the last chunk and carries the route; in FULL_DUPLEX_STREAMED the server also hands the
body back to Envoy, unchanged, in chunks of at most 62,000 bytes, and echoes every response
body chunk the same way.

Two conventions tell Envoy where to send the request. AIBrix (the default): ``target-pod:
ip:port``, which an ORIGINAL_DST cluster reads (and, when enabled, the endpoint list in
``x-gateway-destination-endpoint``). Endpoint picker (``mode: epp``, Gateway API Inference
Extension): the endpoint list in ``x-gateway-destination-endpoint`` and the same value in the
dynamic metadata ``envoy.lb``; the gateway's subset hint restricts the choice. In both, the
endpoint that really served (Envoy may have retried the next of the list), when the response
metadata reports it, takes the request's accounting.

Messages out of order (a second request_headers, a body before any headers, a response before
the route) end the stream with ``ProtocolViolation``: Envoy never sends them, so they come from
a broken or hostile client of the gRPC port, and nothing it sends may claim a pod twice.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import Enum, auto

from envoy.service.ext_proc.v3.external_processor_pb2 import (
    HttpBody,
    ProcessingRequest,
    ProcessingResponse,
)

from extproc import errors
from extproc.envoy import messages as msgs
from extproc.envoy.headers import (
    CONTENT_LENGTH,
    DESTINATION_ENDPOINT,
    MODEL,
    POD_NAME,
    REQUEST_ID,
    ROUTING_HEADERS,
    TARGET_POD,
    request_id,
    value,
)
from extproc.errors import GatewayError
from extproc.fleet.models_list import ModelsList
from extproc.routing.openai_request import INFERENCE_PATHS, MODELS_PATH
from extproc.routing.pipeline import (
    CANCELLED,
    UNOBSERVED,
    Outcome,
    Pipeline,
    RequestHead,
    Ticket,
)

log = logging.getLogger(__name__)

BodyMode = msgs.BodyMode
NO_RESPONSES: tuple[ProcessingResponse, ...] = ()
MODEL_PATH_PREFIX = MODELS_PATH + "/"
INFERENCE_PREFIXES = tuple(path + "/" for path in INFERENCE_PATHS)


Interim = Callable[[ProcessingResponse], Awaitable[None]]
"""Sends a message to Envoy before the answer to the current one (a timeout extension)."""
HOLD_MARGIN = 5.0
"""Seconds added to the hold timeout when asking Envoy to wait: the 503 that ends a hold
must reach Envoy before its own timeout does."""


class ProtocolViolation(Exception):
    """A message Envoy would never send at this point of the stream."""


@dataclass(frozen=True)
class ExchangeServices:
    """What every exchange of one server shares (built once)."""

    pipeline: Pipeline
    models: ModelsList
    strategy_header: str
    user_header: str
    max_body_bytes: int
    response_phase: str
    destination_endpoint_header: bool
    picker: bool = False
    """Endpoint-picker convention (``mode: epp``)."""


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
        "_chunks_seen",
        "_duplex",
        "_echo_response",
        "_held_chunks",
        "_hold_headers",
        "_interim",
        "_services",
        "_skip_response",
        "_status",
        "_strip",
        "_ticket",
        "_upstream",
        "request_id",
        "state",
    )

    def __init__(self, services: ExchangeServices, interim: Interim | None = None) -> None:
        self._services = services
        self._interim = interim
        self.state = State.HEADERS
        self.request_id = ""
        self._ticket: Ticket | None = None
        self._strip: list[str] = []
        self._body_chunks: list[bytes] = []
        self._body_size = 0
        self._chunks_seen = 0
        self._duplex = False
        self._echo_response = False
        self._hold_headers = False
        self._held_chunks = 0
        self._status = ""
        self._body_mode: int | None = None
        self._skip_response = False
        self._upstream: bool | None = None

    # -- dispatch ------------------------------------------------------------------------------

    async def handle(self, message: ProcessingRequest) -> Sequence[ProcessingResponse]:
        """The responses to send for one message from Envoy (possibly none, possibly several).
        Raises ``ProtocolViolation`` for a message out of order."""
        kind = message.WhichOneof("request")
        try:
            if kind == "request_headers":
                if self.state is not State.HEADERS:
                    raise ProtocolViolation("request_headers received twice on one stream")
                if message.HasField("protocol_config"):
                    self._read_protocol(message)
                return await self._on_request_headers(message)
            if self.state is State.HEADERS:
                raise ProtocolViolation(f"{kind} received before request_headers")
            if kind == "request_body":
                return await self._on_request_body(message.request_body)
            if kind == "response_headers":
                return self._on_response_headers(message)
            if kind == "response_body":
                return self._on_response_body(message.response_body)
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
        self._echo_response = config.response_body_mode == BodyMode.FULL_DUPLEX_STREAMED

    # -- request headers -----------------------------------------------------------------------

    async def _on_request_headers(self, request: ProcessingRequest) -> Sequence[ProcessingResponse]:
        message = request.request_headers
        services = self._services
        strategy_header = services.strategy_header
        user_header = services.user_header
        path = method = strategy = user = client_id = None
        for entry in message.headers.headers:
            key = entry.key
            if key == ":path":
                path = value(entry)
            elif key == ":method":
                method = value(entry)
            elif key == strategy_header:
                strategy = value(entry).strip() or None
            elif key == user_header:
                user = value(entry) or None
            elif key == REQUEST_ID:
                client_id = value(entry)
            elif key in ROUTING_HEADERS:
                # Only the gateway may pick a pod: a client-supplied target is an open proxy.
                self._strip.append(key)
        self.request_id = request_id(client_id)

        route_path = (path or "").partition("?")[0]
        endpoint = INFERENCE_PATHS.get(route_path)
        if endpoint is None:
            return self._not_inference(route_path, method or "")
        if method != "POST":
            raise errors.method_not_allowed(method or "", route_path)

        self.state = State.BODY
        subset = _subset_hint(request) if services.picker else None
        ticket = self._ticket = services.pipeline.open(
            RequestHead(self.request_id, endpoint, user, strategy, subset)
        )
        await ticket.admit()
        if message.end_of_stream:
            raise errors.invalid_json("the body is empty")
        if services.response_phase == "never":
            self._skip_response = True
        if self._hold_headers:
            return NO_RESPONSES
        if self._strip:
            return (msgs.request_headers(msgs.mutation((), self._strip), clear_route_cache=True),)
        if services.response_phase == "when-needed" and not ticket.needs_usage:
            skip = msgs.CONTINUE_SKIP_RESPONSE.get(self._body_mode)
            if skip is not None:
                self._skip_response = True
                return (skip,)
        return (msgs.CONTINUE_REQUEST_HEADERS,)

    def _not_inference(self, path: str, method: str) -> Sequence[ProcessingResponse]:
        """The model list, a JSON 404/405 on the inference paths, or pass the request on."""
        if path == MODELS_PATH or path.startswith(MODEL_PATH_PREFIX):
            if method not in ("GET", "HEAD"):
                raise errors.method_not_allowed(method, path)
            if path == MODELS_PATH:
                body = self._services.models.body()
            else:
                model = self._services.models.model(path[len(MODEL_PATH_PREFIX) :])
                if model is None:
                    raise errors.model_not_found(path[len(MODEL_PATH_PREFIX) :])
                body = model
            self.state = State.DONE
            self._status = "200"
            return (msgs.immediate(200, body, details="extproc_models"),)
        if path.startswith(INFERENCE_PREFIXES):
            raise errors.path_not_found(path)
        self.state = State.PASSTHROUGH
        if not self._strip:
            return (msgs.request_headers(mode=msgs.SKIP_BODY_AND_RESPONSE),)
        return (
            msgs.request_headers(
                msgs.mutation((), self._strip),
                clear_route_cache=True,
                mode=msgs.SKIP_BODY_AND_RESPONSE,
            ),
        )

    # -- request body --------------------------------------------------------------------------

    async def _on_request_body(self, message: HttpBody) -> Sequence[ProcessingResponse]:
        state = self.state
        if state is State.PASSTHROUGH:
            if self._duplex:
                return msgs.streamed_request_body(message.body, message.end_of_stream)
            return (msgs.CONTINUE_REQUEST_BODY,)
        if state is State.DONE:
            return NO_RESPONSES  # sent before Envoy saw the immediate response
        if state is not State.BODY:
            raise ProtocolViolation("request_body received after the request was routed")
        chunk = message.body
        self._chunks_seen += 1
        self._body_size += len(chunk)
        limit = self._services.max_body_bytes
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
        services = self._services
        ticket = self._ticket
        assert ticket is not None
        route = await ticket.route(body, self._extend_timeout)
        headers = [
            msgs.fixed_header(MODEL, route.model.encode()),
            msgs.header(REQUEST_ID, self.request_id.encode()),
        ]
        metadata = None
        pod, plan = route.pod, route.plan
        if pod is not None and plan is not None:
            headers.append(msgs.fixed_header(services.strategy_header, plan.header_value))
            endpoints = ",".join(route.endpoints)
            if services.picker:
                headers.append(msgs.fixed_header(DESTINATION_ENDPOINT, endpoints.encode()))
                metadata = msgs.lb_metadata(DESTINATION_ENDPOINT, endpoints)
            else:
                headers.append(msgs.fixed_header(TARGET_POD, pod.address.encode()))
                if services.destination_endpoint_header:
                    headers.append(msgs.fixed_header(DESTINATION_ENDPOINT, endpoints.encode()))
                if self._skip_response:
                    # No response phase to name the pod to the client: Envoy copies this header.
                    headers.append(msgs.fixed_header(POD_NAME, pod.name.encode()))
        self.state = State.ROUTED
        if self._skip_response:
            self._status = UNOBSERVED
        # The whole body is still ours to change only when Envoy sent it in one message, or
        # when this exchange hands it back itself (full duplex).
        rewritable = self._duplex or (not self._hold_headers and self._chunks_seen <= 1)
        sent = ticket.ask_pod_for_usage(body) if rewritable and not self._skip_response else None
        if sent is not None:
            headers.append(msgs.header(CONTENT_LENGTH, str(len(sent)).encode()))
        mutation = msgs.mutation(headers, self._strip)
        if not self._hold_headers:
            return (
                msgs.request_body(mutation, clear_route_cache=True, metadata=metadata, body=sent),
            )
        responses = [msgs.request_headers(mutation, clear_route_cache=True, metadata=metadata)]
        if self._duplex:
            outgoing = body if sent is None else sent
            responses.extend(msgs.streamed_request_body(outgoing, end_of_stream=not trailers))
        else:
            responses.extend([msgs.CONTINUE_REQUEST_BODY] * (self._held_chunks + (not trailers)))
        if trailers:
            responses.append(msgs.CONTINUE_REQUEST_TRAILERS)
        return responses

    async def _extend_timeout(self, hold_seconds: float) -> None:
        if self._interim is not None:
            await self._interim(msgs.extend_timeout(hold_seconds + HOLD_MARGIN))

    # -- response ------------------------------------------------------------------------------

    def _on_response_headers(self, request: ProcessingRequest) -> Sequence[ProcessingResponse]:
        if self.state is State.HEADERS:
            raise ProtocolViolation("response_headers received before request_headers")
        for entry in request.response_headers.headers.headers:
            if entry.key == ":status":
                self._status = value(entry)
                break
        if self.state is State.BODY:
            # Envoy answered the client itself before the body was in (a chunked body over
            # its buffer limit gets its own 413): let that reply through.
            self.state = State.DONE
            return (msgs.CONTINUE_RESPONSE_HEADERS,)
        details = _attribute(request, CODE_DETAILS)
        if details:
            self._upstream = details == FROM_UPSTREAM
        ticket = self._ticket
        if self.state is not State.ROUTED or ticket is None:
            return (msgs.CONTINUE_RESPONSE_HEADERS,)
        served = _metadata_string(request, msgs.LB_NAMESPACE, SERVED_ENDPOINT)
        if served:
            ticket.served_by(served)
        route = ticket.route_result
        headers = [msgs.header(REQUEST_ID, self.request_id.encode())]
        if route is not None and route.pod is not None and route.plan is not None:
            headers.append(msgs.fixed_header(TARGET_POD, route.pod.name.encode()))
            headers.append(
                msgs.fixed_header(self._services.strategy_header, route.plan.header_value)
            )
        if ticket.response_started(self._status) and not self._echo_response:
            return (msgs.response_headers(msgs.mutation(headers), msgs.STREAM_RESPONSE_BODY),)
        return (msgs.response_headers(msgs.mutation(headers)),)

    def _on_response_body(self, message: HttpBody) -> Sequence[ProcessingResponse]:
        replaced = None
        if self.state is State.ROUTED and self._ticket is not None:
            replaced = self._ticket.feed(message.body, message.end_of_stream)
        if self._echo_response:
            body = message.body if replaced is None else replaced
            return (msgs.streamed_response_body(body, message.end_of_stream),)
        if replaced is not None:
            return (msgs.replaced_response_body(replaced),)
        return (msgs.CONTINUE_RESPONSE_BODY,)

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

    def close(self, status: str | None = None) -> None:
        """Release the request. Idempotent. ``status`` overrides what the stream showed (a
        stream cut by the drain)."""
        ticket = self._ticket
        if ticket is not None:
            ticket.release(Outcome(status or self._status or CANCELLED, self._upstream))


CODE_DETAILS = "response.code_details"
"""Envoy's attribute saying where a response came from (sent when the filter lists it in
``response_attributes``): ``via_upstream`` from the pod, anything else from Envoy itself
(``upstream_reset_before_response_started{connection_failure}``, ...)."""
FROM_UPSTREAM = "via_upstream"
SUBSET_NAMESPACE = "envoy.lb.subset_hint"
SUBSET_KEY = "x-gateway-destination-endpoint-subset"
SERVED_ENDPOINT = "x-gateway-destination-endpoint-served"


def _subset_hint(request: ProcessingRequest) -> frozenset[str] | None:
    """The endpoints the gateway allows (a list, or one comma-separated string); ``None``
    when it sent no hint."""
    namespace = request.metadata_context.filter_metadata.get(SUBSET_NAMESPACE)
    if namespace is None or SUBSET_KEY not in namespace.fields:
        return None
    hint = namespace.fields[SUBSET_KEY]
    kind = hint.WhichOneof("kind")
    if kind == "list_value":
        items = [v.string_value for v in hint.list_value.values]
    elif kind == "string_value":
        items = hint.string_value.split(",")
    else:
        items = []
    return frozenset(item.strip() for item in items if item.strip())


def _metadata_string(request: ProcessingRequest, namespace: str, key: str) -> str:
    struct = request.metadata_context.filter_metadata.get(namespace)
    if struct is None or key not in struct.fields:
        return ""
    served: str = struct.fields[key].string_value
    return served.partition(",")[0].strip()


def _attribute(request: ProcessingRequest, name: str) -> str:
    for struct in request.attributes.values():
        if name in struct.fields:
            found: str = struct.fields[name].string_value
            return found
    return ""
