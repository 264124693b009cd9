"""The scraper against simulated pods: units, old names, cold start, hung and failing exporters."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest

from extproc.pods import PodRegistry, PodSpec
from extproc.scraping.scraper import Scraper
from extproc.telemetry import Telemetry
from tools.vllm_sim import PodSpec as SimSpec
from tools.vllm_sim import SimParams, SimulatorFleet

FAST = SimParams(decode_time_base=0.005, num_gpu_blocks=128, max_num_seqs=8)


@pytest.fixture
async def fleet() -> AsyncIterator[SimulatorFleet]:
    specs = [
        SimSpec(name="plain", model="m", params=FAST),
        SimSpec(name="percent", model="m", params=FAST.replace({"percent_units": True})),
        SimSpec(name="old", model="m", params=FAST.replace({"old_metric_names": True})),
        SimSpec(name="cold", model="m", params=FAST.replace({"metrics_delay": 1.0})),
        SimSpec(name="hung", model="m", params=FAST.replace({"metrics_hang": True})),
        SimSpec(name="broken", model="m", params=FAST.replace({"metrics_error": True})),
    ]
    async with SimulatorFleet(specs) as running:
        yield running


@pytest.fixture
async def scraping(fleet: SimulatorFleet) -> AsyncIterator[tuple[PodRegistry, Telemetry]]:
    registry = PodRegistry(stale_after=1.0)
    telemetry = Telemetry()
    telemetry.watch_fleet(registry)
    registry.replace_all(
        PodSpec(name=p.name, address=f"127.0.0.1:{p.port}", model="m") for p in fleet
    )
    scraper = Scraper(registry, telemetry, interval=0.05, timeout=0.3, window=5.0)
    await scraper.start()
    yield registry, telemetry
    await scraper.stop()


async def eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.05)


async def hold(
    url: str, prompt_chars: int, session: aiohttp.ClientSession
) -> aiohttp.ClientResponse:
    """A long streaming request that occupies KV blocks until closed."""
    response = await session.post(
        f"{url}/v1/completions",
        json={"model": "m", "prompt": "x" * prompt_chars, "max_tokens": 1000, "stream": True},
    )
    assert response.status == 200
    await response.content.readline()
    return response


def view(registry: PodRegistry, name: str):  # type: ignore[no-untyped-def]
    pod = registry.get(name)
    assert pod is not None
    return pod


async def test_metrics_published_normalised_and_windowed(fleet, scraping) -> None:
    registry, _ = scraping
    async with aiohttp.ClientSession() as session:
        held = [
            await hold(fleet.pod(name).url, 2000, session) for name in ("plain", "percent", "old")
        ]
        for name in ("plain", "percent", "old"):
            await eventually(
                lambda n=name: (
                    view(registry, n).view.metrics is not None
                    and (view(registry, n).view.metrics.running or 0) >= 1
                )
            )
        usages = {
            n: view(registry, n).view.metrics.kv_cache_usage for n in ("plain", "percent", "old")
        }
        for response in held:
            response.close()
    # 2000 chars / 4 = 500 tokens = 32 of 128 blocks, growing as tokens are generated.
    for name, usage in usages.items():
        assert usage is not None and 0.2 < usage < 0.9, (name, usage)
    plain = view(registry, "plain").view
    assert plain.sent_since_scrape == 0
    assert plain.metrics is not None and plain.metrics.block_size == 16
    async with aiohttp.ClientSession() as session:
        await session.post(
            f"{fleet.pod('plain').url}/v1/completions",
            json={"model": "m", "prompt": "hello", "max_tokens": 2},
        )
    await eventually(
        lambda: (
            plain.metrics is not None
            and plain.metrics.window is not None
            and plain.metrics.window.prompt_tokens > 0
        )
    )


async def test_cold_start_then_metrics_and_coldstart_gauge(scraping) -> None:
    registry, telemetry = scraping
    cold = view(registry, "cold")
    assert cold.view.metrics is None
    await eventually(lambda: cold.view.metrics is not None, timeout=5.0)
    assert cold.first_metrics_at is not None and cold.became_ready_at is not None
    assert cold.first_metrics_at - cold.became_ready_at >= 0.8
    coldstart = telemetry.registry.get_sample_value(
        "extproc_pod_coldstart_seconds", {"pod": "cold", "model": "m"}
    )
    assert coldstart is not None and coldstart >= 0.8


async def test_hung_and_broken_exporters_do_not_hold_back_the_others(scraping) -> None:
    registry, telemetry = scraping
    plain = view(registry, "plain").view
    await eventually(lambda: plain.metrics is not None)
    stamps = set()
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        stamps.add(plain.metrics_at)
        await asyncio.sleep(0.02)
    # scraped every ~50 ms although another pod's /metrics never answers
    assert len(stamps) >= 8
    assert view(registry, "hung").view.metrics is None
    assert view(registry, "broken").view.metrics is None
    sample = telemetry.registry.get_sample_value
    await eventually(
        lambda: (
            (sample("extproc_scrape_errors_total", {"pod": "hung", "reason": "timeout"}) or 0) >= 1
        )
    )
    assert (sample("extproc_scrape_errors_total", {"pod": "broken", "reason": "status"}) or 0) >= 1


async def test_metrics_go_stale_when_a_pod_hangs_later(fleet, scraping) -> None:
    registry, _ = scraping
    plain = view(registry, "plain").view
    await eventually(lambda: plain.fresh_metrics(time.monotonic()) is not None)
    fleet.pod("plain").set_params(metrics_hang=True)
    await eventually(lambda: plain.fresh_metrics(time.monotonic()) is None, timeout=5.0)
    fleet.pod("plain").set_params(metrics_hang=False)
    await eventually(lambda: plain.fresh_metrics(time.monotonic()) is not None, timeout=5.0)


async def test_removed_pods_stop_being_scraped(fleet, scraping) -> None:
    registry, _ = scraping
    registry.remove("plain")
    await asyncio.sleep(0.2)
    assert registry.get("plain") is None
