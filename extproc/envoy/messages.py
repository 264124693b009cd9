"""Builders for the ext_proc ``ProcessingResponse`` messages the server sends back to Envoy.

Responses that never vary are built once at import; the hot path only builds what carries
per-request values.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3.external_processor_pb2 import (
    BodyMutation,
    BodyResponse,
    CommonResponse,
    HeaderMutation,
    HeadersResponse,
    ImmediateResponse,
    ProcessingResponse,
    StreamedBodyResponse,
    TrailersResponse,
)
from envoy.type.v3.http_status_pb2 import HttpStatus
from google.protobuf.duration_pb2 import Duration
from google.protobuf.struct_pb2 import Struct

from extproc.errors import GatewayError

OVERWRITE = HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
BodyMode = ProcessingMode.BodySendMode

CONTINUE_REQUEST_HEADERS = ProcessingResponse(request_headers=HeadersResponse())
CONTINUE_REQUEST_BODY = ProcessingResponse(request_body=BodyResponse())
CONTINUE_RESPONSE_HEADERS = ProcessingResponse(response_headers=HeadersResponse())
CONTINUE_RESPONSE_BODY = ProcessingResponse(response_body=BodyResponse())
CONTINUE_REQUEST_TRAILERS = ProcessingResponse(request_trailers=TrailersResponse())
CONTINUE_RESPONSE_TRAILERS = ProcessingResponse(response_trailers=TrailersResponse())

SKIP_BODY_AND_RESPONSE = ProcessingMode(
    request_body_mode=ProcessingMode.NONE,
    response_header_mode=ProcessingMode.SKIP,
    response_body_mode=ProcessingMode.NONE,
)
"""Mode override for requests the server does not route: nothing more to look at."""

STREAM_RESPONSE_BODY = ProcessingMode(response_body_mode=ProcessingMode.STREAMED)
"""Mode override asking for the response body, for requests whose token usage is needed."""

CONTINUE_SKIP_RESPONSE = {
    mode: ProcessingResponse(
        request_headers=HeadersResponse(),
        mode_override=ProcessingMode(
            request_body_mode=mode,
            response_header_mode=ProcessingMode.SKIP,
            response_body_mode=ProcessingMode.NONE,
        ),
    )
    for mode in (ProcessingMode.BUFFERED, ProcessingMode.STREAMED, ProcessingMode.BUFFERED_PARTIAL)
}
"""Headers answers for a request that needs nothing from its response (``response_phase:
when-needed``): one round trip less. An override replaces the whole mode, so the body mode Envoy
announced is restated; keyed by it."""


JSON_CONTENT_TYPE = HeaderValueOption(
    header=HeaderValue(key="content-type", raw_value=b"application/json"),
    append_action=OVERWRITE,
)


def header(key: str, value: bytes) -> HeaderValueOption:
    """A header that replaces any value the client sent."""
    return HeaderValueOption(header=HeaderValue(key=key, raw_value=value), append_action=OVERWRITE)


@lru_cache(maxsize=4096)
def fixed_header(key: str, value: bytes) -> HeaderValueOption:
    """``header`` for values that recur (a pod's address, a model, a strategy): built once.

    The returned message is shared: callers only add it to a new mutation, which copies it.
    """
    return header(key, value)


def mutation(headers: Iterable[HeaderValueOption], remove: Iterable[str] = ()) -> HeaderMutation:
    return HeaderMutation(set_headers=headers, remove_headers=remove)


def request_headers(
    header_mutation: HeaderMutation | None = None,
    clear_route_cache: bool = False,
    mode: ProcessingMode | None = None,
    metadata: Struct | None = None,
) -> ProcessingResponse:
    return ProcessingResponse(
        request_headers=HeadersResponse(
            response=CommonResponse(
                header_mutation=header_mutation, clear_route_cache=clear_route_cache
            )
        ),
        mode_override=mode,
        dynamic_metadata=metadata,
    )


def request_body(
    header_mutation: HeaderMutation | None = None,
    clear_route_cache: bool = False,
    metadata: Struct | None = None,
    body: bytes | None = None,
) -> ProcessingResponse:
    """The answer to a buffered body; ``body`` replaces it."""
    return ProcessingResponse(
        request_body=BodyResponse(
            response=CommonResponse(
                header_mutation=header_mutation,
                clear_route_cache=clear_route_cache,
                body_mutation=None if body is None else BodyMutation(body=body),
            )
        ),
        dynamic_metadata=metadata,
    )


LB_NAMESPACE = "envoy.lb"


def lb_metadata(key: str, value: str) -> Struct:
    """Dynamic metadata ``envoy.lb: {key: value}`` (what override_host load balancing reads)."""
    metadata = Struct()
    metadata.get_or_create_struct(LB_NAMESPACE)[key] = value
    return metadata


STREAMED_CHUNK_BYTES = 62_000
"""The largest body chunk handed back to Envoy in one message (what endpoint pickers use, so a
gateway never has to split or buffer one)."""


def streamed_request_body(body: bytes, end_of_stream: bool) -> list[ProcessingResponse]:
    """In FULL_DUPLEX_STREAMED mode the server hands the body back to Envoy itself, in chunks
    of at most ``STREAMED_CHUNK_BYTES``."""
    if len(body) <= STREAMED_CHUNK_BYTES:
        return [_streamed_request(body, end_of_stream)]
    view = memoryview(body)
    last = len(body) - 1
    return [
        _streamed_request(
            bytes(view[start : start + STREAMED_CHUNK_BYTES]),
            end_of_stream and start + STREAMED_CHUNK_BYTES > last,
        )
        for start in range(0, len(body), STREAMED_CHUNK_BYTES)
    ]


def _streamed_request(body: bytes, end_of_stream: bool) -> ProcessingResponse:
    return ProcessingResponse(
        request_body=BodyResponse(
            response=CommonResponse(
                body_mutation=BodyMutation(
                    streamed_response=StreamedBodyResponse(body=body, end_of_stream=end_of_stream)
                )
            )
        )
    )


def streamed_response_body(body: bytes, end_of_stream: bool) -> ProcessingResponse:
    """A response body chunk handed back in FULL_DUPLEX_STREAMED mode."""
    return ProcessingResponse(
        response_body=BodyResponse(
            response=CommonResponse(
                body_mutation=BodyMutation(
                    streamed_response=StreamedBodyResponse(body=body, end_of_stream=end_of_stream)
                )
            )
        )
    )


def replaced_response_body(body: bytes) -> ProcessingResponse:
    """A response body chunk replaced in STREAMED mode."""
    return ProcessingResponse(
        response_body=BodyResponse(response=CommonResponse(body_mutation=BodyMutation(body=body)))
    )


def response_headers(
    header_mutation: HeaderMutation, mode: ProcessingMode | None = None
) -> ProcessingResponse:
    return ProcessingResponse(
        response_headers=HeadersResponse(response=CommonResponse(header_mutation=header_mutation)),
        mode_override=mode,
    )


def extend_timeout(seconds: float) -> ProcessingResponse:
    """Ask Envoy to wait up to ``seconds`` for the answer it is waiting for (up to the
    filter's ``max_message_timeout``): sent before a request is held for a model's first pod."""
    timeout = Duration()
    timeout.FromNanoseconds(int(seconds * 1e9))
    return ProcessingResponse(override_message_timeout=timeout)


def immediate(
    status: int, body: bytes, headers: Iterable[HeaderValueOption] = (), details: str = ""
) -> ProcessingResponse:
    return ProcessingResponse(
        immediate_response=ImmediateResponse(
            status=HttpStatus(code=status),
            headers=HeaderMutation(set_headers=[JSON_CONTENT_TYPE, *headers]),
            body=body,
            details=details,
        )
    )


def error(err: GatewayError, request_id: str) -> ProcessingResponse:
    """An OpenAI-shaped JSON error as an ImmediateResponse (with Retry-After when set)."""
    extra = [header("x-request-id", request_id.encode())]
    if err.retry_after is not None:
        extra.append(header("retry-after", str(err.retry_after).encode()))
    if err.allow is not None:
        extra.append(header("allow", err.allow.encode()))
    return immediate(err.status, err.body(), extra, details=f"extproc_{err.code}")
