"""A new user's setup: the Envoy configuration docs/envoy.md shows written by hand (ext_proc on
127.0.0.1, an ORIGINAL_DST cluster on ``target-pod``, response body NONE), ``extproc serve
--config pods.yaml`` and upstreams that are not the simulator (plain HTTP servers without
/metrics)."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from extproc.devstack.processes import Managed, bin_path, free_port

DOC = Path(__file__).resolve().parents[2] / "docs" / "envoy.md"
MARKER = "<!-- hand-written envoy.yaml -->"
DOC_PORTS = {"gateway": 8888, "grpc": 50052, "admin": 9901}


def hand_written(ports: dict[str, int]) -> dict[str, Any]:
    """The configuration docs/envoy.md shows, with its ports replaced by ``ports``."""
    text = DOC.read_text()
    block = text[text.index(MARKER) :].split("```yaml\n", 1)[1].split("```", 1)[0]
    config: dict[str, Any] = yaml.safe_load(block)
    by_port = {DOC_PORTS[name]: port for name, port in ports.items()}

    def renumber(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("port_value") in by_port:
                node["port_value"] = by_port[node["port_value"]]
            for value in node.values():
                renumber(value)
        elif isinstance(node, list):
            for item in node:
                renumber(item)

    renumber(config)
    return config


async def plain_upstream(name: str) -> tuple[web.AppRunner, int]:
    """An OpenAI-ish server that is not the simulator: no /metrics, no x-pod-name."""

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response(
            {
                "served_by": name,
                "model": body["model"],
                "choices": [{"message": {"role": "assistant", "content": "ok"}}],
            }
        )

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


@pytest.fixture
async def by_hand(tmp_path: Path) -> AsyncIterator[str]:
    upstreams = [await plain_upstream(f"up-{i}") for i in range(2)]
    (tmp_path / "pods.yaml").write_text(
        yaml.safe_dump(
            {
                "pods": [
                    {"name": f"up-{i}", "address": f"127.0.0.1:{port}", "model": "my-model"}
                    for i, (_, port) in enumerate(upstreams)
                ]
            }
        )
    )
    gateway, grpc, http, admin = free_port(), free_port(), free_port(), free_port()
    config = hand_written({"gateway": gateway, "grpc": grpc, "admin": admin})
    (tmp_path / "envoy.yaml").write_text(yaml.safe_dump(config))
    server = Managed(
        "extproc",
        [
            bin_path("extproc"),
            "serve",
            "--config",
            str(tmp_path / "pods.yaml"),
            "--port",
            str(grpc),
            "--http-port",
            str(http),
            "--users-port",
            str(free_port()),
        ],
        tmp_path / "extproc.log",
    ).start()
    envoy = Managed(
        "envoy",
        [
            bin_path("envoy"),
            "-c",
            str(tmp_path / "envoy.yaml"),
            "--disable-hot-restart",
            "-l",
            "warning",
        ],
        tmp_path / "envoy.log",
    ).start()
    try:
        await asyncio.to_thread(server.wait_http, f"http://127.0.0.1:{http}/readyz")
        await asyncio.to_thread(envoy.wait_http, f"http://127.0.0.1:{admin}/ready")
        yield f"http://127.0.0.1:{gateway}"
    finally:
        envoy.stop()
        server.stop()
        for runner, _ in upstreams:
            await runner.cleanup()


async def test_a_hand_written_envoy_routes_to_pods_that_are_not_the_simulator(by_hand: str) -> None:
    body = {"model": "my-model", "messages": [{"role": "user", "content": "Say this is a test!"}]}
    served: Counter[str] = Counter()
    async with aiohttp.ClientSession() as session:
        for _ in range(12):
            async with session.post(
                by_hand + "/v1/chat/completions", json=body, headers={"routing-strategy": "random"}
            ) as response:
                assert response.status == 200, await response.text()
                answer = await response.json()
                assert response.headers["target-pod"] == answer["served_by"]
                served[answer["served_by"]] += 1
        async with session.post(
            by_hand + "/v1/chat/completions",
            json={**body, "model": "nope"},
            headers={"routing-strategy": "least-kv-cache"},
        ) as response:
            assert response.status == 404
            assert json.loads(await response.read())["error"]["code"] == "model_not_found"
        # a metrics strategy facing pods without /metrics falls back, never fails
        async with session.post(
            by_hand + "/v1/chat/completions",
            json=body,
            headers={"routing-strategy": "least-latency"},
        ) as response:
            assert response.status == 200
        # without a strategy nothing names a pod, and this configuration has no route by model
        async with session.post(by_hand + "/v1/chat/completions", json=body) as response:
            assert response.status == 404
    assert set(served) == {"up-0", "up-1"}
