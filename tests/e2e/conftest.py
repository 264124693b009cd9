"""The local stack (simulated pods, ``extproc serve``, a real Envoy) as test fixtures."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from extproc.devstack.stack import LocalStack, StackConfig


@pytest.fixture(scope="session")
def stack() -> Iterator[LocalStack]:
    """Three pods of ``m1``, a never-ready ``m-down`` pod, a 64 KiB body limit."""
    config = StackConfig(
        pods=3,
        models=("m1",),
        sim_defaults={"decode_time_base": 0.002},
        # A model with no ready pod is held for its first pod: briefly here, so the 503 that
        # ends the hold comes well inside Envoy's ext_proc message timeout.
        server_args=(
            "--max-body-bytes",
            "65536",
            "--static-reload-interval",
            "0.1",
            "--hold-timeout",
            "1s",
        ),
        extra_pods=[
            {"name": "down-0", "address": "127.0.0.1:9", "model": "m-down", "ready": False}
        ],
    )
    with LocalStack(config) as running:
        yield running


async def metric_samples(stack: LocalStack, name: str) -> dict[str, float]:
    """``{label-string: value}`` for one metric family on the server's /metrics."""
    async with aiohttp.ClientSession() as session, session.get(stack.metrics_url) as response:
        text = await response.text()
    samples = {}
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", line)
        if match:
            samples[match.group(1) or ""] = float(match.group(2))
    return samples


async def total_in_flight(stack: LocalStack) -> float:
    return sum((await metric_samples(stack, "extproc_pod_in_flight")).values())


async def eventually(check: Any, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        if await check():
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.1)


async def served_by(
    session: aiohttp.ClientSession,
    stack: LocalStack,
    body: Any,
    strategy: str,
    path: str = "/v1/chat/completions",
) -> str:
    """Send one request through the gateway with ``strategy``; the pod that answered it."""
    async with session.post(
        stack.gateway_url + path, json=body, headers={"routing-strategy": strategy}
    ) as response:
        assert response.status == 200, await response.text()
        await response.read()
        return response.headers["x-pod-name"]
