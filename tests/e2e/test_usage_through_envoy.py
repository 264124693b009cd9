"""Exact token usage for every response shape, through a real Envoy, without changing what the
client receives: a TPM user's streamed request that did not ask for usage is sent to the pod
asking for it, and the usage event is taken out of the stream again.

The pod here is a plain HTTP server written for the test: it answers the same bytes every time
(with a usage event only when the request asks for one), so the client's bytes can be compared
with what the pod would have sent it directly."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from extproc.devstack.processes import free_port
from extproc.devstack.stack import LocalStack, StackConfig

USAGE = {"prompt_tokens": 37, "completion_tokens": 5, "total_tokens": 42}


def events(kind: str, with_usage: bool) -> bytes:
    """The pod's stream: several tokens per event (as vLLM coalesces them), usage on demand."""
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def chunk(choices: list[Any], **extra: Any) -> bytes:
        body = {"id": "cmpl-1", "object": obj, "created": 1, "model": "m-fake", "choices": choices}
        return b"data: " + json.dumps({**body, **extra}, separators=(",", ":")).encode() + b"\n\n"

    if kind == "chat":
        parts = [chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}}])]
        parts += [chunk([{"index": 0, "delta": {"content": t}}]) for t in ("Hel lo", " wor", "ld")]
    else:
        parts = [chunk([{"index": 0, "text": t}]) for t in ("Hel lo", " wor", "ld")]
    if with_usage:
        parts.append(chunk([], usage=USAGE))
    return b"".join(parts) + b"data: [DONE]\n\n"


def plain(kind: str) -> bytes:
    obj = "chat.completion" if kind == "chat" else "text_completion"
    return json.dumps({"id": "x", "object": obj, "choices": [], "usage": USAGE}).encode()


class FakePod:
    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.port = free_port()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        document = await request.json()  # fails if content-length and body disagree
        self.received.append(document)
        kind = "chat" if request.path.endswith("chat/completions") else "completions"
        if not document.get("stream"):
            return web.Response(body=plain(kind), content_type="application/json")
        asked = bool((document.get("stream_options") or {}).get("include_usage"))
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        data = events(kind, asked)
        for start in range(0, len(data), 37):  # chunk boundaries inside events, on purpose
            await response.write(data[start : start + 37])
        await response.write_eof()
        return response


@pytest.fixture(scope="module")
def fake_pod() -> Iterator[FakePod]:
    import asyncio
    import threading

    pod = FakePod()
    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", pod.handle)
    app.router.add_post("/v1/completions", pod.handle)
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", pod.port).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield pod
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


@pytest.fixture(scope="module")
def stack(fake_pod: FakePod) -> Iterator[LocalStack]:
    config = StackConfig(
        pods=0,
        models=("m-fake",),
        extra_pods=[{"name": "fake", "address": f"127.0.0.1:{fake_pod.port}", "model": "m-fake"}],
        server_args=("--unknown-user-policy", "default-limits", "--default-tpm", "100000"),
    )
    with LocalStack(config) as running:
        yield running


async def charged(session: aiohttp.ClientSession, stack: LocalStack) -> float:
    async with session.get(stack.metrics_url) as response:
        text = await response.text()
    for line in text.splitlines():
        if line.startswith('extproc_ratelimit_charged_tokens_total{source="reported"}'):
            return float(line.split()[-1])
    return 0.0


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.mark.parametrize("kind", ["chat", "completions"])
@pytest.mark.parametrize("shape", ["plain", "stream-with-usage", "stream-without-usage"])
async def test_usage_is_exact_and_the_client_gets_what_it_asked_for(
    stack: LocalStack, fake_pod: FakePod, session: aiohttp.ClientSession, kind: str, shape: str
) -> None:
    body: dict[str, Any] = {"model": "m-fake", "max_tokens": 5}
    if kind == "chat":
        body["messages"] = [{"role": "user", "content": "Say hello"}]
        path = "/v1/chat/completions"
    else:
        body["prompt"] = "Say hello"
        path = "/v1/completions"
    if shape != "plain":
        body["stream"] = True
    if shape == "stream-with-usage":
        body["stream_options"] = {"include_usage": True}
    before = await charged(session, stack)
    async with session.post(
        stack.gateway_url + path,
        json=body,
        headers={"user": "someone", "routing-strategy": "least-request"},
    ) as response:
        assert response.status == 200
        received = await response.read()
    expected = {
        "plain": plain(kind),
        "stream-with-usage": events(kind, with_usage=True),
        "stream-without-usage": events(kind, with_usage=False),
    }[shape]
    assert received == expected
    # the pod was asked for usage whenever the stream would not have carried it
    sent = fake_pod.received[-1]
    if shape != "plain":
        assert sent["stream_options"]["include_usage"] is True
    assert {k: v for k, v in sent.items() if k != "stream_options"} == {
        k: v for k, v in body.items() if k != "stream_options"
    }
    await _eventually_charged(session, stack, before + USAGE["total_tokens"])


async def _eventually_charged(
    session: aiohttp.ClientSession, stack: LocalStack, expected: float
) -> None:
    from tests.helpers import eventually

    async def done() -> bool:
        return await charged(session, stack) == expected

    await eventually(done, timeout=5.0)
