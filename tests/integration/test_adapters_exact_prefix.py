"""A LoRA adapter's prompt matched exactly from simulated pods' KV-cache events, over gRPC: the
pod hashes the adapter's name and the path it loaded it from into every block, and the server
names the prompt's blocks with the path each pod reported in its /v1/models."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import grpc
import orjson
import pytest

from extproc.app import Server
from extproc.debug.v1 import debug_pb2 as pb
from extproc.debug.v1.debug_pb2_grpc import RouterDebugStub
from extproc.devstack.processes import free_port
from extproc.vllm_sim import PodSpec, SimParams, SimulatorFleet
from tests.helpers import eventually

MODEL = "m"
ADAPTER = "sql"
PATHS = {"a": "/adapters/sql", "b": "/mnt/other/./sql/"}
PROMPT = list(range(2000, 2100))  # 100 token ids: six full 16-token blocks


@pytest.fixture
async def fleet() -> AsyncIterator[SimulatorFleet]:
    params = SimParams(decode_time_base=0.001, block_size=16, kv_events=True)
    specs = [
        PodSpec(
            name=name,
            model=MODEL,
            params=params.replace({"kv_events_port": free_port()}),
            lora_modules={ADAPTER: path},
        )
        for name, path in PATHS.items()
    ]
    async with SimulatorFleet(specs) as running:
        yield running


@pytest.fixture
async def server(make_server: Callable[..., Any], fleet: SimulatorFleet) -> Server:
    pods = [
        {
            "name": p.name,
            "address": f"127.0.0.1:{p.port}",
            "model": MODEL,
            "adapters": [ADAPTER],
            "kv_events": "auto",
        }
        for p in fleet
    ]
    started: Server = await make_server(
        pods=pods, tokenizer="remote", scrape_interval="50ms", models_interval="0.1"
    )
    await eventually(
        lambda: (
            len(started.kv_events.states) == 2
            and all(s.connected for s in started.kv_events.states.values())
        ),
        timeout=10,
    )
    await eventually(lambda: all(started.readings.get(p.name) for p in fleet), timeout=10)
    await eventually(
        lambda: all(started.registry.adapter_path(n, ADAPTER) == p for n, p in PATHS.items()),
        what="both pods' /v1/models read",
    )
    return started


async def complete_on(url: str, model: str) -> None:
    async with aiohttp.ClientSession() as session:
        body = {"model": model, "prompt": PROMPT, "max_tokens": 1}
        async with session.post(f"{url}/v1/completions", json=body) as response:
            assert response.status == 200


async def explain(server: Server, model: str) -> pb.ExplainResponse:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        answer: pb.ExplainResponse = await RouterDebugStub(channel).Explain(
            pb.ExplainRequest(
                path="/v1/completions",
                body=orjson.dumps({"model": model, "prompt": PROMPT}).decode(),
                strategy="prefix-cache",
            )
        )
    return answer


async def test_an_adapters_blocks_attract_its_requests_exactly(
    fleet: SimulatorFleet, server: Server
) -> None:
    b = fleet.pod("b")
    await complete_on(b.url, ADAPTER)  # straight to b: the server routed nothing there
    await eventually(lambda: server.kv_events.index.held("b") >= 6)

    answer = await explain(server, ADAPTER)
    by_pod = {c.pod: c for c in answer.candidates}
    assert answer.pod == "b"
    assert by_pod["b"].prefix_precise and by_pod["b"].prefix_match_tokens == 96
    assert by_pod["a"].prefix_precise and by_pod["a"].prefix_match_tokens == 0

    # The base model's blocks for the same tokens are other blocks: b holds none of them.
    answer = await explain(server, MODEL)
    by_pod = {c.pod: c for c in answer.candidates}
    assert by_pod["b"].prefix_precise and by_pod["b"].prefix_match_tokens == 0
