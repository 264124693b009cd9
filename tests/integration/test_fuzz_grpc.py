"""Random ext_proc message sequences over a real gRPC channel to a real server process: valid and
invalid headers and bodies in any order, repeated, abandoned or cancelled streams. After every
stream nothing stays claimed (the pods' in-flight gauges are back at 0) and the user was charged
at most one request of RPM; afterwards the server still routes a normal request and has logged no
traceback.

Bounded and deterministic: ``derandomize`` makes the examples the same on every run."""

from __future__ import annotations

import asyncio
import re
import urllib.request
from collections.abc import Iterator

import grpc
import orjson
import pytest
from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingRequest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extproc.devstack.stack import LocalStack, StackConfig
from tests import envoy_protocol as ep
from tests.envoy_protocol import Stream

CHAT = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hello"}]})
COMPLETION = orjson.dumps({"model": "m", "prompt": "hello", "max_tokens": 2, "stream": True})


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
sequence = st.lists(message, max_size=6)


async def drive(port: int, messages: list[ProcessingRequest], abandon: bool) -> None:
    stream = Stream(port)
    try:
        await stream.send(*messages)
        if not abandon:
            await stream.queue.put(None)  # half-close, as Envoy does when the request is over
            try:
                await asyncio.wait_for(asyncio.shield(stream.reader), 3)
            except (TimeoutError, grpc.aio.AioRpcError):
                pass
    finally:
        await stream.close()


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(messages=sequence, abandon=st.booleans())
def test_no_sequence_leaks_a_claim_or_charges_twice(
    stack: LocalStack, messages: list[ProcessingRequest], abandon: bool
) -> None:
    admitted = metric(stack, "extproc_ratelimit_decisions_total", 'decision="admitted"')
    asyncio.run(drive(stack.grpc_port, messages, abandon))
    for _ in range(100):  # the server releases as soon as it sees the stream end
        if metric(stack, "extproc_pod_in_flight") == 0:
            break
        asyncio.run(asyncio.sleep(0.05))
    assert metric(stack, "extproc_pod_in_flight") == 0
    assert metric(stack, "extproc_ratelimit_decisions_total", 'decision="admitted"') - admitted <= 1


def test_the_server_still_routes_and_logged_no_traceback(stack: LocalStack) -> None:
    answers = asyncio.run(
        ep.run_stream(
            stack.grpc_port,
            [ep.request_headers(headers={"routing-strategy": "random"}), ep.request_body(CHAT)],
        )
    )
    assert "target-pod" in ep.set_headers(answers[-1])
    log = (stack.workdir / "logs" / "extproc.log").read_text()
    assert "Traceback" not in log
    assert metric(stack, "extproc_internal_errors_total") == 0
