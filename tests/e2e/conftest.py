"""The local stack (simulated pods, ``extproc serve``, a real Envoy) as test fixtures."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from extproc.devstack.processes import free_port
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
        max_body_bytes=65536,
        server_args=(
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


async def metric_samples(stack: LocalStack, name: str, url: str | None = None) -> dict[str, float]:
    """``{label-string: value}`` for one metric family on the server's /metrics (``url``: one
    replica's of ``stack.metrics_urls``)."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(url or stack.metrics_url) as response,
    ):
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


def stream_bytes(size: int) -> bytes:
    """``size`` bytes of server-sent events, deterministic (what a fake pod streams back)."""
    line = b'data: {"choices":[{"delta":{"content":"0123456789abcdef"}}]}\n\n'
    return (line * (size // len(line) + 1))[:size]


class FakePods:
    """OpenAI-ish upstreams that are not the simulator, each on a free loopback port.

    A POST is answered with its own body, byte for byte (``x-pod-name`` names the pod and
    ``x-destination`` repeats the ``x-gateway-destination-endpoint`` it arrived with); a JSON
    body with ``"stream": true`` is answered with ``stream_bytes(max_tokens)`` in uneven chunks.
    Every request is recorded in ``hits`` as (pod name, path, destination header)."""

    def __init__(self) -> None:
        self.runners: list[web.AppRunner] = []
        self.addresses: dict[str, str] = {}
        self.hits: list[tuple[str, str, str]] = []

    async def start(self, *names: str) -> FakePods:
        for name in names:
            app = web.Application(client_max_size=64 * 1024 * 1024)
            app.router.add_route("*", "/{tail:.*}", self._handler(name))
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            port = free_port()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            self.runners.append(runner)
            self.addresses[name] = f"127.0.0.1:{port}"
        return self

    def _handler(self, name: str) -> Any:
        async def handle(request: web.Request) -> web.StreamResponse:
            if request.path == "/metrics":
                return web.Response(status=404)
            destination = request.headers.get("x-gateway-destination-endpoint", "")
            self.hits.append((name, request.path, destination))
            body = await request.read()
            headers = {"x-pod-name": name, "x-destination": destination}
            try:
                document = json.loads(body)
            except ValueError:
                document = None
            if isinstance(document, dict) and document.get("stream") is True:
                response = web.StreamResponse(
                    headers={**headers, "content-type": "text/event-stream"}
                )
                await response.prepare(request)
                data = stream_bytes(int(document.get("max_tokens", 1024)))
                offset, step = 0, 1000
                while offset < len(data):
                    await response.write(data[offset : offset + step])
                    offset += step
                    step = step * 3 % 70001 + 1
                await response.write_eof()
                return response
            return web.Response(body=body, headers=headers, content_type="application/json")

        return handle

    def pods(self, model: str, **extra: Any) -> list[dict[str, Any]]:
        """Static pod file entries for every fake pod."""
        return [
            {"name": name, "address": address, "model": model, **extra}
            for name, address in self.addresses.items()
        ]

    async def stop(self) -> None:
        for runner in self.runners:
            await runner.cleanup()


def dead_address() -> str:
    """A loopback address nothing listens on (connections are refused)."""
    return f"127.0.0.1:{free_port()}"
