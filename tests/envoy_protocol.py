"""Building the messages Envoy sends, for tests that speak ext_proc without an Envoy."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable

from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3.external_processor_pb2 import (
    HttpBody,
    HttpHeaders,
    HttpTrailers,
    ProcessingRequest,
    ProcessingResponse,
    ProtocolConfiguration,
)

BodyMode = ProcessingMode.BodySendMode


def request_headers(
    path: str = "/v1/chat/completions",
    method: str = "POST",
    headers: dict[str, str] | None = None,
    end_of_stream: bool = False,
    body_mode: int = ProcessingMode.BUFFERED,
    send_without_waiting: bool = False,
) -> ProcessingRequest:
    values = [
        HeaderValue(key=":path", raw_value=path.encode()),
        HeaderValue(key=":method", raw_value=method.encode()),
        HeaderValue(key=":authority", raw_value=b"gateway"),
    ]
    values += [HeaderValue(key=k, raw_value=v.encode()) for k, v in (headers or {}).items()]
    return ProcessingRequest(
        request_headers=HttpHeaders(headers=HeaderMap(headers=values), end_of_stream=end_of_stream),
        protocol_config=ProtocolConfiguration(
            request_body_mode=body_mode,  # type: ignore[arg-type]
            send_body_without_waiting_for_header_response=send_without_waiting,
        ),
    )


def request_body(body: bytes, end_of_stream: bool = True) -> ProcessingRequest:
    return ProcessingRequest(request_body=HttpBody(body=body, end_of_stream=end_of_stream))


def request_trailers() -> ProcessingRequest:
    return ProcessingRequest(request_trailers=HttpTrailers())


def response_headers(status: int = 200) -> ProcessingRequest:
    return ProcessingRequest(
        response_headers=HttpHeaders(
            headers=HeaderMap(headers=[HeaderValue(key=":status", raw_value=str(status).encode())])
        )
    )


def set_headers(response: ProcessingResponse) -> dict[str, str]:
    """The headers a response sets, wherever the response carries them."""
    kind = response.WhichOneof("response")
    if kind == "immediate_response":
        mutation = response.immediate_response.headers
    else:
        mutation = getattr(response, kind).response.header_mutation
    return {
        h.header.key: (h.header.raw_value or h.header.value.encode()).decode()
        for h in mutation.set_headers
    }


def removed_headers(response: ProcessingResponse) -> list[str]:
    kind = response.WhichOneof("response")
    return list(getattr(response, kind).response.header_mutation.remove_headers)


def kinds(responses: Iterable[ProcessingResponse]) -> list[str]:
    return [str(r.WhichOneof("response")) for r in responses]


async def run_stream(port: int, messages: list[ProcessingRequest]) -> list[ProcessingResponse]:
    """One ext_proc stream to the server on ``port`` that sends ``messages`` and ends."""
    import grpc
    from envoy.service.ext_proc.v3.external_processor_pb2_grpc import ExternalProcessorStub

    async def send() -> AsyncIterator[ProcessingRequest]:
        for message in messages:
            yield message

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        return [answer async for answer in ExternalProcessorStub(channel).Process(send())]
