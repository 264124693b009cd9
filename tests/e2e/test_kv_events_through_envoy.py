"""Exact prefix matching from the pods' KV-cache events, through a real Envoy in front of two
server replicas: blocks a pod announces attract requests to it before any were routed there,
from whichever replica Envoy picks; blocks it drops stop attracting them; a restarted pod's
entries are gone from both replicas.

The pods run in this process (so a test can restart one); Envoy and the two servers are the
local stack's processes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import grpc
import orjson
import pytest

from extproc.debug.v1 import debug_pb2 as pb
from extproc.debug.v1.debug_pb2_grpc import RouterDebugStub
from extproc.devstack.processes import free_port
from extproc.devstack.stack import LocalStack, StackConfig
from extproc.vllm_sim import PodSpec, SimParams, SimulatorFleet
from tests.e2e.conftest import metric_samples
from tests.helpers import eventually

MODEL = "m"
PROMPT = list(range(1000, 1100))
"""100 token ids: six full 16-token blocks."""
BLOCKS = 6


@dataclass
class Gateway:
    fleet: SimulatorFleet
    stack: LocalStack

    async def pods(self, replica: int) -> dict[str, pb.Pod]:
        port = self.stack.grpc_ports[replica]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = await RouterDebugStub(channel).ListPods(pb.ListPodsRequest(), timeout=5)
        return {pod.name: pod for pod in reply.pods}

    async def held(self, pod: str) -> list[int]:
        """The blocks each replica's index says ``pod`` holds."""
        return [(await self.pods(r))[pod].kv_events.blocks for r in range(2)]

    async def matched(self, prompt: list[int]) -> list[dict[str, int]]:
        """Per replica, the prompt tokens each pod is known to hold (a dry run)."""
        body = orjson.dumps({"model": MODEL, "prompt": prompt}).decode()
        request = pb.ExplainRequest(path="/v1/completions", body=body, strategy="prefix-cache")
        found = []
        for port in self.stack.grpc_ports:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                reply = await RouterDebugStub(channel).Explain(request, timeout=5)
            assert all(c.prefix_precise for c in reply.candidates)
            found.append({c.pod: c.prefix_match_tokens for c in reply.candidates})
        return found

    async def routed(self, session: aiohttp.ClientSession, prompt: list[int]) -> str:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 1}
        async with session.post(
            self.stack.gateway_url + "/v1/completions",
            json=body,
            headers={"routing-strategy": "prefix-cache"},
        ) as response:
            assert response.status == 200, await response.text()
            await response.read()
            return response.headers["x-pod-name"]


@pytest.fixture
async def gateway() -> AsyncIterator[Gateway]:
    params = SimParams(decode_time_base=0.001, block_size=16, kv_events=True)
    specs = [
        PodSpec(name=name, model=MODEL, params=params.replace({"kv_events_port": free_port()}))
        for name in ("a", "b", "c")
    ]
    async with SimulatorFleet(specs) as fleet:
        config = StackConfig(
            pods=0,
            models=(MODEL,),
            replicas=2,
            server_args=("--tokenizer", "remote", "--scrape-interval", "50ms"),
            extra_pods=[
                {
                    "name": pod.name,
                    "address": f"127.0.0.1:{pod.port}",
                    "model": MODEL,
                    "kv_events": "auto",
                }
                for pod in fleet
            ],
        )
        # The pods answer from this event loop while the stack's processes start.
        stack = await asyncio.to_thread(LocalStack(config).start)
        try:
            running = Gateway(fleet, stack)

            async def following() -> bool:
                for replica in range(2):
                    pods = (await running.pods(replica)).values()
                    if len(pods) != 3 or not all(p.kv_events.precise for p in pods):
                        return False
                return True

            await eventually(
                following, timeout=20, what="both replicas follow every pod", interval=0.1
            )
            yield running
        finally:
            await asyncio.to_thread(stack.stop)


async def complete_on(url: str, prompt: list[int]) -> None:
    """Straight to the pod, past the gateway: the servers route nothing there."""
    async with aiohttp.ClientSession() as session:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 1}
        async with session.post(f"{url}/v1/completions", json=body) as response:
            assert response.status == 200


async def test_announced_blocks_attract_from_both_replicas_and_dropped_ones_stop(
    gateway: Gateway,
) -> None:
    b = gateway.fleet.pod("b")
    await complete_on(b.url, PROMPT)

    async def both_know() -> bool:
        return all(n >= BLOCKS for n in await gateway.held("b"))

    await eventually(both_know, what="b's blocks in both replicas", interval=0.1)
    async with aiohttp.ClientSession() as session:
        served = [await gateway.routed(session, [*PROMPT, 7, i]) for i in range(8)]
    assert served == ["b"] * 8
    per_replica = [
        sum((await metric_samples(gateway.stack, "extproc_requests_total", url)).values())
        for url in gateway.stack.metrics_urls
    ]
    assert all(n >= 1 for n in per_replica), per_replica  # both replicas routed, and agreed

    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{b.url}/reset_prefix_cache") as response,
    ):
        assert response.status == 200
    await complete_on(b.url, [7, 8, 9])  # an engine step publishes the reset

    async def both_forgot() -> bool:
        return await gateway.held("b") == [0, 0]

    await eventually(both_forgot, what="b's blocks dropped in both replicas", interval=0.1)
    assert all(m["b"] == 0 for m in await gateway.matched(PROMPT))


async def test_a_restarted_pod_is_forgotten_by_both_replicas(gateway: Gateway) -> None:
    c = gateway.fleet.pod("c")
    await complete_on(c.url, PROMPT)

    async def both_know() -> bool:
        return all(m["c"] == BLOCKS * 16 for m in await gateway.matched(PROMPT))

    await eventually(both_know, what="c's prefix in both replicas", interval=0.1)
    await c.stop()
    await c.start()  # same ports, an empty cache, event sequence numbers from 0

    async def both_resynced() -> bool:
        for replica in range(2):
            events = (await gateway.pods(replica))["c"].kv_events
            if not (events.connected and events.resyncs >= 1 and events.blocks == 0):
                return False
        return True

    await eventually(both_resynced, timeout=20, what="both replicas resynced c", interval=0.1)
    assert all(m["c"] == 0 for m in await gateway.matched(PROMPT))
    async with aiohttp.ClientSession() as session:
        await gateway.routed(session, PROMPT)  # still served, by whichever pod
