"""Through a real Envoy: requests land on the chosen pod, strategies behave, errors are JSON."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any

import aiohttp
import pytest

from extproc.devstack.stack import LocalStack, StackConfig
from tests.e2e.conftest import eventually, metric_samples, total_in_flight

CHAT = {"model": "m1", "messages": [{"role": "user", "content": "Say this is a test!"}]}


async def post(
    session: aiohttp.ClientSession,
    stack: LocalStack,
    body: Any,
    path: str = "/v1/chat/completions",
    **headers: str,
) -> tuple[int, Mapping[str, str], bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    hdrs = {k.replace("_", "-"): v for k, v in headers.items()}
    async with session.post(stack.gateway_url + path, data=data, headers=hdrs) as response:
        return response.status, response.headers.copy(), await response.read()


async def test_request_reaches_the_pod_the_server_chose(stack: LocalStack) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(6):
            status, headers, body = await post(session, stack, CHAT, routing_strategy="random")
            assert status == 200, body
            assert headers["target-pod"] == headers["x-pod-name"]
            assert headers["routing-strategy"] == "random"
            assert headers["x-request-id"]
            assert json.loads(body)["usage"]["completion_tokens"] > 0


async def test_client_request_id_is_kept(stack: LocalStack) -> None:
    async with aiohttp.ClientSession() as session:
        _, headers, _ = await post(
            session, stack, CHAT, routing_strategy="random", x_request_id="my-id-42"
        )
    assert headers["x-request-id"] == "my-id-42"


async def test_random_spreads_over_every_pod(stack: LocalStack) -> None:
    async with aiohttp.ClientSession() as session:
        pods = Counter()
        for _ in range(45):
            _, headers, _ = await post(session, stack, CHAT, routing_strategy="random")
            pods[headers["x-pod-name"]] += 1
    assert set(pods) == {"sim-0", "sim-1", "sim-2"}
    assert min(pods.values()) >= 5


async def test_no_strategy_routes_by_model_header(stack: LocalStack) -> None:
    async with aiohttp.ClientSession() as session:
        status, headers, _ = await post(session, stack, CHAT)
    assert status == 200
    assert headers["x-pod-name"].startswith("sim-")
    assert "target-pod" not in headers


async def test_client_cannot_pick_the_target(stack: LocalStack) -> None:
    async with aiohttp.ClientSession() as session:
        status, headers, _ = await post(session, stack, CHAT, target_pod="127.0.0.1:9")
    assert status == 200
    assert headers["x-pod-name"].startswith("sim-")


async def test_completions_and_token_id_prompts(stack: LocalStack) -> None:
    async with aiohttp.ClientSession() as session:
        for prompt in ("hello", ["a", "b"], [1, 2, 3], [[1, 2], [3]]):
            status, headers, body = await post(
                session,
                stack,
                {"model": "m1", "prompt": prompt, "max_tokens": 2},
                path="/v1/completions",
                routing_strategy="least-request",
            )
            assert status == 200, body
            assert headers["target-pod"] == headers["x-pod-name"]


async def stream_lines(response: aiohttp.ClientResponse) -> list[str]:
    return [line.decode().strip() async for line in response.content if line.strip()]


async def test_streaming_works(stack: LocalStack) -> None:
    body = {**CHAT, "stream": True, "max_tokens": 5, "stream_options": {"include_usage": True}}
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            stack.gateway_url + "/v1/chat/completions",
            json=body,
            headers={"routing-strategy": "least-request"},
        ) as response,
    ):
        assert response.status == 200
        assert response.headers["target-pod"] == response.headers["x-pod-name"]
        lines = await stream_lines(response)
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert chunks[-1]["usage"]["completion_tokens"] == 5


async def test_least_request_avoids_a_pod_held_busy(stack: LocalStack) -> None:
    busy, others = stack.pods[0], stack.pods[1:]
    slow = {**CHAT, "stream": True, "max_tokens": 400}
    async with aiohttp.ClientSession() as session:
        stack.write_pods([busy])
        await asyncio.sleep(0.5)
        held = []
        for _ in range(4):
            response = await session.post(
                stack.gateway_url + "/v1/chat/completions",
                json=slow,
                headers={"routing-strategy": "least-request"},
            )
            assert response.headers["x-pod-name"] == busy.name
            held.append(response)
        stack.write_pods()
        await asyncio.sleep(0.5)
        chosen = Counter()
        for _ in range(6):
            _, headers, _ = await post(session, stack, CHAT, routing_strategy="least-request")
            chosen[headers["x-pod-name"]] += 1
        for response in held:
            response.close()
    assert busy.name not in chosen
    assert set(chosen) == {p.name for p in others}
    await eventually(lambda: _zero(stack))


async def _zero(stack: LocalStack) -> bool:
    return await total_in_flight(stack) == 0


def error_of(status: int, body: bytes, expected: int) -> dict[str, Any]:
    assert status == expected, body
    payload: dict[str, Any] = json.loads(body)
    assert set(payload["error"]) == {"message", "type", "code", "param"}
    return payload["error"]


async def test_every_error_row_through_envoy(stack: LocalStack) -> None:
    async with aiohttp.ClientSession() as session:
        s, h, b = await post(session, stack, b"{oops", routing_strategy="random")
        assert "not valid JSON" in error_of(s, b, 400)["message"]
        assert h["content-type"] == "application/json"

        s, _, b = await post(session, stack, b"[1]", routing_strategy="random")
        assert "JSON object" in error_of(s, b, 400)["message"]

        s, _, b = await post(
            session, stack, {"model": "m1", "messages": "hi"}, routing_strategy="random"
        )
        assert error_of(s, b, 400)["param"] == "messages"

        s, _, b = await post(session, stack, {"messages": []}, routing_strategy="random")
        assert error_of(s, b, 400)["message"] == "`model` is required"

        s, _, b = await post(session, stack, {**CHAT, "model": "nope"}, routing_strategy="random")
        error = error_of(s, b, 404)
        assert error["message"] == "The model nope does not exist."
        assert error["code"] == "model_not_found"

        s, _, b = await post(session, stack, CHAT, routing_strategy="fastest")
        error = error_of(s, b, 400)
        assert "fastest" in error["message"] and "least-request" in error["message"]

        s, h, b = await post(session, stack, {**CHAT, "model": "m-down"}, routing_strategy="random")
        error_of(s, b, 503)
        assert h["retry-after"] == "2"

        big = {**CHAT, "messages": [{"role": "user", "content": "x" * 70000}]}
        s, _, b = await post(session, stack, big, routing_strategy="random")
        assert error_of(s, b, 413)["code"] == "request_too_large"


async def test_models_listing(stack: LocalStack) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(stack.gateway_url + "/v1/models") as response,
    ):
        listing = await response.json()
    assert response.status == 200
    assert {m["id"] for m in listing["data"]} == {"m1", "m-down"}


@pytest.mark.timeout(120)
async def test_cancelled_streams_leave_no_in_flight(stack: LocalStack) -> None:
    body = {**CHAT, "stream": True, "max_tokens": 200}
    timeout = aiohttp.ClientTimeout(total=30)

    async def cancel_one(session: aiohttp.ClientSession) -> None:
        response = await session.post(
            stack.gateway_url + "/v1/chat/completions",
            json=body,
            headers={"routing-strategy": "least-request"},
        )
        assert response.status == 200
        await response.content.readline()
        response.close()

    connector = aiohttp.TCPConnector(limit=50, force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        for _ in range(4):
            await asyncio.gather(*(cancel_one(session) for _ in range(50)))
    await eventually(lambda: _zero(stack), timeout=20)


@pytest.fixture(scope="module")
def skipping() -> Iterator[LocalStack]:
    """The server skips the response phase of requests that need no token usage."""
    config = StackConfig(
        pods=2,
        models=("m1",),
        sim_defaults={"decode_time_base": 0.002},
        server_args=("--response-phase", "when-needed"),
    )
    with LocalStack(config) as running:
        yield running


async def test_skipped_response_phase_keeps_the_client_headers(skipping: LocalStack) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(4):
            status, headers, _ = await post(
                session, skipping, CHAT, routing_strategy="random", x_request_id="skip-1"
            )
            assert status == 200
            assert headers["target-pod"] == headers["x-pod-name"]
            assert headers["routing-strategy"] == "random"
            assert headers["x-request-id"] == "skip-1"
        body = {**CHAT, "stream": True, "max_tokens": 3}
        async with session.post(
            skipping.gateway_url + "/v1/chat/completions",
            json=body,
            headers={"routing-strategy": "least-request"},
        ) as response:
            assert (await stream_lines(response))[-1] == "data: [DONE]"
    statuses = await metric_samples(skipping, "extproc_requests_total")
    assert statuses.get('{model="m1",status="unobserved",strategy="random"}', 0) >= 4
    await eventually(lambda: _zero(skipping))


@pytest.fixture(scope="module")
def one_round_trip() -> Iterator[LocalStack]:
    """Envoy sends headers and body without waiting and skips the response: one round trip."""
    config = StackConfig(
        pods=2,
        models=("m1",),
        sim_defaults={"decode_time_base": 0.002},
        server_args=("--response-phase", "never"),
        layout={"request_body_mode": "FULL_DUPLEX_STREAMED", "response_header_mode": "SKIP"},
    )
    with LocalStack(config) as running:
        yield running


async def test_one_round_trip_setup(one_round_trip: LocalStack) -> None:
    stack = one_round_trip
    async with aiohttp.ClientSession() as session:
        big = {**CHAT, "messages": [{"role": "user", "content": "long " * 5000}]}
        for body in (CHAT, big):
            status, headers, answer = await post(
                session, stack, body, routing_strategy="least-request"
            )
            assert status == 200, answer
            assert headers["target-pod"] == headers["x-pod-name"]
            assert headers["routing-strategy"] == "least-request"
        s, _, b = await post(session, stack, {**CHAT, "model": "nope"}, routing_strategy="random")
        assert error_of(s, b, 404)["code"] == "model_not_found"
    statuses = await metric_samples(stack, "extproc_requests_total")
    assert statuses.get('{model="m1",status="unobserved",strategy="least-request"}', 0) >= 2
