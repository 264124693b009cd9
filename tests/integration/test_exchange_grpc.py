"""The per-request state machine over a real gRPC channel, in every body mode Envoy offers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import orjson
import pytest
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingRequest
from envoy.service.ext_proc.v3.external_processor_pb2_grpc import ExternalProcessorStub

from extproc.app import Server
from tests import envoy_protocol as ep
from tests.envoy_protocol import Stream
from tests.helpers import eventually, in_flight

CHAT = orjson.dumps({"model": "m1", "messages": [{"role": "user", "content": "hello"}]})


@pytest.fixture
async def stream_to(make_server: Callable[..., Any]) -> AsyncIterator[Callable[..., Any]]:
    streams: list[Stream] = []

    def open_stream(server: Server) -> Stream:
        stream = Stream(server.grpc_port)
        streams.append(stream)
        return stream

    yield open_stream
    for stream in streams:
        await stream.close()


async def test_buffered_request_is_routed_in_the_body_answer(make_server, stream_to) -> None:
    server = await make_server()
    stream = stream_to(server)
    await stream.send(
        ep.request_headers(headers={"routing-strategy": "least-request", "x-request-id": "rid-1"})
    )
    (answer,) = await stream.read()
    assert ep.kinds([answer]) == ["request_headers"]
    assert ep.set_headers(answer) == {}

    await stream.send(ep.request_body(CHAT))
    (routed,) = await stream.read()
    assert ep.kinds([routed]) == ["request_body"]
    assert routed.request_body.response.clear_route_cache
    headers = ep.set_headers(routed)
    assert headers["target-pod"] in ("127.0.0.1:18001", "127.0.0.1:18002")
    assert headers["routing-strategy"] == "least-request"
    assert headers["model"] == "m1"
    assert headers["x-request-id"] == "rid-1"
    assert "x-gateway-destination-endpoint" not in headers
    assert in_flight(server) == 1

    await stream.send(ep.response_headers(200))
    (response,) = await stream.read()
    back = ep.set_headers(response)
    assert back["x-request-id"] == "rid-1"
    assert back["target-pod"] in ("pod-a", "pod-b")
    assert back["routing-strategy"] == "least-request"
    assert not response.HasField("mode_override")

    await stream.close()
    await eventually(lambda: in_flight(server) == 0)


async def test_least_request_spreads_concurrent_requests(make_server, stream_to) -> None:
    server = await make_server()
    targets = []
    for _ in range(4):
        stream = stream_to(server)
        await stream.send(ep.request_headers(headers={"routing-strategy": "least-request"}))
        await stream.read()
        await stream.send(ep.request_body(CHAT))
        (routed,) = await stream.read()
        targets.append(ep.set_headers(routed)["target-pod"])
    assert sorted(targets) == ["127.0.0.1:18001"] * 2 + ["127.0.0.1:18002"] * 2
    assert in_flight(server) == 4


async def test_client_supplied_target_is_stripped(make_server, stream_to) -> None:
    server = await make_server()
    stream = stream_to(server)
    await stream.send(ep.request_headers(headers={"target-pod": "10.9.9.9:22"}))
    (answer,) = await stream.read()
    assert ep.removed_headers(answer) == ["target-pod"]
    assert answer.request_headers.response.clear_route_cache
    await stream.send(ep.request_body(CHAT))
    (routed,) = await stream.read()
    # No strategy and no default: route by model only.
    assert ep.set_headers(routed) == {
        "model": "m1",
        "x-request-id": ep.set_headers(routed)["x-request-id"],
    }
    assert "target-pod" in ep.removed_headers(routed)


async def test_default_strategy_and_destination_endpoint_header(make_server, stream_to) -> None:
    server = await make_server(
        routing_strategy="random", destination_endpoint_header=True, fallback_endpoints=1
    )
    stream = stream_to(server)
    await stream.send(ep.request_headers())
    await stream.read()
    await stream.send(ep.request_body(CHAT))
    (routed,) = await stream.read()
    headers = ep.set_headers(routed)
    assert headers["routing-strategy"] == "random"
    # the chosen pod first, then the next best (fallback_endpoints: 1)
    endpoints = headers["x-gateway-destination-endpoint"].split(",")
    assert endpoints[0] == headers["target-pod"]
    assert sorted(endpoints) == ["127.0.0.1:18001", "127.0.0.1:18002"]


async def test_generated_request_id(make_server, stream_to) -> None:
    server = await make_server()
    stream = stream_to(server)
    await stream.send(ep.request_headers(headers={"routing-strategy": "random"}))
    await stream.read()
    await stream.send(ep.request_body(CHAT))
    (routed,) = await stream.read()
    assert len(ep.set_headers(routed)["x-request-id"]) == 32


async def test_full_duplex_holds_headers_and_returns_the_body(make_server, stream_to) -> None:
    server = await make_server()
    stream = stream_to(server)
    await stream.send(
        ep.request_headers(
            headers={"routing-strategy": "random"}, body_mode=ProcessingMode.FULL_DUPLEX_STREAMED
        )
    )
    chunks = [CHAT[:10], CHAT[10:20], CHAT[20:]]
    await stream.send(ep.request_body(chunks[0], end_of_stream=False))
    await stream.send(ep.request_body(chunks[1], end_of_stream=False))
    await stream.send(ep.request_body(chunks[2], end_of_stream=True))
    # The first answer is the headers answer and it carries the route: it was held until the
    # last chunk (an early answer could not have known the pod).
    headers_answer, body_answer = await stream.read(2)
    assert ep.kinds([headers_answer, body_answer]) == ["request_headers", "request_body"]
    assert "target-pod" in ep.set_headers(headers_answer)
    assert headers_answer.request_headers.response.clear_route_cache
    streamed = body_answer.request_body.response.body_mutation.streamed_response
    assert streamed.body == CHAT and streamed.end_of_stream


async def test_full_duplex_ending_with_trailers(make_server, stream_to) -> None:
    server = await make_server()
    stream = stream_to(server)
    await stream.send(
        ep.request_headers(
            headers={"routing-strategy": "random"}, body_mode=ProcessingMode.FULL_DUPLEX_STREAMED
        )
    )
    await stream.send(ep.request_body(CHAT, end_of_stream=False))
    await stream.send(ep.request_trailers())
    answers = await stream.read(3)
    assert ep.kinds(answers) == ["request_headers", "request_body", "request_trailers"]
    streamed = answers[1].request_body.response.body_mutation.streamed_response
    assert streamed.body == CHAT and not streamed.end_of_stream


async def test_streamed_without_waiting_holds_every_answer(make_server, stream_to) -> None:
    server = await make_server()
    stream = stream_to(server)
    await stream.send(
        ep.request_headers(
            headers={"routing-strategy": "random"},
            body_mode=ProcessingMode.STREAMED,
            send_without_waiting=True,
        )
    )
    await stream.send(ep.request_body(CHAT[:5], end_of_stream=False))
    await stream.send(ep.request_body(CHAT[5:], end_of_stream=True))
    answers = await stream.read(3)
    assert ep.kinds(answers) == ["request_headers", "request_body", "request_body"]
    assert "target-pod" in ep.set_headers(answers[0])  # held until the route was known


async def test_streamed_chunks_answered_one_by_one(make_server, stream_to) -> None:
    server = await make_server()
    stream = stream_to(server)
    await stream.send(
        ep.request_headers(
            headers={"routing-strategy": "random"}, body_mode=ProcessingMode.STREAMED
        )
    )
    assert ep.kinds(await stream.read()) == ["request_headers"]
    await stream.send(ep.request_body(CHAT[:5], end_of_stream=False))
    (first,) = await stream.read()
    assert ep.set_headers(first) == {}
    await stream.send(ep.request_body(CHAT[5:], end_of_stream=True))
    (last,) = await stream.read()
    assert "target-pod" in ep.set_headers(last)


async def expect_error(stream: Stream, status: int) -> dict[str, Any]:
    (answer,) = await stream.read()
    assert ep.kinds([answer]) == ["immediate_response"]
    immediate = answer.immediate_response
    assert immediate.status.code == status
    headers = ep.set_headers(answer)
    assert headers["content-type"] == "application/json"
    payload: dict[str, Any] = orjson.loads(immediate.body)
    assert set(payload["error"]) == {"message", "type", "code", "param"}
    payload["headers"] = headers
    return payload


async def test_error_rows(make_server, stream_to) -> None:
    server = await make_server(max_body_bytes="64", hold_timeout="200ms")

    stream = stream_to(server)
    await stream.send(ep.request_headers(headers={"routing-strategy": "fastest"}))
    error = await expect_error(stream, 400)
    assert "fastest" in error["error"]["message"] and "random" in error["error"]["message"]

    stream = stream_to(server)
    await stream.send(
        ep.request_headers(path="/v1/completions", headers={"routing-strategy": "random"})
    )
    await stream.read()
    await stream.send(ep.request_body(orjson.dumps({"model": "ghost", "prompt": "x"})))
    error = await expect_error(stream, 404)
    assert error["error"]["message"] == "The model ghost does not exist."
    assert error["error"]["code"] == "model_not_found"

    stream = stream_to(server)
    await stream.send(ep.request_headers(headers={"routing-strategy": "random"}))
    await stream.read()
    await stream.send(
        ep.request_body(
            orjson.dumps({"model": "m2", "messages": [{"role": "user", "content": "x"}]})
        )
    )
    # m2 is known but has no ready pod: held for its first pod (Envoy told to wait), then 503
    (extension,) = await stream.read()
    assert extension.HasField("override_message_timeout")
    error = await expect_error(stream, 503)
    assert error["headers"]["retry-after"] == "2"

    stream = stream_to(server)
    await stream.send(ep.request_headers(body_mode=ProcessingMode.STREAMED))
    await stream.read()
    await stream.send(ep.request_body(b"x" * 40, end_of_stream=False))
    await stream.read()
    await stream.send(ep.request_body(b"x" * 40, end_of_stream=False))
    error = await expect_error(stream, 413)
    assert error["error"]["code"] == "request_too_large"

    stream = stream_to(server)
    await stream.send(ep.request_headers(end_of_stream=True))
    error = await expect_error(stream, 400)

    stream = stream_to(server)
    await stream.send(ep.request_headers())
    await stream.read()
    await stream.send(ep.request_body(b"{"))
    error = await expect_error(stream, 400)
    assert error["error"]["code"] == "invalid_json"
    assert in_flight(server) == 0


async def test_models_list_is_answered_by_the_server(make_server, stream_to) -> None:
    server = await make_server()
    stream = stream_to(server)
    await stream.send(ep.request_headers(path="/v1/models", method="GET", end_of_stream=True))
    (answer,) = await stream.read()
    assert answer.immediate_response.status.code == 200
    listing = orjson.loads(answer.immediate_response.body)
    assert listing["object"] == "list"
    entries = {m["id"]: m for m in listing["data"]}
    assert set(entries) == {"m1", "m1-lora", "m2"}
    assert entries["m1-lora"]["parent"] == "m1"
    assert entries["m1"]["object"] == "model"


async def test_other_paths_pass_through_untouched(make_server, stream_to) -> None:
    server = await make_server()
    stream = stream_to(server)
    await stream.send(ep.request_headers(path="/health", method="GET", end_of_stream=True))
    (answer,) = await stream.read()
    assert ep.kinds([answer]) == ["request_headers"]
    assert ep.set_headers(answer) == {}
    mode = answer.mode_override
    assert mode.request_body_mode == ProcessingMode.NONE
    assert mode.response_header_mode == ProcessingMode.SKIP


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])
async def test_wrong_methods_on_inference_paths_are_405_json(
    make_server, stream_to, method: str
) -> None:
    server = await make_server()
    stream = stream_to(server)
    await stream.send(ep.request_headers(path="/v1/chat/completions", method=method))
    (answer,) = await stream.read()
    reply = answer.immediate_response
    assert reply.status.code == 405
    assert ep.set_headers(answer)["allow"] == "POST"
    assert orjson.loads(reply.body)["error"]["code"] == "method_not_allowed"


@pytest.mark.parametrize(
    ("path", "status"),
    [("/v1/chat/completions/extra", 404), ("/v1/completions/", 404), ("/v1/models/nope", 404)],
)
async def test_sub_paths_of_inference_paths_are_404_json(
    make_server, stream_to, path: str, status: int
) -> None:
    server = await make_server()
    stream = stream_to(server)
    method = "GET" if path.startswith("/v1/models") else "POST"
    await stream.send(ep.request_headers(path=path, method=method))
    (answer,) = await stream.read()
    assert answer.immediate_response.status.code == status
    assert orjson.loads(answer.immediate_response.body)["error"]["code"] in (
        "not_found",
        "model_not_found",
    )


async def test_one_model_is_listed_by_its_path(make_server, stream_to) -> None:
    server = await make_server()
    stream = stream_to(server)
    await stream.send(ep.request_headers(path="/v1/models/m1-lora", method="GET"))
    (answer,) = await stream.read()
    assert orjson.loads(answer.immediate_response.body) | {"created": 0} == {
        "id": "m1-lora",
        "object": "model",
        "created": 0,
        "owned_by": "extproc",
        "parent": "m1",
    }


async def test_cancelled_calls_and_shutdown_release_everything(make_server) -> None:
    server = await make_server()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    stub = ExternalProcessorStub(channel)
    calls = []
    for _ in range(10):
        queue: asyncio.Queue[ProcessingRequest] = asyncio.Queue()

        async def requests(q: asyncio.Queue[ProcessingRequest] = queue) -> AsyncIterator[Any]:
            while True:
                yield await q.get()

        call = stub.Process(requests())
        await queue.put(ep.request_headers(headers={"routing-strategy": "random"}))
        await call.read()
        await queue.put(ep.request_body(CHAT))
        await call.read()
        calls.append(call)
    assert in_flight(server) == 10
    for call in calls[:5]:
        call.cancel()
    await eventually(lambda: in_flight(server) == 5)
    await server.stop(grace=0.1)
    assert in_flight(server) == 0
    await channel.close()
