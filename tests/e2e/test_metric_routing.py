"""Through a real Envoy: metric strategies pick what their formulas say; cold and hung pods."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator

import aiohttp
import pytest

from extproc.devstack.stack import LocalStack, StackConfig
from tests.e2e.conftest import eventually, metric_samples, served_by

PROBE = {"model": "m", "prompt": "hello there", "max_tokens": 1}
BASE = {"decode_time_base": 0.01, "num_gpu_blocks": 256}


@pytest.fixture(scope="module")
def states() -> Iterator[LocalStack]:
    """sim-0: will hold one long-context request (high KV); sim-1: one slot, long queue;
    sim-2: a slow GPU."""
    config = StackConfig(
        pods=3,
        models=("m",),
        sim_defaults=BASE,
        pod_params={1: {"max_num_seqs": 1}, 2: {"slow_factor": 20.0}},
    )
    with LocalStack(config) as stack:
        yield stack


async def direct(session: aiohttp.ClientSession, url: str, body: dict[str, object]) -> None:
    async with session.post(f"{url}/v1/completions", json=body) as response:
        assert response.status == 200
        await response.read()


async def hold(session: aiohttp.ClientSession, url: str, prompt: str) -> aiohttp.ClientResponse:
    response = await session.post(
        f"{url}/v1/completions",
        json={"model": "m", "prompt": prompt, "max_tokens": 1500, "stream": True},
    )
    assert response.status == 200
    return response


async def probe(session: aiohttp.ClientSession, stack: LocalStack, strategy: str) -> str:
    return await served_by(session, stack, PROBE, strategy, "/v1/completions")


async def test_each_strategy_picks_what_its_formula_says(states: LocalStack) -> None:
    kv, queue, slow = (pod.url for pod in states.pods)
    async with aiohttp.ClientSession() as session:
        # Recent history on every pod (the latency profile needs finished requests).
        warm = {"model": "m", "prompt": "warm up", "max_tokens": 3}
        await asyncio.gather(
            *(direct(session, url, warm) for url in (kv, queue, slow) for _ in range(2))
        )
        held = [await hold(session, kv, "k" * 1600)]
        held += [await hold(session, queue, f"q{i}") for i in range(5)]
        await asyncio.sleep(1.0)
        picks = {}
        for strategy in ("least-kv-cache", "least-request", "least-latency", "throughput"):
            picks[strategy] = await probe(session, states, strategy)
            await asyncio.sleep(0.6)
        for response in held:
            response.close()
    assert picks == {
        # sim-0 holds a 400-token prompt (about 10% of its cache); sim-2 holds nothing.
        "least-kv-cache": "sim-2",
        # load: sim-0 1, sim-1 5 (1 running + 4 waiting), sim-2 0.
        "least-request": "sim-2",
        # sim-2 decodes 20x slower, sim-1 has a queue: sim-0 is fastest for a short request.
        "least-latency": "sim-0",
        # sim-0 prefilled 400 tokens and sim-1 decodes continuously; sim-2 did least work.
        "throughput": "sim-2",
    }
    samples = await metric_samples(states, "extproc_routing_fallback_total")
    assert not samples, f"no fallback expected with fresh metrics everywhere: {samples}"


@pytest.fixture(scope="module")
def faulty() -> Iterator[LocalStack]:
    """Two healthy pods, one whose metrics appear 5 s after start, one whose /metrics hangs."""
    config = StackConfig(
        pods=4,
        models=("m",),
        sim_defaults={"decode_time_base": 0.002},
        pod_params={2: {"metrics_delay": 5.0}, 3: {"metrics_hang": True}},
    )
    with LocalStack(config) as stack:
        yield stack


async def test_cold_pod_gets_traffic_before_its_metrics_appear(faulty: LocalStack) -> None:
    async with aiohttp.ClientSession() as session:
        ages = await metric_samples(faulty, "extproc_pod_metrics_age_seconds")
        assert not any("sim-2" in labels for labels in ages), "sim-2 should not have metrics yet"
        # No pod has fresh metrics of KV usage yet: least-request decides, idle pods tie and
        # ties break at random, so 24 probes miss sim-2 with odds of 1 in 1,000.
        served = Counter([await probe(session, faulty, "least-kv-cache") for _ in range(24)])
        ages = await metric_samples(faulty, "extproc_pod_metrics_age_seconds")
        still_cold = not any("sim-2" in labels for labels in ages)
    assert still_cold
    assert served["sim-2"] >= 1, served
    fallbacks = await metric_samples(faulty, "extproc_routing_fallback_total")
    assert fallbacks.get('{reason="no-metrics",strategy="least-kv-cache"}', 0) >= 24

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        coldstart = await metric_samples(faulty, "extproc_pod_coldstart_seconds")
        value = next((v for k, v in coldstart.items() if "sim-2" in k), None)
        if value is not None:
            break
        await asyncio.sleep(0.2)
    assert value is not None and value > 1.0


async def test_a_hung_metrics_endpoint_does_not_slow_requests(faulty: LocalStack) -> None:
    async with aiohttp.ClientSession() as session:
        durations = []
        pods = Counter()
        # Without metrics everywhere the decision falls back to least-request; idle pods tie
        # and ties break at random, so 30 probes miss the hung pod with odds of 1 in 5,600.
        for _ in range(30):
            started = time.monotonic()
            pods[await probe(session, faulty, "least-latency")] += 1
            durations.append(time.monotonic() - started)
    # A routing decision that waited for the hung scrape would take the scrape timeout at least;
    # Envoy's message timeout (5 s) would fail it. Generous bound: nothing near either.
    assert max(durations) < 2.0, durations
    assert "sim-3" in pods

    async def timed_out() -> bool:
        errors = await metric_samples(faulty, "extproc_scrape_errors_total")
        return errors.get('{pod="sim-3",reason="timeout"}', 0) >= 1

    await eventually(timed_out, timeout=10.0)  # the scrape's own timeout ends it, in time


async def test_least_busy_time_spreads_long_requests(faulty: LocalStack) -> None:
    body = {"model": "m", "prompt": "long one", "max_tokens": 1500, "stream": True}
    async with aiohttp.ClientSession() as session:
        held = []
        for _ in range(4):
            response = await session.post(
                faulty.gateway_url + "/v1/completions",
                json=body,
                headers={"routing-strategy": "least-busy-time"},
            )
            assert response.status == 200
            await response.content.readline()
            held.append(response)
            # Each open request accrues busy time; earlier short probes add only milliseconds.
            await asyncio.sleep(0.3)
        pods = {response.headers["x-pod-name"] for response in held}
        for response in held:
            response.close()
    assert pods == {"sim-0", "sim-1", "sim-2", "sim-3"}
