"""Building the messages Envoy sends, for tests that speak ext_proc without an Envoy."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from typing import Any

import grpc
from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue, Metadata
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3.external_processor_pb2 import (
    HttpBody,
    HttpHeaders,
    HttpTrailers,
    ProcessingRequest,
    ProcessingResponse,
    ProtocolConfiguration,
)
from envoy.service.ext_proc.v3.external_processor_pb2_grpc import ExternalProcessorStub
from google.protobuf.struct_pb2 import Struct

BodyMode = ProcessingMode.BodySendMode


def request_headers(
    path: str = "/v1/chat/completions",
    method: str = "POST",
    headers: dict[str, str] | None = None,
    end_of_stream: bool = False,
    body_mode: int = ProcessingMode.BUFFERED,
    send_without_waiting: bool = False,
    response_body_mode: int = ProcessingMode.NONE,
    metadata: dict[str, dict[str, Any]] | None = None,
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
            response_body_mode=response_body_mode,  # type: ignore[arg-type]
            send_body_without_waiting_for_header_response=send_without_waiting,
        ),
        metadata_context=filter_metadata(metadata or {}),
    )


def filter_metadata(namespaces: dict[str, dict[str, Any]]) -> Metadata:
    """``{namespace: {key: value}}`` as Envoy's filter metadata."""
    metadata = Metadata()
    for namespace, fields in namespaces.items():
        struct = Struct()
        struct.update(fields)
        metadata.filter_metadata[namespace].CopyFrom(struct)
    return metadata


def response_body(body: bytes, end_of_stream: bool = False) -> ProcessingRequest:
    return ProcessingRequest(response_body=HttpBody(body=body, end_of_stream=end_of_stream))


def response_trailers() -> ProcessingRequest:
    return ProcessingRequest(response_trailers=HttpTrailers())


def request_body(body: bytes, end_of_stream: bool = True) -> ProcessingRequest:
    return ProcessingRequest(request_body=HttpBody(body=body, end_of_stream=end_of_stream))


def request_trailers() -> ProcessingRequest:
    return ProcessingRequest(request_trailers=HttpTrailers())


def response_headers(
    status: int = 200, metadata: dict[str, dict[str, Any]] | None = None
) -> ProcessingRequest:
    return ProcessingRequest(
        response_headers=HttpHeaders(
            headers=HeaderMap(headers=[HeaderValue(key=":status", raw_value=str(status).encode())])
        ),
        metadata_context=filter_metadata(metadata or {}),
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


class Stream:
    """One ext_proc stream driven by hand over a real gRPC channel: send, read the answers."""

    def __init__(self, port: int, credentials: grpc.ChannelCredentials | None = None) -> None:
        target = f"127.0.0.1:{port}"
        self.channel = (
            grpc.aio.insecure_channel(target)
            if credentials is None
            else grpc.aio.secure_channel(target, credentials)
        )
        self.queue: asyncio.Queue[ProcessingRequest | None] = asyncio.Queue()
        self.answers: asyncio.Queue[ProcessingResponse] = asyncio.Queue()
        stub = ExternalProcessorStub(self.channel)
        self.call = stub.Process(self._requests())
        self.reader = asyncio.ensure_future(self._read_all())

    async def _requests(self) -> AsyncIterator[ProcessingRequest]:
        while (item := await self.queue.get()) is not None:
            yield item

    async def _read_all(self) -> None:
        async for answer in self.call:
            await self.answers.put(answer)

    async def send(self, *messages: ProcessingRequest) -> None:
        for message in messages:
            await self.queue.put(message)

    async def read(self, count: int = 1, timeout: float = 5.0) -> list[ProcessingResponse]:
        return [await asyncio.wait_for(self.answers.get(), timeout) for _ in range(count)]

    async def close(self) -> None:
        await self.queue.put(None)
        self.reader.cancel()
        await self.channel.close()
