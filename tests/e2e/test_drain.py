"""SIGTERM to a real ``extproc serve`` behind Envoy while streams are open: readiness drops at
once, every open stream finishes, and the process exits 0."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator

import aiohttp
import pytest

from extproc.devstack.stack import LocalStack, StackConfig

STREAMS = 20
DRAIN_SECONDS = 30.0


@pytest.fixture
def draining_stack() -> Iterator[LocalStack]:
    config = StackConfig(
        pods=2,
        models=("m1",),
        sim_defaults={"decode_time_base": 0.01},
        server_args=("--drain-seconds", str(DRAIN_SECONDS)),
    )
    with LocalStack(config) as running:
        yield running


async def readiness(session: aiohttp.ClientSession, stack: LocalStack) -> int | None:
    """``/readyz`` status, or ``None`` once the server no longer answers."""
    try:
        async with session.get(f"http://127.0.0.1:{stack.http_port}/readyz") as response:
            return response.status
    except aiohttp.ClientConnectionError:
        return None


async def test_sigterm_lets_open_streams_finish(draining_stack: LocalStack) -> None:
    stack = draining_stack
    server = stack.server
    assert server is not None and server.proc is not None
    body = {
        "model": "m1",
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "stream": True,
        "max_tokens": 150,
    }
    started = asyncio.Event()
    opened = 0

    async def stream(session: aiohttp.ClientSession) -> list[str]:
        nonlocal opened
        async with session.post(
            stack.gateway_url + "/v1/chat/completions",
            json=body,
            headers={"routing-strategy": "least-request"},
        ) as response:
            assert response.status == 200
            lines = [(await response.content.readline()).decode().strip()]
            opened += 1
            if opened == STREAMS:
                started.set()
            lines += [line.decode().strip() async for line in response.content if line.strip()]
            return lines

    async with aiohttp.ClientSession() as session:
        assert await readiness(session, stack) == 200
        streams = [asyncio.create_task(stream(session)) for _ in range(STREAMS)]
        await asyncio.wait_for(started.wait(), 15)

        signalled_at = time.monotonic()
        server.signal(signal.SIGTERM)
        statuses = []
        while not all(task.done() for task in streams):
            statuses.append(await readiness(session, stack))
            await asyncio.sleep(0.05)
        results = await asyncio.gather(*streams)

    # Readiness turned false while the streams were still open, and never came back.
    assert 503 in statuses, statuses
    assert 200 not in statuses[statuses.index(503) :], statuses
    for lines in results:
        assert lines[-1] == "data: [DONE]"
        assert len(lines) > 100  # every token arrived, not a cut-short stream
    code = await asyncio.to_thread(server.proc.wait, 20)
    assert code == 0, server.tail()
    # It left as soon as the streams were done, not at the end of the drain timeout.
    assert time.monotonic() - signalled_at < DRAIN_SECONDS
    assert "draining" in server.tail(50)


SHORT_DRAIN = 3.0


@pytest.fixture
def short_drain_stack() -> Iterator[LocalStack]:
    config = StackConfig(
        pods=1,
        models=("m1",),
        sim_defaults={"decode_time_base": 0.05},  # 2,000 tokens: far longer than the drain
        server_args=("--drain-seconds", str(SHORT_DRAIN)),
    )
    with LocalStack(config) as running:
        yield running


async def test_streams_longer_than_the_drain_are_cut_in_time_and_logged_as_cut(
    short_drain_stack: LocalStack,
) -> None:
    stack = short_drain_stack
    server = stack.server
    assert server is not None and server.proc is not None
    body = {
        "model": "m1",
        "messages": [{"role": "user", "content": "Tell me an endless story."}],
        "stream": True,
        "max_tokens": 2000,
    }
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            stack.gateway_url + "/v1/chat/completions",
            json=body,
            headers={"routing-strategy": "least-request", "x-request-id": "long-one"},
        ) as response,
    ):
        assert response.status == 200
        await response.content.readline()
        signalled_at = time.monotonic()
        server.signal(signal.SIGTERM)
        code = await asyncio.to_thread(server.proc.wait, 20)
        exited_after = time.monotonic() - signalled_at
    assert code == 0, server.tail()
    assert exited_after < SHORT_DRAIN, exited_after
    access = [line for line in server.tail(200).splitlines() if "long-one" in line]
    assert access and "status=cut" in access[-1], access
