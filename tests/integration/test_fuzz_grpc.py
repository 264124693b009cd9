"""Random ext_proc message sequences over a real gRPC channel to a real server process: valid and
invalid headers and bodies in any order, repeated, abandoned or cancelled streams. After every
stream nothing stays claimed (the pods' in-flight gauges are back at 0) and the user was charged
at most one request of RPM; afterwards the server still routes a normal request and has logged no
traceback.

Bounded and deterministic: ``derandomize`` makes the examples the same on every run."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import urllib.request
from collections.abc import Iterator

import grpc
import orjson
import pytest
from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingRequest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from extproc.devstack.stack import LocalStack, StackConfig
from tests import envoy_protocol as ep
from tests.envoy_protocol import Stream
from tests.helpers import eventually

CHAT = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hello"}]})
COMPLETION = orjson.dumps({"model": "m", "prompt": "hello", "max_tokens": 2, "stream": True})
ADMITTED = "extproc_ratelimit_decisions_total"


@pytest.fixture(scope="module")
def stack() -> Iterator[LocalStack]:
    config = StackConfig(
        pods=2,
        models=("m",),
        sim_defaults={"decode_time_base": 0.002},
        server_args=(
            "--unknown-user-policy",
            "default-limits",
            "--default-rpm",
            "1000000",
            "--hold-requests",
            "0",
        ),
    )
    with LocalStack(config) as running:
        yield running


def metric(stack: LocalStack, name: str, labels: str = "") -> float:
    with urllib.request.urlopen(stack.metrics_url, timeout=5) as response:
        text = response.read().decode()
    pattern = re.compile(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", re.M)
    return sum(float(value) for found, value in pattern.findall(text) if labels in found)


def valid_headers(strategy: str = "random") -> ProcessingRequest:
    return ep.request_headers(headers={"routing-strategy": strategy, "user": "fuzz"})


headers = st.builds(
    lambda path, method, strategy, user, eos: ep.request_headers(
        path=path,
        method=method,
        headers={
            **({"routing-strategy": strategy} if strategy else {}),
            **({"user": user} if user else {}),
        },
        end_of_stream=eos,
    ),
    path=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/models", "/x", ""]),
    method=st.sampled_from(["POST", "GET", "PUT"]),
    strategy=st.sampled_from(["", "random", "least-request", "prefix-cache", "nope", "a:b,c"]),
    user=st.sampled_from(["", "fuzz", "fuzz\u2028", "x" * 300]),
    eos=st.booleans(),
)
body = st.builds(
    ep.request_body,
    st.one_of(st.sampled_from([CHAT, COMPLETION, b"", b"{", b"[]"]), st.binary(max_size=64)),
    st.booleans(),
)
message = st.one_of(
    headers,
    body,
    st.just(ep.request_trailers()),
    st.builds(ep.response_headers, st.sampled_from([200, 500, 429])),
    st.builds(ep.response_body, st.binary(max_size=64), st.booleans()),
    st.just(ep.response_trailers()),
    st.just(ProcessingRequest()),
)
routed = st.builds(
    lambda strategy, payload: [valid_headers(strategy), ep.request_body(payload)],
    st.sampled_from(["random", "least-request", "prefix-cache"]),
    st.sampled_from([CHAT, COMPLETION]),
)
"""A whole request that routes (claims a pod, charges RPM): two of them on one stream is the
repeated-headers defect; random messages around them put them out of order."""
sequence = st.lists(st.one_of(routed, message.map(lambda one: [one])), max_size=5).map(
    lambda parts: [one for part in parts for one in part]
)
ENDINGS = ("half-close", "cancel-after-answers", "cancel-at-once")
"""Envoy half-closes when the request is over; a client or Envoy reset cancels the stream after
the server has answered (and claimed), or before it has read anything."""

H, B = valid_headers(), ep.request_body(CHAT)
OUT_OF_ORDER = {
    "second request_headers": [H, B, H, B],
    "headers twice before a body": [H, H, B],
    "body before headers": [B, H, B],
    "response before request": [ep.response_headers(200), H, B],
    "trailers first": [ep.request_trailers(), H, B],
    "body after the route": [H, B, B],
    "headers after an immediate response": [valid_headers("nope"), H, B],
}


async def drive(port: int, messages: list[ProcessingRequest], ending: str) -> None:
    stream = Stream(port)
    try:
        await stream.send(*messages)
        if ending == "half-close":
            await stream.queue.put(None)
            with contextlib.suppress(TimeoutError, grpc.aio.AioRpcError):
                await asyncio.wait_for(asyncio.shield(stream.reader), 3)
        elif ending == "cancel-after-answers":
            # Fewer answers than messages when the server ended the stream early: cancel anyway.
            with contextlib.suppress(AssertionError):
                await eventually(
                    lambda: stream.answers.qsize() >= len(messages) or stream.reader.done(),
                    timeout=0.5,
                    interval=0.005,
                )
    finally:
        await stream.close()


async def settled(stack: LocalStack) -> None:
    """The server releases as soon as it sees the stream end."""
    await eventually(lambda: metric(stack, "extproc_pod_in_flight") == 0, what="in-flight 0")


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(messages=sequence, ending=st.sampled_from(ENDINGS))
@example(messages=OUT_OF_ORDER["second request_headers"], ending="half-close")
@example(messages=OUT_OF_ORDER["second request_headers"], ending="cancel-after-answers")
def test_no_sequence_leaks_a_claim_or_charges_twice(
    stack: LocalStack, messages: list[ProcessingRequest], ending: str
) -> None:
    admitted = metric(stack, ADMITTED, 'decision="admitted"')
    asyncio.run(drive(stack.grpc_port, messages, ending))
    asyncio.run(settled(stack))
    assert metric(stack, ADMITTED, 'decision="admitted"') - admitted <= 1


def moved(stream: Stream, answers_before: int) -> bool:
    return stream.answers.qsize() > answers_before or stream.reader.done()


async def until_ended(port: int, messages: list[ProcessingRequest]) -> grpc.aio.AioRpcError:
    """Sends one message at a time, each after the answer to the one before, so that the
    client is not writing when the server ends the stream; returns how the stream ended."""
    stream = Stream(port)
    try:
        for message in messages:
            before = stream.answers.qsize()
            await stream.send(message)
            await eventually(functools.partial(moved, stream, before))
            if stream.reader.done():
                break
        await stream.queue.put(None)
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await asyncio.wait_for(stream.reader, 5)
        return ended.value
    finally:
        await stream.close()


@pytest.mark.parametrize("name", list(OUT_OF_ORDER))
def test_a_message_out_of_order_ends_the_stream_and_releases(stack: LocalStack, name: str) -> None:
    admitted = metric(stack, ADMITTED, 'decision="admitted"')
    violations = metric(stack, "extproc_protocol_errors_total")
    ended = asyncio.run(until_ended(stack.grpc_port, OUT_OF_ORDER[name]))
    assert ended.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "received" in (ended.details() or "")
    asyncio.run(settled(stack))
    assert metric(stack, ADMITTED, 'decision="admitted"') - admitted <= 1
    assert metric(stack, "extproc_protocol_errors_total") == violations + 1


async def malformed_http(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /" + b"a" * 80_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(64), 5)
    writer.close()
    return answer


def test_the_server_still_routes_and_logged_no_traceback(stack: LocalStack) -> None:
    """Last in the module: after every stream above and an 80 KB URL on the metrics port (one
    WARNING line, not a traceback)."""
    assert asyncio.run(malformed_http(stack.http_ports[0])).split(b" ")[1] == b"400"
    answers = asyncio.run(
        ep.run_stream(
            stack.grpc_port,
            [ep.request_headers(headers={"routing-strategy": "random"}), ep.request_body(CHAT)],
        )
    )
    assert "target-pod" in ep.set_headers(answers[-1])
    asyncio.run(settled(stack))
    log = stack.workdir / "logs" / "extproc.log"
    asyncio.run(eventually(lambda: "malformed HTTP request" in log.read_text(), what="warning"))
    text = log.read_text()
    assert "Traceback" not in text
    (warning,) = [line for line in text.splitlines() if "malformed HTTP request" in line]
    assert "WARNING" in warning and len(warning) < 400
    assert metric(stack, "extproc_internal_errors_total") == 0
