"""The ``remote`` tokenizer against a simulated pod's vLLM ``/tokenize``: exact tokens, cached,
and the character fallback when the pod is slow, gone, or not there."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from extproc.devstack.processes import free_port
from extproc.fleet.registry import PodRegistry
from extproc.fleet.registry import PodSpec as Discovered
from extproc.prefix.producer import rotating_pod_url
from extproc.prefix.tokenizers import RemoteTokenizer
from extproc.routing.openai_request import Endpoint, InferenceRequest
from extproc.vllm_sim import PodSpec, SimParams, SimulatorFleet


@pytest.fixture
async def pod() -> AsyncIterator[SimulatorFleet]:
    async with SimulatorFleet([PodSpec(name="tok", model="m", params=SimParams())]) as fleet:
        yield fleet


def chat(*turns: tuple[str, str]) -> InferenceRequest:
    return InferenceRequest(endpoint=Endpoint.CHAT, model="m", messages=list(turns))


async def test_tokens_come_from_the_pod_and_are_cached(pod: SimulatorFleet) -> None:
    calls: list[str] = []

    def url(model: str) -> str:
        calls.append(model)
        return pod[0].url

    tokenizer = RemoteTokenizer(url, timeout=2.0)
    try:
        first = await tokenizer.tokenize("m", chat(("user", "hello there, how are you")))
        again = await tokenizer.tokenize("m", chat(("user", "hello there, how are you")))
        prompt = InferenceRequest(endpoint=Endpoint.COMPLETIONS, model="m", text="plain text")
        text = await tokenizer.tokenize("m", prompt)
    finally:
        await tokenizer.close()
    assert first.source == "remote" and first.width == 4 and len(first.data) > 0
    assert again.data == first.data
    assert calls == ["m", "m"]  # the second chat prompt came from the cache
    assert text.source == "remote"


@pytest.fixture
async def hung_url() -> AsyncIterator[str]:
    """A loopback /tokenize that never answers."""
    stop = asyncio.Event()

    async def tokenize(_: web.Request) -> web.Response:
        await stop.wait()
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/tokenize", tokenize)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}"
    stop.set()
    await runner.cleanup()


async def test_failures_fall_back_to_characters(hung_url: str) -> None:
    request = chat(("user", "hello"))
    nowhere = RemoteTokenizer(lambda model: None, timeout=1.0)
    refused = RemoteTokenizer(lambda model: f"http://127.0.0.1:{free_port()}", timeout=1.0)
    hung = RemoteTokenizer(lambda model: hung_url, timeout=0.05)
    try:
        for tokenizer in (nowhere, refused, hung):
            stream = await tokenizer.tokenize("m", request)
            assert stream.source == "character" and stream.width == 1
    finally:
        for tokenizer in (nowhere, refused, hung):
            await tokenizer.close()


async def test_token_id_prompts_need_no_call() -> None:
    tokenizer = RemoteTokenizer(lambda model: pytest.fail("no call expected"), timeout=1.0)
    request = InferenceRequest(endpoint=Endpoint.COMPLETIONS, model="m", token_ids=[5, 6, 7])
    stream = await tokenizer.tokenize("m", request)
    assert stream.source == "remote" and len(stream.data) == 12


def test_calls_take_the_models_pods_in_turn() -> None:
    registry = PodRegistry()
    registry.replace_all(
        [
            Discovered("a", "127.0.0.1:1001", "m"),
            Discovered("b", "127.0.0.1:1002", "m"),
            Discovered("c", "127.0.0.1:1003", "other"),
            Discovered("d", "127.0.0.1:1004", "m", ready=False),
        ]
    )
    url = rotating_pod_url(registry)
    asked = {url("m") for _ in range(4)}
    assert asked == {"http://127.0.0.1:1001", "http://127.0.0.1:1002"}
    assert url("nobody-serves-this") is None
