"""Exact prefix matching from simulated pods' KV-cache events, over gRPC: blocks a pod
announces attract a request to it before any traffic was routed there, blocks it removes stop
attracting it, and a restarted pod's entries are dropped."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import orjson
import pytest

from extproc.app import Server
from extproc.devstack.processes import free_port
from extproc.vllm_sim import PodSpec, SimParams, SimulatorFleet
from tests import envoy_protocol as ep
from tests.envoy_protocol import Stream
from tests.helpers import eventually

MODEL = "m"
PROMPT = list(range(1000, 1100))  # 100 token ids: six full 16-token blocks


@pytest.fixture
async def fleet() -> AsyncIterator[SimulatorFleet]:
    params = SimParams(decode_time_base=0.001, block_size=16, kv_events=True)
    specs = [
        PodSpec(
            name=name,
            model=MODEL,
            params=params.replace({"kv_events_port": free_port()}),
        )
        for name in ("a", "b", "c")
    ]
    async with SimulatorFleet(specs) as running:
        yield running


@pytest.fixture
async def server(make_server: Callable[..., Any], fleet: SimulatorFleet) -> Server:
    pods = [
        {"name": p.name, "address": f"127.0.0.1:{p.port}", "model": MODEL, "kv_events": "auto"}
        for p in fleet
    ]
    started: Server = await make_server(pods=pods, tokenizer="remote", scrape_interval="50ms")
    await eventually(
        lambda: (
            all(s.connected for s in started.kv_events.states.values())
            and len(started.kv_events.states) == 3
        ),
        timeout=10,
    )
    await eventually(lambda: all(started.readings.get(p.name) for p in fleet), timeout=10)
    return started


async def routed_to(server: Server, prompt: list[int]) -> str:
    stream = Stream(server.grpc_port)
    try:
        await stream.send(
            ep.request_headers(path="/v1/completions", headers={"routing-strategy": "prefix-cache"})
        )
        await stream.read()
        body = orjson.dumps({"model": MODEL, "prompt": prompt, "max_tokens": 1})
        await stream.send(ep.request_body(body))
        (answer,) = await stream.read()
        return ep.set_headers(answer)["target-pod"]
    finally:
        await stream.close()


async def complete_on(url: str, prompt: list[int]) -> None:
    async with aiohttp.ClientSession() as session:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 1}
        async with session.post(f"{url}/v1/completions", json=body) as response:
            assert response.status == 200


def held(server: Server, pod: str) -> int:
    return server.kv_events.index.held(pod)


async def test_announced_blocks_attract_and_removed_ones_stop(
    fleet: SimulatorFleet, server: Server
) -> None:
    b = fleet.pod("b")
    await complete_on(b.url, PROMPT)  # straight to pod b: the server routed nothing there
    await eventually(lambda: held(server, "b") >= 6)
    exported = server.telemetry.render().decode()
    size = float(len(server.kv_events.index))
    assert f'extproc_prefix_index_blocks{{index="exact"}} {size}' in exported
    assert await routed_to(server, PROMPT) == f"127.0.0.1:{b.port}"
    # b drops its cache: the next engine step announces it, and b attracts nothing more
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{b.url}/reset_prefix_cache") as response,
    ):
        assert response.status == 200
    await complete_on(b.url, [7, 8, 9])  # a step, for the reset to be published
    await eventually(lambda: held(server, "b") == 0)


async def test_a_restarted_pod_starts_with_nothing(fleet: SimulatorFleet, server: Server) -> None:
    c = fleet.pod("c")
    await complete_on(c.url, PROMPT)
    await eventually(lambda: held(server, "c") >= 6)
    state = server.kv_events.states["c"]
    await c.stop()
    await eventually(lambda: not state.connected)
    await c.start()  # same ports, a fresh cache, sequence numbers from 0
    # Back: what the index knew of c is dropped (events sent while we were away are lost to
    # a subscriber without the pod's replay endpoint).
    await eventually(lambda: state.connected and state.resyncs >= 1, timeout=10)
    assert held(server, "c") == 0
    await complete_on(c.url, list(range(5000, 5040)))
    await eventually(lambda: held(server, "c") >= 2, timeout=10)
    hasher = server.kv_events.hasher("c", 0.0)
    assert hasher is not None
    assert server.kv_events.index.leading(hasher.hashes(PROMPT), ["c"]) == [0]


async def test_the_debug_api_shows_exact_matching(fleet: SimulatorFleet, server: Server) -> None:
    import grpc

    from extproc.debug.v1 import debug_pb2 as pb
    from extproc.debug.v1.debug_pb2_grpc import RouterDebugStub

    a = fleet.pod("a")
    await complete_on(a.url, PROMPT)
    await eventually(lambda: held(server, "a") >= 6)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = RouterDebugStub(channel)
        pods = {p.name: p for p in (await stub.ListPods(pb.ListPodsRequest())).pods}
        events = pods["a"].kv_events
        assert events.connected and events.precise and events.blocks >= 6
        assert events.block_size == 16 and events.messages >= 1 and events.HasField("lag_seconds")
        explained = await stub.Explain(
            pb.ExplainRequest(
                path="/v1/completions",
                body=orjson.dumps({"model": MODEL, "prompt": PROMPT}).decode(),
                strategy="prefix-cache",
            )
        )
    by_pod = {c.pod: c for c in explained.candidates}
    assert explained.pod == "a"
    assert by_pod["a"].prefix_precise and by_pod["a"].prefix_match_tokens == 96
    assert all(c.prefix_precise for c in explained.candidates)
