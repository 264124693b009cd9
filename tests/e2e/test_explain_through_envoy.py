"""Explain's answer is what a real request through Envoy then does."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import pytest

from extproc.debug.v1 import debug_pb2 as pb
from extproc.debug.v1.debug_pb2_grpc import RouterDebugStub
from extproc.devstack.stack import LocalStack
from tests.e2e.conftest import eventually, served_by, total_in_flight


@pytest.fixture
async def debug(stack: LocalStack) -> AsyncIterator[RouterDebugStub]:
    async with grpc.aio.insecure_channel(stack.grpc_address) as channel:
        yield RouterDebugStub(channel)


def chat(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": "m1", "messages": [{"role": "user", "content": content}], **extra}


def best(answer: pb.ExplainResponse) -> list[str]:
    return [c.pod for c in answer.candidates if c.best]


async def test_least_request_explained_then_routed(
    stack: LocalStack, debug: RouterDebugStub
) -> None:
    async def idle() -> bool:
        return await total_in_flight(stack) == 0

    await eventually(idle)
    async with contextlib.AsyncExitStack() as held, aiohttp.ClientSession() as session:
        busy = set()
        for _ in range(2):
            response = await held.enter_async_context(
                session.post(
                    stack.gateway_url + "/v1/chat/completions",
                    json=chat("hold", stream=True, max_tokens=3000),
                    headers={"routing-strategy": "least-request"},
                )
            )
            await response.content.readline()
            busy.add(response.headers["x-pod-name"])
        assert len(busy) == 2
        explained = await debug.Explain(
            pb.ExplainRequest(
                model="m1",
                messages=[pb.ChatMessage(role="user", content="hi")],
                strategy="least-request",
            )
        )
        (idle_pod,) = {p.name for p in stack.pods} - busy
        assert best(explained) == [idle_pod] and explained.pod == idle_pod
        loads = {c.pod: c.load for c in explained.candidates}
        assert all(loads[name] >= 1 for name in busy) and loads[idle_pod] == 0
        assert await served_by(session, stack, chat("hi"), "least-request") == idle_pod
    await eventually(idle)


async def test_prefix_cache_explained_then_routed(
    stack: LocalStack, debug: RouterDebugStub
) -> None:
    prompt = f"{uuid.uuid4()} " + "A long shared system prompt that pods cache. " * 8
    async with aiohttp.ClientSession() as session:
        first = await served_by(session, stack, chat(prompt), "prefix-cache")
        explained = await debug.Explain(
            pb.ExplainRequest(
                body=json.dumps(chat(prompt)),
                headers={"routing-strategy": "prefix-cache"},
            )
        )
        assert explained.pod == first and best(explained) == [first]
        matches = {c.pod: c.prefix_match_blocks for c in explained.candidates}
        assert matches[first] == explained.prompt_blocks > 2
        assert await served_by(session, stack, chat(prompt), "prefix-cache") == first
