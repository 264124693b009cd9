"""Users and rate limits through a real Envoy: the seed's scenario on the embedded default (users
in memory) and on a real redis-server, TPM charged from plain and streamed answers, two servers
sharing one Redis (also under a burst), Redis going away under both failure policies, and user
headers no user can have."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any

import aiohttp
import pytest

from extproc.devstack.stack import LocalStack, StackConfig
from tests.e2e.conftest import eventually, metric_samples
from tools.redis_server import RedisServer

SEED_CHAT = {
    "model": "m1",
    "messages": [{"role": "user", "content": "Say this is a test!"}],
    "temperature": 0.7,
}
TIMEOUT = aiohttp.ClientTimeout(total=10)
"""Longer than any check may take; a request hung on Redis would fail the test here."""


@pytest.fixture(scope="module")
def redis_e2e(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis-e2e")) as server:
        yield server


def redis_stack(redis: RedisServer, *args: str) -> StackConfig:
    return StackConfig(
        pods=1,
        models=("m1",),
        sim_defaults={"decode_time_base": 0.002},
        server_args=("--redis-url", redis.url, "--redis-retry-interval", "200ms", *args),
    )


@pytest.fixture(scope="module")
def open_stack(redis_e2e: RedisServer) -> Iterator[LocalStack]:
    """Users in Redis, the default fail-open policy."""
    with LocalStack(redis_stack(redis_e2e)) as running:
        yield running


@pytest.fixture(scope="module")
def closed_stack(redis_e2e: RedisServer) -> Iterator[LocalStack]:
    """A second server on the same Redis, fail-closed."""
    with LocalStack(redis_stack(redis_e2e, "--redis-failure-policy", "fail-closed")) as running:
        yield running


@pytest.fixture(params=["memory", "redis"])
def any_stack(request: pytest.FixtureRequest) -> LocalStack:
    """The embedded default (the shared session stack, users in memory), then the Redis one."""
    stack: LocalStack = request.getfixturevalue(
        "stack" if request.param == "memory" else "open_stack"
    )
    return stack


async def users(stack: LocalStack, call: str, body: Mapping[str, Any]) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession(timeout=TIMEOUT) as session,
        session.post(f"{stack.users_url}/{call}", json=body) as response,
    ):
        return response.status, await response.json()


async def chat(
    stack: LocalStack, user: str, body: Mapping[str, Any] = SEED_CHAT
) -> tuple[int, Mapping[str, str], bytes]:
    async with (
        aiohttp.ClientSession(timeout=TIMEOUT) as session,
        session.post(
            stack.gateway_url + "/v1/chat/completions", json=body, headers={"user": user}
        ) as response,
    ):
        return response.status, response.headers.copy(), await response.read()


def rate_limit_error(message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "code": 429, "param": None}}


async def eventually_rejected(stack: LocalStack, user: str, body: Mapping[str, Any]) -> bytes:
    """Requests until one is refused (charges land just after a response ends)."""
    rejected = b""

    async def refused() -> bool:
        nonlocal rejected
        status, _, payload = await chat(stack, user, body)
        if status == 429:
            rejected = payload
            return True
        assert status == 200, payload
        return False

    await eventually(refused, timeout=10)
    return rejected


async def test_the_seed_scenario(any_stack: LocalStack) -> None:
    stack = any_stack
    seed_user = {"name": "lgy", "rpm": 100, "tpm": 1000}
    assert await users(stack, "CreateUser", seed_user) == (200, seed_user)
    assert await users(stack, "ReadUser", {"name": "lgy"}) == (200, seed_user)
    limited = {"name": "lgy", "rpm": 3, "tpm": 1000}
    assert await users(stack, "UpdateUser", limited) == (200, limited)
    for _ in range(3):
        status, headers, body = await chat(stack, "lgy")
        assert status == 200, body
        assert headers["x-pod-name"].startswith("sim-")
    status, headers, body = await chat(stack, "lgy")
    assert status == 429
    assert json.loads(body) == rate_limit_error("user: lgy has exceeded RPM: 3", "requests")
    assert headers["content-type"] == "application/json"
    assert 1 <= int(headers["retry-after"]) <= 61

    await users(stack, "UpdateUser", {"name": "lgy", "rpm": 5})
    for _ in range(2):
        assert (await chat(stack, "lgy"))[0] == 200
    status, _, body = await chat(stack, "lgy")
    assert json.loads(body)["error"]["message"] == "user: lgy has exceeded RPM: 5"

    assert (await users(stack, "DeleteUser", {"name": "lgy"}))[0] == 200
    status, _, body = await chat(stack, "lgy")
    assert status == 401
    assert json.loads(body)["error"]["code"] == "unknown_user"
    assert (await users(stack, "ReadUser", {"name": "lgy"}))[0] == 404
    assert (await chat(stack, ""))[0] == 200  # an empty user header is no user: not limited


async def test_tpm_charged_from_a_plain_answer(any_stack: LocalStack) -> None:
    await users(any_stack, "CreateUser", {"name": "tokens", "tpm": 10})
    body = {**SEED_CHAT, "max_tokens": 16}
    assert (await chat(any_stack, "tokens", body))[0] == 200
    rejected = await eventually_rejected(any_stack, "tokens", body)
    assert json.loads(rejected) == rate_limit_error("user: tokens has exceeded TPM: 10", "tokens")


async def test_tpm_charged_from_streams_with_and_without_usage(open_stack: LocalStack) -> None:
    with_usage = {
        **SEED_CHAT,
        "stream": True,
        "max_tokens": 16,
        "stream_options": {"include_usage": True},
    }
    without_usage = {**SEED_CHAT, "stream": True, "max_tokens": 16}
    for name, body in (("streamer", with_usage), ("not-asked", without_usage)):
        await users(open_stack, "CreateUser", {"name": name, "tpm": 10})
        status, _, payload = await chat(open_stack, name, body)
        assert status == 200
        assert payload.rstrip().endswith(b"data: [DONE]")  # the client's stream is untouched
        assert (b'"usage"' in payload) == (body is with_usage)
        rejected = await eventually_rejected(open_stack, name, body)
        assert json.loads(rejected)["error"]["message"] == f"user: {name} has exceeded TPM: 10"
    charged = await metric_samples(open_stack, "extproc_ratelimit_charged_tokens_total")
    # The pod reports usage for both: the server asked for it where the client did not.
    assert charged['{source="reported"}'] > 0
    assert charged.get('{source="estimated"}', 0) == 0


async def test_two_servers_share_one_limit(
    open_stack: LocalStack, closed_stack: LocalStack
) -> None:
    await users(closed_stack, "CreateUser", {"name": "shared", "rpm": 4})
    stacks = [open_stack, closed_stack]
    statuses = [(await chat(stacks[i % 2], "shared"))[0] for i in range(4)]
    assert statuses == [200] * 4
    for stack in stacks:
        status, _, body = await chat(stack, "shared")
        assert status == 429
        assert json.loads(body)["error"]["message"] == "user: shared has exceeded RPM: 4"


async def burst(
    stacks: list[LocalStack], user: str, n: int, body: Mapping[str, Any] = SEED_CHAT
) -> Counter[int]:
    """``n`` requests of ``user`` at once, alternating between the stacks: statuses counted."""
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=TIMEOUT, connector=connector) as session:

        async def one(i: int) -> int:
            url = stacks[i % len(stacks)].gateway_url + "/v1/chat/completions"
            async with session.post(url, json=body, headers={"user": user}) as response:
                await response.read()
                return response.status

        return Counter(await asyncio.gather(*(one(i) for i in range(n))))


async def test_a_burst_across_two_servers_admits_exactly_the_limit(
    open_stack: LocalStack, closed_stack: LocalStack
) -> None:
    """Hundreds of requests at once used to make checks wait past redis_timeout for a connection
    or a busy event loop, which counted as Redis failures: fail-open served hundreds over the
    limit, fail-closed answered 503s."""
    await users(closed_stack, "CreateUser", {"name": "burst", "rpm": 10})
    statuses = await burst([open_stack, closed_stack], "burst", 1000)
    assert statuses == Counter({200: 10, 429: 990})
    for stack in (open_stack, closed_stack):
        errors = await metric_samples(stack, "extproc_redis_errors_total")
        assert errors.get('{operation="admit"}', 0) == 0


@pytest.mark.parametrize("bad", ["\u0085", "\u009b", "\u2028", "\u202e"])
async def test_a_user_header_no_user_can_have_is_a_400(any_stack: LocalStack, bad: str) -> None:
    status, headers, body = await chat(any_stack, f"lgy{bad}")
    assert status == 400
    assert headers["content-type"] == "application/json"
    error = json.loads(body)["error"]
    assert (error["code"], error["param"]) == ("invalid_user", "user")
    assert f"U+{ord(bad):04X}" in error["message"]


async def test_redis_down_fails_open_and_recovers(
    open_stack: LocalStack, redis_e2e: RedisServer
) -> None:
    await users(open_stack, "CreateUser", {"name": "ops", "rpm": 2})
    for _ in range(2):
        assert (await chat(open_stack, "ops"))[0] == 200
    assert (await chat(open_stack, "ops"))[0] == 429
    redis_e2e.stop()
    try:
        for _ in range(3):
            status, _, body = await chat(open_stack, "ops")
            assert status == 200, body
    finally:
        redis_e2e.start()
    decisions = await metric_samples(open_stack, "extproc_ratelimit_decisions_total")
    assert decisions['{decision="failed_open"}'] >= 3
    errors = await metric_samples(open_stack, "extproc_redis_errors_total")
    assert errors['{operation="admit"}'] >= 1

    async def limited_again() -> bool:
        return (await chat(open_stack, "ops"))[0] == 429

    await eventually(limited_again)  # same process, Redis back with its data: limits apply


async def test_redis_frozen_fails_closed_and_recovers(
    closed_stack: LocalStack, redis_e2e: RedisServer
) -> None:
    assert (await users(closed_stack, "CreateUser", {"name": "closed", "rpm": 10_000}))[0] == 200
    assert (await chat(closed_stack, "closed"))[0] == 200
    redis_e2e.pause()
    try:
        for _ in range(3):
            status, headers, body = await chat(closed_stack, "closed")
            assert status == 503
            assert json.loads(body)["error"]["code"] == "rate_limits_unavailable"
            assert int(headers["retry-after"]) >= 1
        # A burst on the frozen Redis: every request answered (none hangs past TIMEOUT).
        assert await burst([closed_stack], "closed", 200) == Counter({503: 200})
    finally:
        redis_e2e.resume()

    async def served_again() -> bool:
        return (await chat(closed_stack, "closed"))[0] == 200

    await eventually(served_again)
