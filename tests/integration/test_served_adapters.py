"""LoRA adapters as the pods report them: an adapter goes only to pods holding it now, one
unloaded stops receiving within one refresh (a documented 503, not the pod's 404), one loaded at
runtime starts, and a name nobody declares or holds is still a 404."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import orjson
import pytest

from extproc.app import Server
from extproc.fleet.registry import PodRegistry, PodSpec
from extproc.scraping.served_adapters import adapters_of
from extproc.vllm_sim import PodSpec as SimPodSpec
from extproc.vllm_sim import SimParams, SimulatorFleet
from tests import envoy_protocol as ep
from tests.helpers import eventually

MODEL = "base"


@pytest.fixture
async def fleet() -> AsyncIterator[SimulatorFleet]:
    params = SimParams(decode_time_base=0.001)
    specs = [
        SimPodSpec(name="a", model=MODEL, params=params, lora_modules={"sql": "/adapters/sql"}),
        SimPodSpec(name="b", model=MODEL, params=params),
    ]
    async with SimulatorFleet(specs) as running:
        yield running


@pytest.fixture
async def server(make_server: Callable[..., Any], fleet: SimulatorFleet) -> Server:
    # Discovery declares "sql" on both pods and "chat" on b; only a really holds sql.
    pods = [
        {
            "name": "a",
            "address": f"127.0.0.1:{fleet.pod('a').port}",
            "model": MODEL,
            "adapters": ["sql"],
        },
        {
            "name": "b",
            "address": f"127.0.0.1:{fleet.pod('b').port}",
            "model": MODEL,
            "adapters": ["sql", "chat"],
        },
    ]
    started: Server = await make_server(pods=pods, models_interval="0.1")
    return started


async def route(server: Server, model: str) -> tuple[str, dict[str, Any]]:
    """``(target pod or "", error)`` for one chat request naming ``model``."""
    body = orjson.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]})
    answers = await ep.run_stream(
        server.grpc_port,
        [ep.request_headers(headers={"routing-strategy": "random"}), ep.request_body(body)],
    )
    last = answers[-1]
    if last.HasField("immediate_response"):
        return "", orjson.loads(last.immediate_response.body)["error"]
    return ep.set_headers(last)["target-pod"], {}


def candidates(server: Server, model: str) -> list[str]:
    return sorted(pod.name for pod in server.registry.candidates(model))


async def test_adapters_follow_what_the_pods_hold(server: Server, fleet: SimulatorFleet) -> None:
    a, b = fleet.pod("a"), fleet.pod("b")
    await eventually(lambda: candidates(server, "sql") == ["a"], what="b's report read")
    for _ in range(6):
        assert (await route(server, "sql"))[0] == f"127.0.0.1:{a.port}"

    # "chat" is declared on b but loaded nowhere: known, so a 503 at once, not the pod's 404.
    await eventually(lambda: candidates(server, "chat") == [])
    target, error = await route(server, "chat")
    assert target == "" and error["code"] == "adapter_not_loaded"
    assert "chat" in error["message"] and MODEL in error["message"]

    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{a.url}/v1/unload_lora_adapter", json={"lora_name": "sql"}
        ) as response:
            assert response.status == 200
        await eventually(lambda: candidates(server, "sql") == [], what="unload seen")
        assert (await route(server, "sql"))[1]["code"] == "adapter_not_loaded"

        async with session.post(
            f"{b.url}/v1/load_lora_adapter", json={"lora_name": "sql", "lora_path": "/x/sql"}
        ) as response:
            assert response.status == 200
        await eventually(lambda: candidates(server, "sql") == ["b"], what="load seen")
        assert (await route(server, "sql"))[0] == f"127.0.0.1:{b.port}"

        # An adapter loaded at runtime that discovery never declared is served too.
        async with session.post(
            f"{a.url}/v1/load_lora_adapter", json={"lora_name": "fresh", "lora_path": "/x/f"}
        ) as response:
            assert response.status == 200
    await eventually(lambda: candidates(server, "fresh") == ["a"], what="new adapter seen")
    model = server.registry.model("fresh")
    assert model is not None and model.parent == MODEL
    assert (await route(server, "nobody-has-this"))[1]["code"] == "model_not_found"


def test_model_lists_and_reports() -> None:
    listing = {
        "object": "list",
        "data": [
            {"id": "base", "root": "/m", "parent": None},
            {"id": "sql", "root": "/adapters/sql", "parent": "base"},
        ],
    }
    assert adapters_of(orjson.dumps(listing)) == {"sql": "/adapters/sql"}
    assert adapters_of(b'{"data": [{"id": "q", "parent": "base"}]}') == {"q": ""}
    assert adapters_of(b"not json") is None
    assert adapters_of(b'{"detail": "Not Found"}') is None
    assert adapters_of(b'{"data": []}') == {}

    registry = PodRegistry()
    registry.replace_all([PodSpec("p", "127.0.0.1:1", "base", adapters=frozenset({"x"}))])
    assert [p.name for p in registry.candidates("x")] == ["p"]
    assert registry.adapter_path("p", "x") is None  # declared, the path not known
    registry.report_adapters("p", {"y": "/a/y"})
    assert registry.candidates("x") == () and registry.knows_model("x")
    assert [p.name for p in registry.candidates("y")] == ["p"]
    assert registry.adapter_path("p", "y") == "/a/y"
    registry.report_adapters("p", None)  # forgotten: back to what discovery declared
    assert [p.name for p in registry.candidates("x")] == ["p"]
    assert registry.adapter_path("p", "y") is None
    registry.report_adapters("gone", {"z": "/z"})  # not a pod: ignored
    assert not registry.knows_model("z")
