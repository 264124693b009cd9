"""Every strategy routes through Envoy to real vLLM with nothing scored by the fallback, and the
tokens charged to a user are vLLM's own count for each of the six request shapes."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from strategies import registry
from tests.realvllm.conftest import MODEL, Fleet, total

SHAPES = ["plain", "stream-with-usage", "stream-without-usage"]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as client:
        yield client


async def server_metric(
    session: aiohttp.ClientSession, fleet: Fleet, name: str
) -> dict[str, float]:
    async with session.get(fleet.stack.metrics_url) as response:
        text = await response.text()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", line)
        if match:
            samples[match.group(1) or ""] = float(match.group(2))
    return samples


def request(kind: str, shape: str, text: str) -> tuple[str, dict[str, Any]]:
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 12, "temperature": 0}
    if kind == "chat":
        path = "/v1/chat/completions"
        body["messages"] = [
            {"role": "system", "content": "You answer briefly."},
            {"role": "user", "content": text},
        ]
    else:
        path = "/v1/completions"
        body["prompt"] = text
    if shape != "plain":
        body["stream"] = True
    if shape == "stream-with-usage":
        body["stream_options"] = {"include_usage": True}
    return path, body


def data_events(raw: bytes) -> list[Any]:
    events = []
    for block in raw.decode().split("\n\n"):
        if block.startswith("data: ") and block != "data: [DONE]":
            events.append(json.loads(block[len("data: ") :]))
    return events


async def test_every_strategy_reaches_vllm_without_fallback(
    fleet: Fleet, session: aiohttp.ClientSession
) -> None:
    before = sum((await server_metric(session, fleet, "extproc_routing_fallback_total")).values())
    for strategy in registry.instance_names({}):
        served = set()
        for i in range(4):
            path, body = request("chat", "plain", f"Strategy {strategy} request {i}.")
            async with session.post(
                fleet.stack.gateway_url + path,
                json=body,
                headers={"routing-strategy": strategy, "user": "strategies"},
            ) as response:
                assert response.status == 200, await response.text()
                assert response.headers["routing-strategy"] == strategy
                served.add(response.headers["target-pod"])
                document = await response.json()
            assert document["usage"]["completion_tokens"] > 0
        assert served <= {"plain", "lora"}, served
    after = sum((await server_metric(session, fleet, "extproc_routing_fallback_total")).values())
    assert after == before, "some decisions fell back to least-request"


async def charged(session: aiohttp.ClientSession, fleet: Fleet) -> float:
    samples = await server_metric(session, fleet, "extproc_ratelimit_charged_tokens_total")
    return samples.get('{source="reported"}', 0.0)


@pytest.mark.parametrize("kind", ["chat", "completions"])
@pytest.mark.parametrize("shape", SHAPES)
async def test_usage_charged_is_vllms_own_count(
    fleet: Fleet, session: aiohttp.ClientSession, kind: str, shape: str
) -> None:
    path, body = request(kind, shape, f"Tell me about the {kind} {shape} shape, please.")
    counters_before = total(fleet)
    charged_before = await charged(session, fleet)
    async with session.post(
        fleet.stack.gateway_url + path,
        json=body,
        headers={"user": f"usage-{kind}-{shape}", "routing-strategy": "least-request"},
    ) as response:
        assert response.status == 200, await response.text()
        received = await response.read()
    # vLLM's counters move when the request finishes, the charge when the response has been
    # read: wait for both rather than for a fixed time.
    deadline = asyncio.get_running_loop().time() + 15
    while True:
        counters = total(fleet)
        spent = (counters["prompt"] - counters_before["prompt"]) + (
            counters["generation"] - counters_before["generation"]
        )
        charge = await charged(session, fleet) - charged_before
        if spent > 0 and charge == spent:
            break
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"charged {charge} tokens, vLLM counted {spent}")
        await asyncio.sleep(0.2)

    if shape == "plain":
        usage = json.loads(received)["usage"]
        assert usage["prompt_tokens"] + usage["completion_tokens"] == spent
        return
    assert received.endswith(b"data: [DONE]\n\n")
    events = data_events(received)
    with_usage = [event for event in events if event.get("usage")]
    if shape == "stream-with-usage":
        # vLLM's own final usage event, as the client asked.
        assert len(with_usage) == 1 and with_usage[0]["choices"] == []
        usage = with_usage[0]["usage"]
        assert usage["prompt_tokens"] + usage["completion_tokens"] == spent
    else:
        # The pod was asked for usage on the side; the client gets no usage event.
        assert with_usage == []
        assert all(event["choices"] for event in events)


async def test_stream_without_usage_is_byte_identical_to_vllms(
    fleet: Fleet, session: aiohttp.ClientSession
) -> None:
    """Greedy decoding makes vLLM's answer repeatable: the client's bytes through the gateway
    equal those vLLM sends a direct client, up to the ids and timestamps vLLM makes per request."""
    path, body = request("completions", "stream-without-usage", "Count from one to five:")

    def normalised(raw: bytes) -> list[Any]:
        events = data_events(raw)
        for event in events:
            event.pop("id", None)
            event.pop("created", None)
        return events

    async with session.post(
        fleet.stack.gateway_url + path,
        json=body,
        headers={"user": "bytes", "routing-strategy": "least-request"},
    ) as response:
        via_gateway = await response.read()
        pod = fleet.plain if response.headers["target-pod"] == "plain" else fleet.lora
    async with session.post(pod.base_url + path, json=body) as response:
        direct = await response.read()
    assert normalised(via_gateway) == normalised(direct)
    assert via_gateway.count(b"\n\n") == direct.count(b"\n\n")
