"""Prefix-aware routing measured by real vLLM's own prefix-cache counters, and the exact matches
its KV-cache events give the router."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import aiohttp
import grpc
import pytest

from extproc.debug.v1 import debug_pb2 as pb
from extproc.debug.v1.debug_pb2_grpc import RouterDebugStub
from tests.realvllm.conftest import BLOCK, MODEL, Fleet, total

GROUPS = 8
ROUNDS = 4
WORDS = [
    "alpha",
    "bravo",
    "charlie",
    "delta",
    "echo",
    "foxtrot",
    "golf",
    "hotel",
    "india",
    "juliet",
    "kilo",
    "lima",
    "mike",
]


def shared_prefix(seed: str, group: int) -> str:
    """About 80 words (some 350 of the tiny model's tokens) a group's requests share; distinct
    per run, so no run finds blocks another run left in either pod's cache."""
    rng = random.Random(f"{seed}/{group}")
    return " ".join(rng.choice(WORDS) for _ in range(80))


async def run_workload(session: aiohttp.ClientSession, fleet: Fleet, strategy: str) -> float:
    """Round-robin over GROUPS shared prefixes, ROUNDS requests each, one at a time; the share of
    the prompt blocks vLLM looked up that it found in its cache."""
    before = total(fleet)
    for round_ in range(ROUNDS):
        for group in range(GROUPS):
            body = {
                "model": MODEL,
                "prompt": f"{shared_prefix(strategy, group)}\nQuestion {round_}: what next?",
                "max_tokens": 2,
                "temperature": 0,
            }
            async with session.post(
                fleet.stack.gateway_url + "/v1/completions",
                json=body,
                headers={"routing-strategy": strategy, "user": "prefix-workload"},
            ) as response:
                assert response.status == 200, await response.text()
                await response.read()
    after = total(fleet)
    queries = after["queries"] - before["queries"]
    assert queries > 0
    return (after["hits"] - before["hits"]) / queries


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as client:
        yield client


async def test_prefix_strategies_raise_vllms_hit_ratio_over_random(
    fleet: Fleet, session: aiohttp.ClientSession
) -> None:
    ratios = {
        strategy: await run_workload(session, fleet, strategy)
        for strategy in ("random", "prefix-cache", "prefix-cache-and-load")
    }
    # With every group on one pod only the first round misses: about (ROUNDS-1)/ROUNDS of the
    # prefix blocks hit. Random sends most groups to both pods, and pays each miss twice.
    for strategy in ("prefix-cache", "prefix-cache-and-load"):
        assert ratios[strategy] > ratios["random"] + 0.05, ratios
        assert ratios[strategy] > 0.6, ratios


async def test_explain_shows_exact_matches_from_vllms_events(
    fleet: Fleet, session: aiohttp.ClientSession
) -> None:
    prompt = f"{shared_prefix('explain', 0)}\nAnd then?"
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 2, "temperature": 0}
    async with session.post(
        fleet.stack.gateway_url + "/v1/completions",
        json=body,
        headers={"routing-strategy": "prefix-cache", "user": "explain"},
    ) as response:
        assert response.status == 200, await response.text()
        name = response.headers["target-pod"]
        await response.read()

    async with grpc.aio.insecure_channel(fleet.stack.grpc_address) as channel:
        debug = RouterDebugStub(channel)
        request = pb.ExplainRequest(model=MODEL, prompt=prompt, strategy="prefix-cache")
        deadline = asyncio.get_running_loop().time() + 10
        while True:
            answer = await debug.Explain(request)
            candidates = {c.pod: c for c in answer.candidates}
            held = candidates[name]
            # The pod published the prompt's full blocks once it had computed them.
            if held.prefix_precise and held.prefix_match_tokens >= BLOCK:
                break
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"no exact match on {name}: {answer}")
            await asyncio.sleep(0.2)
    assert held.best
    assert held.prefix_match_tokens % BLOCK == 0
    other = candidates["lora" if name == "plain" else "plain"]
    assert other.prefix_precise and other.prefix_match_tokens == 0
