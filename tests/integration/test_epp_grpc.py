"""Endpoint-picker mode straight over gRPC: the destination in the header and in ``envoy.lb``
metadata alike, fallback lists, the subset hint (503 when empty), the served endpoint read back,
bodies re-streamed in chunks and echoed, and the health services gateways probe."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import orjson
import pytest
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc.app import Server
from tests import envoy_protocol as ep
from tests.envoy_protocol import Stream
from tests.helpers import eventually, in_flight

DUPLEX = ProcessingMode.FULL_DUPLEX_STREAMED
PODS = [
    {"name": "pod-a", "address": "127.0.0.1:18001", "model": "pool"},
    {"name": "pod-b", "address": "127.0.0.1:18002", "model": "pool"},
    {"name": "pod-c", "address": "127.0.0.1:18003", "model": "pool"},
]
SUBSET = "envoy.lb.subset_hint"
SUBSET_KEY = "x-gateway-destination-endpoint-subset"


def chat(model: str = "any-model-the-client-names", content: str = "hello") -> bytes:
    return orjson.dumps({"model": model, "messages": [{"role": "user", "content": content}]})


@pytest.fixture
async def picker(make_server: Callable[..., Any]) -> AsyncIterator[Callable[..., Any]]:
    streams: list[Stream] = []

    async def start(**flags: Any) -> tuple[Server, Callable[[], Stream]]:
        server = await make_server(pods=PODS, mode="epp", **flags)

        def stream() -> Stream:
            streams.append(Stream(server.grpc_port))
            return streams[-1]

        return server, stream

    yield start
    for stream in streams:
        await stream.close()


def headers_of(stream_answers: list[Any]) -> dict[str, str]:
    return ep.set_headers(stream_answers[0])


def lb_metadata(answer: Any) -> str:
    value: str = (
        answer.dynamic_metadata.fields["envoy.lb"]
        .struct_value.fields["x-gateway-destination-endpoint"]
        .string_value
    )
    return value


async def route(
    stream: Stream, body: bytes, metadata: dict[str, dict[str, Any]] | None = None, **headers: str
) -> list[Any]:
    await stream.send(
        ep.request_headers(
            headers=headers,
            body_mode=DUPLEX,
            response_body_mode=DUPLEX,
            metadata=metadata,
        ),
        ep.request_body(body[: len(body) // 2], end_of_stream=False),
        ep.request_body(body[len(body) // 2 :], end_of_stream=True),
    )
    return await stream.read(2)


async def test_the_destination_goes_in_the_header_and_the_metadata_alike(picker) -> None:
    server, stream = await picker(fallback_endpoints="1")
    answers = await route(stream(), chat())
    assert ep.kinds(answers) == ["request_headers", "request_body"]
    headers = headers_of(answers)
    endpoints = headers["x-gateway-destination-endpoint"].split(",")
    assert len(endpoints) == 2 and len(set(endpoints)) == 2  # the pick and one fallback
    assert set(endpoints) <= {p["address"] for p in PODS}
    assert lb_metadata(answers[0]) == headers["x-gateway-destination-endpoint"]
    assert "target-pod" not in headers
    streamed = answers[1].request_body.response.body_mutation.streamed_response
    assert streamed.body == chat() and streamed.end_of_stream
    assert in_flight(server) == 1


async def test_every_model_name_is_served_by_the_pool(picker) -> None:
    _, stream = await picker()
    for model in ("pool", "llama", "whatever/the-gateway-sent"):
        answers = await route(stream(), chat(model))
        assert "x-gateway-destination-endpoint" in headers_of(answers)


async def test_no_fallbacks_by_default(picker) -> None:
    _, stream = await picker()
    answers = await route(stream(), chat())
    assert "," not in headers_of(answers)["x-gateway-destination-endpoint"]


async def test_the_subset_hint_restricts_the_choice(picker) -> None:
    _, stream = await picker(fallback_endpoints="2")
    for hint in (["127.0.0.1:18002"], "127.0.0.1:18002"):
        answers = await route(stream(), chat(), metadata={SUBSET: {SUBSET_KEY: hint}})
        assert headers_of(answers)["x-gateway-destination-endpoint"] == "127.0.0.1:18002"
        assert lb_metadata(answers[0]) == "127.0.0.1:18002"
    answers = await route(
        stream(),
        chat(),
        metadata={SUBSET: {SUBSET_KEY: ["127.0.0.1:18001", "127.0.0.1:18003"]}},
    )
    assert set(headers_of(answers)["x-gateway-destination-endpoint"].split(",")) == {
        "127.0.0.1:18001",
        "127.0.0.1:18003",
    }


@pytest.mark.parametrize("hint", [[], ["10.9.9.9:8000"]])
async def test_an_empty_or_foreign_subset_is_a_503(picker, hint: list[str]) -> None:
    server, stream = await picker()
    one = stream()
    await one.send(
        ep.request_headers(body_mode=DUPLEX, metadata={SUBSET: {SUBSET_KEY: hint}}),
        ep.request_body(chat(), end_of_stream=True),
    )
    (answer,) = await one.read()
    assert answer.immediate_response.status.code == 503
    assert orjson.loads(answer.immediate_response.body)["error"]["code"] == "no_ready_endpoint"
    assert in_flight(server) == 0


async def test_the_served_endpoint_takes_the_accounting(picker) -> None:
    server, stream = await picker(fallback_endpoints="2")
    one = stream()
    answers = await route(one, chat(), metadata={SUBSET: {SUBSET_KEY: ["127.0.0.1:18001"]}})
    assert headers_of(answers)["x-gateway-destination-endpoint"] == "127.0.0.1:18001"
    counters = server.accounting.counters
    assert counters("pod-a").in_flight == 1
    # the gateway says pod-c served it (it tried the next endpoint)
    served = {"envoy.lb": {"x-gateway-destination-endpoint-served": "127.0.0.1:18003"}}
    await one.send(ep.response_headers(200, metadata=served))
    (answer,) = await one.read()
    assert answer.response_headers.response.header_mutation.set_headers[1].header.key == (
        "target-pod"
    )
    assert ep.set_headers(answer)["target-pod"] == "pod-c"
    assert (counters("pod-a").in_flight, counters("pod-c").in_flight) == (0, 1)
    await one.send(ep.response_body(b"data: [DONE]\n\n", end_of_stream=True))
    await one.read()
    await one.close()
    await eventually(lambda: in_flight(server) == 0)


async def test_big_bodies_are_restreamed_in_chunks_and_responses_echoed(picker) -> None:
    _, stream = await picker()
    one = stream()
    body = chat(content="x" * 1_000_000)
    await one.send(ep.request_headers(body_mode=DUPLEX, response_body_mode=DUPLEX))
    for start in range(0, len(body), 300_000):
        end = start + 300_000 >= len(body)
        await one.send(ep.request_body(body[start : start + 300_000], end_of_stream=end))
    headers_answer, *rest = await one.read(1 + -(-len(body) // 62_000))
    assert "x-gateway-destination-endpoint" in ep.set_headers(headers_answer)
    chunks = [r.request_body.response.body_mutation.streamed_response for r in rest]
    assert all(len(c.body) <= 62_000 for c in chunks)
    assert b"".join(c.body for c in chunks) == body
    assert [c.end_of_stream for c in chunks] == [False] * (len(chunks) - 1) + [True]
    await one.send(ep.response_headers(200))
    await one.read()
    reply = [b"data: {}\n\n" * 1000, b"x" * 70_000, b"data: [DONE]\n\n"]
    for i, chunk in enumerate(reply):
        await one.send(ep.response_body(chunk, end_of_stream=i == len(reply) - 1))
    echoed = [a.response_body.response.body_mutation.streamed_response for a in await one.read(3)]
    assert [e.body for e in echoed] == reply
    assert [e.end_of_stream for e in echoed] == [False, False, True]
    await one.send(ep.response_trailers())
    assert ep.kinds(await one.read()) == ["response_trailers"]


async def test_the_health_services_gateways_probe(picker) -> None:
    server, _ = await picker()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("liveness", "readiness", "envoy.service.ext_proc.v3.ExternalProcessor"):
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service


async def test_strategies_and_tls_work_in_picker_mode(make_server) -> None:
    server = await make_server(pods=PODS, mode="epp", tls_self_signed="true")
    # Gateways do not verify this certificate; the test trusts what the server presents.
    pem = ssl.get_server_certificate(("127.0.0.1", server.grpc_port)).encode()
    stream = Stream(server.grpc_port, grpc.ssl_channel_credentials(root_certificates=pem))
    try:
        for strategy in ("random", "least-request", "prefix-cache", "least-kv-cache", "vtc-basic"):
            answers = await route(stream, chat(), **{"routing-strategy": strategy})
            assert ep.set_headers(answers[0])["routing-strategy"] == strategy
            await stream.close()
            stream = Stream(server.grpc_port, grpc.ssl_channel_credentials(root_certificates=pem))
    finally:
        await stream.close()
