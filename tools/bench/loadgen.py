"""A small closed-loop HTTP load generator that records per-request latency and TTFT."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson


@dataclass(slots=True)
class Sample:
    status: int
    latency: float
    ttft: float
    pod: str = ""
    error: str = ""


@dataclass
class Run:
    samples: list[Sample] = field(default_factory=list)
    wall_seconds: float = 0.0

    def ok(self) -> list[Sample]:
        return [s for s in self.samples if s.status == 200 and not s.error]

    def errors(self) -> int:
        return len(self.samples) - len(self.ok())


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


RequestFactory = Callable[[int], tuple[str, Mapping[str, Any], Mapping[str, str]]]
"""``i -> (url, json body, headers)`` for the i-th request."""


async def one(
    session: aiohttp.ClientSession, url: str, body: Mapping[str, Any], headers: Mapping[str, str]
) -> Sample:
    data = orjson.dumps(body)
    started = time.perf_counter()
    ttft = 0.0
    try:
        async with session.post(
            url, data=data, headers={"content-type": "application/json", **headers}
        ) as response:
            if body.get("stream"):
                async for _ in response.content.iter_any():
                    if not ttft:
                        ttft = time.perf_counter() - started
            else:
                await response.read()
                ttft = time.perf_counter() - started
            latency = time.perf_counter() - started
            return Sample(response.status, latency, ttft, response.headers.get("x-pod-name", ""))
    except (aiohttp.ClientError, TimeoutError) as exc:
        return Sample(0, time.perf_counter() - started, 0.0, error=type(exc).__name__)


async def closed_loop(
    factory: RequestFactory,
    count: int,
    concurrency: int,
    progress: Callable[[], None] | None = None,
) -> Run:
    """``count`` requests with ``concurrency`` workers, each sending its next when one ends."""
    run = Run()
    next_index = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def worker() -> None:
            nonlocal next_index
            while next_index < count:
                index = next_index
                next_index += 1
                url, body, headers = factory(index)
                run.samples.append(await one(session, url, body, headers))
                if progress is not None:
                    progress()

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        run.wall_seconds = time.perf_counter() - started
    return run


async def poisson(
    factory: RequestFactory,
    count: int,
    rate: float,
    seed: int = 0,
    progress: Callable[[], None] | None = None,
) -> Run:
    """``count`` requests with exponential inter-arrival times at ``rate`` per second."""
    import random

    rng = random.Random(seed)
    run = Run()
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def send(index: int) -> None:
            url, body, headers = factory(index)
            run.samples.append(await one(session, url, body, headers))
            if progress is not None:
                progress()

        started = time.perf_counter()
        tasks = []
        for index in range(count):
            tasks.append(asyncio.create_task(send(index)))
            await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*tasks)
        run.wall_seconds = time.perf_counter() - started
    return run
