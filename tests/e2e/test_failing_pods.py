"""Failing pods lose traffic instead of winning it, through a real Envoy: among four pods, one
refuses connections and one answers every request with 500; under every strategy only a few
requests reach them before they are ejected, and an ejected pod comes back once it recovers."""

from __future__ import annotations

import asyncio
from collections import Counter

import aiohttp
import pytest

from extproc.devstack.processes import free_port
from extproc.devstack.stack import LocalStack, StackConfig
from strategies import registry
from tests.helpers import eventually

CHAT = {"model": "m1", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 4}
REQUESTS = 200
CONCURRENCY = 8


@pytest.fixture(scope="module")
def failing() -> object:
    config = StackConfig(
        pods=3,
        models=("m1",),
        sim_defaults={"decode_time_base": 0.002},
        pod_params={2: {"error_rate": 1.0}},
        extra_pods=[{"name": "dead", "address": f"127.0.0.1:{free_port()}", "model": "m1"}],
        server_args=("--base-ejection", "2s", "--max-ejection", "4s", "--probe-interval", "0.2s"),
    )
    with LocalStack(config) as running:
        yield running


async def burst(session: aiohttp.ClientSession, stack: LocalStack, strategy: str) -> Counter[str]:
    """``REQUESTS`` requests, ``CONCURRENCY`` at a time: who served each (or the status)."""
    served: Counter[str] = Counter()
    queue: asyncio.Queue[int] = asyncio.Queue()
    for n in range(REQUESTS):
        queue.put_nowait(n)

    async def worker() -> None:
        while not queue.empty():
            queue.get_nowait()
            async with session.post(
                f"{stack.gateway_url}/v1/chat/completions",
                json=CHAT,
                headers={"routing-strategy": strategy},
            ) as response:
                await response.read()
                served[response.headers.get("x-pod-name") or str(response.status)] += 1

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return served


async def test_failing_pods_draw_at_most_five_percent(failing: LocalStack) -> None:
    stack = failing
    bad = stack.pods[2].name
    async with aiohttp.ClientSession() as session:
        for strategy in registry.names():
            served = await burst(session, stack, strategy)
            failed = sum(n for who, n in served.items() if who == bad or who.isdigit())
            assert failed <= REQUESTS * 0.05, (strategy, served)
            assert sum(served.values()) == REQUESTS
        # Envoy said the dead pod could not be reached: it was ejected as unreachable.
        async with session.get(stack.metrics_url) as response:
            exposition = await response.text()
        assert 'extproc_pod_ejections_total{pod="dead",reason="unreachable"}' in exposition


async def test_an_ejected_pod_returns_once_it_recovers(failing: LocalStack) -> None:
    stack = failing
    bad = stack.pods[2]
    async with aiohttp.ClientSession() as session:
        await burst(session, stack, "least-request")  # it is out by now
        async with session.post(f"{bad.url}/sim/params", json={"error_rate": 0.0}) as reply:
            assert reply.status == 200  # it recovers

        async def serves_again() -> bool:
            served = await burst(session, stack, "least-request")
            return served[bad.name] > 0

        await eventually(serves_again, timeout=20.0, interval=0.5)
