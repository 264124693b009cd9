"""Through a real Envoy: long prompts stick to the pod that cached them, different prefixes
spread, and a pod that leaves takes its index entries with it."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator

import aiohttp
import pytest

from extproc.config import ScrapingSettings
from extproc.devstack.stack import LocalStack, StackConfig
from tests.e2e.conftest import metric_samples, served_by
from tools.bench.workloads import text

SCRAPE_INTERVAL = ScrapingSettings().interval


@pytest.fixture(scope="module")
def stack() -> Iterator[LocalStack]:
    config = StackConfig(
        pods=3,
        models=("m",),
        sim_defaults={"decode_time_base": 0.002},
        server_args=("--static-reload-interval", "0.1"),
    )
    with LocalStack(config) as running:
        yield running


def prompt(seed: int, chars: int = 6000) -> str:
    import random

    return text(random.Random(seed), chars)


async def send(
    session: aiohttp.ClientSession, stack: LocalStack, system: str, question: str, strategy: str
) -> str:
    body = {
        "model": "m",
        "max_tokens": 1,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
    }
    return await served_by(session, stack, body, strategy)


@pytest.mark.parametrize("strategy", ["prefix-cache", "prefix-cache-and-load"])
async def test_repeated_long_prompts_stick_to_one_pod(stack: LocalStack, strategy: str) -> None:
    system = prompt(hash(strategy) % 1000)
    async with aiohttp.ClientSession() as session:
        pods = [await send(session, stack, system, f"question {i}", strategy) for i in range(8)]
    assert len(set(pods)) == 1, pods
    ratios = await metric_samples(stack, "extproc_prefix_match_ratio_count")
    assert sum(ratios.values()) >= 8


@pytest.mark.parametrize("strategy", ["prefix-cache", "prefix-cache-and-load"])
async def test_different_prefixes_spread_over_the_pods(stack: LocalStack, strategy: str) -> None:
    # A reading taken while an earlier test's request ran still counts it as running until the
    # next scrape: wait for readings of idle pods, so the loads below are all equal.
    await asyncio.sleep(SCRAPE_INTERVAL + 0.5)
    async with aiohttp.ClientSession() as session:
        first = Counter(
            [await send(session, stack, prompt(100 + g), "q", strategy) for g in range(9)]
        )
    # misses go by load, and with equal loads ties break at random: every pod gets some
    assert len(first) == 3, first


async def test_a_removed_pod_is_forgotten(stack: LocalStack) -> None:
    system = prompt(7)
    strategy = "prefix-cache"
    async with aiohttp.ClientSession() as session:
        home = await send(session, stack, system, "a", strategy)
        assert await send(session, stack, system, "b", strategy) == home
        stack.write_pods([p for p in stack.pods if p.name != home])
        await asyncio.sleep(0.5)
        moved = await send(session, stack, system, "c", strategy)
        assert moved != home
        stack.write_pods()  # the pod comes back: the index must not believe it holds the prompt
        await asyncio.sleep(0.5)
        after = [await send(session, stack, system, f"d{i}", strategy) for i in range(4)]
    assert set(after) == {moved}
