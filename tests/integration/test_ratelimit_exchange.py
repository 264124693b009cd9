"""Rate limits inside the per-request state machine: where the check happens, what a rejection
looks like, when the response body is asked for, what is charged at the end, and bursts across
two servers sharing one Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

import orjson
import pytest
from envoy.service.ext_proc.v3.external_processor_pb2 import (
    HttpBody,
    ProcessingRequest,
    ProcessingResponse,
)

from extproc.app import Server
from extproc.envoy.exchange import Exchange
from extproc.users.store import User
from strategies.vtc_basic import VtcBasic
from tests import envoy_protocol as ep
from tests.helpers import eventually
from tools.redis_server import RedisServer

CHAT = orjson.dumps({"model": "m1", "messages": [{"role": "user", "content": "hello"}]})
STREAM = orjson.dumps(
    {"model": "m1", "messages": [{"role": "user", "content": "hello"}], "stream": True}
)
ANSWER = orjson.dumps({"id": "x", "usage": {"prompt_tokens": 7, "completion_tokens": 5}})


def response_body(data: bytes, end: bool = True) -> ProcessingRequest:
    return ProcessingRequest(response_body=HttpBody(body=data, end_of_stream=end))


async def send(exchange: Exchange, message: ProcessingRequest) -> Sequence[ProcessingResponse]:
    return await exchange.handle(message)


def metric(server: Server, name: str, **labels: str) -> float:
    return server.telemetry.registry.get_sample_value(name, labels) or 0.0


async def run(
    server: Server,
    user: str | None,
    body: bytes = CHAT,
    answer: bytes | None = ANSWER,
    **headers: str,
) -> tuple[Exchange, list[ProcessingResponse]]:
    """One request through an exchange; stops at the first immediate response."""
    if user is not None:
        headers["user"] = user
    exchange = server.new_exchange()
    answers = list(await send(exchange, ep.request_headers(headers=headers)))
    if answers[0].HasField("immediate_response"):
        exchange.close()
        return exchange, answers
    answers += await send(exchange, ep.request_body(body))
    answers += await send(exchange, ep.response_headers(200))
    if answer is not None and answers[-1].HasField("mode_override"):
        answers += await send(exchange, response_body(answer))
    exchange.close()
    return exchange, answers


async def test_over_rpm_is_rejected_at_the_headers_phase(make_server: Callable[..., Any]) -> None:
    server = await make_server()
    await server.users.create(User("lgy", rpm=3))
    for _ in range(3):
        _, answers = await run(server, "lgy")
        assert ep.kinds(answers) == ["request_headers", "request_body", "response_headers"]
    _, answers = await run(server, "lgy", **{"x-request-id": "rid-9"})
    (rejection,) = answers
    immediate = rejection.immediate_response
    assert immediate.status.code == 429
    assert orjson.loads(immediate.body) == {
        "error": {
            "message": "user: lgy has exceeded RPM: 3",
            "type": "requests",
            "code": 429,
            "param": None,
        }
    }
    headers = ep.set_headers(rejection)
    assert 1 <= int(headers["retry-after"]) <= 61
    assert headers["x-request-id"] == "rid-9"
    assert metric(server, "extproc_requests_total", model="unknown", strategy="none", status="429")


async def test_no_user_header_is_not_limited_and_unknown_users_get_401(
    make_server: Callable[..., Any],
) -> None:
    server = await make_server()
    for _ in range(5):
        _, answers = await run(server, None)
        assert len(answers) == 3
    assert metric(server, "extproc_ratelimit_check_seconds_count") == 0
    _, (rejection,) = await run(server, "ghost")
    assert rejection.immediate_response.status.code == 401
    error = orjson.loads(rejection.immediate_response.body)["error"]
    assert (error["message"], error["code"]) == ("user: ghost is not registered", "unknown_user")


async def test_default_limits_for_unknown_users(make_server: Callable[..., Any]) -> None:
    server = await make_server(unknown_user_policy="default-limits", default_rpm=1)
    assert len((await run(server, "anyone"))[1]) == 3
    _, (rejection,) = await run(server, "anyone")
    assert rejection.immediate_response.status.code == 429


@pytest.mark.parametrize("strategy", [None, "least-request"])
async def test_a_tpm_user_has_the_response_read_and_charged(
    make_server: Callable[..., Any], strategy: str | None
) -> None:
    server = await make_server()
    await server.users.create(User("t", tpm=12))
    await server.users.create(User("r", rpm=100))
    extra = {"routing-strategy": strategy} if strategy else {}
    _, answers = await run(server, "r", **extra)
    assert not answers[-1].HasField("mode_override")  # no TPM limit: the body is not read

    _, answers = await run(server, "t", **extra)
    assert answers[2].mode_override.response_body_mode == answers[2].mode_override.STREAMED
    assert ep.kinds(answers)[-1] == "response_body"
    await server.limiter.flush()
    _, (rejection,) = await run(server, "t", **extra)
    assert orjson.loads(rejection.immediate_response.body)["error"]["message"] == (
        "user: t has exceeded TPM: 12"
    )
    assert metric(server, "extproc_ratelimit_charged_tokens_total", source="reported") == 12


async def test_a_stream_cut_short_is_charged_for_what_was_seen(
    make_server: Callable[..., Any],
) -> None:
    server = await make_server()
    await server.users.create(User("s", tpm=4))
    exchange = server.new_exchange()
    await send(exchange, ep.request_headers(headers={"user": "s"}))
    await send(exchange, ep.request_body(STREAM))
    (headers_answer,) = await send(exchange, ep.response_headers(200))
    assert headers_answer.HasField("mode_override")
    events = b"".join(b'data: {"choices": [{"delta": {"content": "x"}}]}\n\n' for _ in range(7))
    await send(exchange, response_body(events, end=False))
    exchange.close()  # the client went away mid-stream
    await server.limiter.flush()
    assert metric(server, "extproc_ratelimit_charged_tokens_total", source="estimated") > 0
    _, (rejection,) = await run(server, "s")
    assert rejection.immediate_response.status.code == 429


@pytest.mark.parametrize("policy", ["fail-open", "fail-closed"])
async def test_a_frozen_redis_never_holds_a_request(
    make_server: Callable[..., Any], redis_server: RedisServer, policy: str
) -> None:
    server = await make_server(
        redis_url=redis_server.url, redis_failure_policy=policy, redis_retry_interval="0s"
    )
    await server.users.create(User("lgy", rpm=100))
    assert len((await run(server, "lgy"))[1]) == 3
    redis_server.pause()
    try:
        for _ in range(3):
            _, answers = await asyncio.wait_for(run(server, "lgy"), 10)
            if policy == "fail-open":
                assert len(answers) == 3
            else:
                (rejection,) = answers
                assert rejection.immediate_response.status.code == 503
                assert ep.set_headers(rejection)["retry-after"] == "1"
    finally:
        redis_server.resume()
    decision = policy.replace("fail-", "failed_")
    assert metric(server, "extproc_ratelimit_decisions_total", decision=decision) == 3
    assert metric(server, "extproc_redis_errors_total", operation="admit") == 3
    _, answers = await run(server, "lgy")  # Redis is back: checked (and counted) again
    assert len(answers) == 3
    assert metric(server, "extproc_ratelimit_decisions_total", decision="admitted") == 2


def status_of(answers: list[ProcessingResponse]) -> int:
    if answers[0].HasField("immediate_response"):
        return int(answers[0].immediate_response.status.code)
    return 200


async def burst(servers: list[Server], user: str, n: int) -> list[int]:
    """``n`` requests of ``user`` at once, alternating between the servers; their statuses."""
    runs = (run(servers[i % len(servers)], user) for i in range(n))
    return [status_of(answers) for _, answers in await asyncio.wait_for(asyncio.gather(*runs), 60)]


@pytest.mark.parametrize("policy", ["fail-open", "fail-closed"])
async def test_a_burst_across_two_servers_admits_exactly_the_limit(
    make_server: Callable[..., Any], redis_server: RedisServer, policy: str
) -> None:
    """A slow answer caused by local queuing is not a Redis failure: 1,000 requests at once used
    to trip the failure policy (fail-open admitted hundreds, fail-closed answered 503s)."""
    servers = [
        await make_server(redis_url=redis_server.url, redis_failure_policy=policy) for _ in range(2)
    ]
    await servers[0].users.create(User("bursty", rpm=10))
    statuses = await burst(servers, "bursty", 1000)
    assert statuses.count(200) == 10
    assert statuses.count(429) == 990
    for server in servers:
        assert metric(server, "extproc_redis_errors_total", operation="admit") == 0
    for server in servers:  # the window is shared: a second burst admits nothing
        assert await burst([server], "bursty", 50) == [429] * 50


@pytest.mark.parametrize("policy", ["fail-open", "fail-closed"])
async def test_a_burst_on_a_frozen_redis_gets_the_policy_without_hanging(
    make_server: Callable[..., Any], redis_server: RedisServer, policy: str
) -> None:
    servers = [
        await make_server(redis_url=redis_server.url, redis_failure_policy=policy) for _ in range(2)
    ]
    await servers[0].users.create(User("frozen", rpm=100_000))
    assert await burst(servers, "frozen", 2) == [200, 200]
    redis_server.pause()
    try:
        statuses = await burst(servers, "frozen", 400)
    finally:
        redis_server.resume()
    assert statuses == [200 if policy == "fail-open" else 503] * 400
    decision = policy.replace("fail-", "failed_")
    assert (
        sum(
            metric(server, "extproc_ratelimit_decisions_total", decision=decision)
            for server in servers
        )
        == 400
    )

    def admitted() -> float:
        return sum(
            metric(server, "extproc_ratelimit_decisions_total", decision="admitted")
            for server in servers
        )

    before = admitted()

    async def checked_again() -> bool:  # Redis is back: no restart needed
        await burst(servers, "frozen", 2)
        return admitted() > before

    await eventually(checked_again)


@pytest.mark.parametrize("bad", ["\x00", "\x85", "\u009b", "\u2028", "\u202e"])
async def test_a_user_header_with_control_characters_is_a_400(
    make_server: Callable[..., Any], bad: str
) -> None:
    server = await make_server()
    _, (rejection,) = await run(server, f"lgy{bad}")
    immediate = rejection.immediate_response
    assert immediate.status.code == 400
    error = orjson.loads(immediate.body)["error"]
    assert (error["code"], error["param"]) == ("invalid_user", "user")
    assert error["message"].startswith("Invalid user header 'lgy\\u")
    assert bad not in error["message"]


async def test_vtc_basic_counts_what_users_consume(make_server: Callable[..., Any]) -> None:
    server = await make_server()
    for name in ("heavy", "light"):
        await server.users.create(User(name))
    _, answers = await run(server, "heavy", **{"routing-strategy": "vtc-basic"})
    assert answers[2].HasField("mode_override")  # vtc-basic needs the response's usage
    _, answers = await run(server, "light", answer=b'{"usage": {"prompt_tokens": 1}}')
    assert not answers[2].HasField("mode_override")  # no plan needing it, no TPM: not read
    vtc = server.plans.strategies["vtc-basic"]
    assert isinstance(vtc, VtcBasic)
    now = time.monotonic()
    assert vtc.share("heavy", now) == 0.5  # the only user with usage: nobody to compare with
    await run(
        server,
        "light",
        answer=b'{"usage": {"prompt_tokens": 1}}',
        **{"routing-strategy": "vtc-basic"},
    )
    assert vtc.share("heavy", now) > 0.9
    assert vtc.share("light", now) < 0.1
