"""The scraper against simulated pods: units, old names, cold start, hung and failing exporters."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest

from extproc.config import ScrapingSettings
from extproc.fleet.registry import PodRegistry, PodSpec
from extproc.routing.accounting import Accounting
from extproc.scraping.readings import Readings
from extproc.scraping.scraper import Scraper
from extproc.telemetry import Telemetry
from extproc.vllm_sim import PodSpec as SimSpec
from extproc.vllm_sim import SimParams, SimulatorFleet
from strategies.context import PodMetrics
from tests.helpers import eventually

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


@dataclass
class Scraping:
    registry: PodRegistry
    readings: Readings
    telemetry: Telemetry

    def metrics(self, name: str) -> PodMetrics | None:
        reading = self.readings.get(name)
        return reading.metrics if reading is not None else None

    def fresh(self, name: str) -> PodMetrics | None:
        return self.readings.fresh(name, time.monotonic())


@pytest.fixture
async def scraping(fleet: SimulatorFleet) -> AsyncIterator[Scraping]:
    registry = PodRegistry()
    readings = Readings(stale_after=1.0)
    telemetry = Telemetry()
    telemetry.watch_fleet(registry, readings, Accounting())
    registry.replace_all(
        PodSpec(name=p.name, address=f"127.0.0.1:{p.port}", model="m") for p in fleet
    )
    settings = ScrapingSettings(interval=0.05, timeout=0.3, window=5.0)
    scraper = Scraper(settings, registry, readings, telemetry)
    await scraper.start()
    yield Scraping(registry, readings, telemetry)
    await scraper.stop()


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


async def test_metrics_published_normalised_and_windowed(fleet, scraping: Scraping) -> None:
    async with aiohttp.ClientSession() as session:
        held = [
            await hold(fleet.pod(name).url, 2000, session) for name in ("plain", "percent", "old")
        ]
        for name in ("plain", "percent", "old"):
            await eventually(
                lambda n=name: ((scraping.metrics(n) or PodMetrics()).running or 0) >= 1,
                timeout=10.0,
            )
        usages = {n: scraping.metrics(n).kv_cache_usage for n in ("plain", "percent", "old")}  # type: ignore[union-attr]
        for response in held:
            response.close()
    # 2000 chars / 4 = 500 tokens = 32 of 128 blocks, growing as tokens are generated.
    for name, usage in usages.items():
        assert usage is not None and 0.2 < usage < 0.9, (name, usage)
    plain = scraping.metrics("plain")
    assert plain is not None and plain.block_size == 16
    async with aiohttp.ClientSession() as session:
        await session.post(
            f"{fleet.pod('plain').url}/v1/completions",
            json={"model": "m", "prompt": "hello", "max_tokens": 2},
        )

    def windowed() -> bool:
        metrics = scraping.metrics("plain")
        return bool(metrics and metrics.window and metrics.window.prompt_tokens > 0)

    await eventually(windowed, timeout=10.0)


async def test_cold_start_then_metrics_and_coldstart_gauge(scraping: Scraping) -> None:
    cold = scraping.registry.get("cold")
    assert cold is not None and cold.ready_since is not None
    assert scraping.metrics("cold") is None
    await eventually(lambda: scraping.metrics("cold") is not None, timeout=5.0)
    first = scraping.readings.first_at("cold")
    assert first is not None and first - cold.ready_since >= 0.8
    coldstart = scraping.telemetry.registry.get_sample_value(
        "extproc_pod_coldstart_seconds", {"pod": "cold", "model": "m"}
    )
    assert coldstart is not None and coldstart >= 0.8


async def test_hung_and_broken_exporters_do_not_hold_back_the_others(scraping: Scraping) -> None:
    await eventually(lambda: scraping.metrics("plain") is not None, timeout=10.0)
    stamps = set()
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        reading = scraping.readings.get("plain")
        assert reading is not None
        stamps.add(reading.at)
        await asyncio.sleep(0.02)
    # scraped every ~50 ms although another pod's /metrics never answers
    assert len(stamps) >= 8
    assert scraping.metrics("hung") is None
    assert scraping.metrics("broken") is None
    sample = scraping.telemetry.registry.get_sample_value
    await eventually(
        lambda: (
            (sample("extproc_scrape_errors_total", {"pod": "hung", "reason": "timeout"}) or 0) >= 1
        ),
        timeout=10.0,
    )
    assert (sample("extproc_scrape_errors_total", {"pod": "broken", "reason": "status"}) or 0) >= 1


async def test_metrics_go_stale_when_a_pod_hangs_later(fleet, scraping: Scraping) -> None:
    await eventually(lambda: scraping.fresh("plain") is not None, timeout=10.0)
    fleet.pod("plain").set_params(metrics_hang=True)
    await eventually(lambda: scraping.fresh("plain") is None, timeout=5.0)
    fleet.pod("plain").set_params(metrics_hang=False)
    await eventually(lambda: scraping.fresh("plain") is not None, timeout=5.0)


async def test_removed_pods_stop_being_scraped(fleet, scraping: Scraping) -> None:
    plain = fleet.pod("plain")
    await eventually(lambda: plain.metrics_requests >= 3, timeout=10.0)
    sample = scraping.telemetry.registry.get_sample_value
    await eventually(
        lambda: sample("extproc_scrape_errors_total", {"pod": "broken", "reason": "status"}),
        timeout=10.0,
    )
    scraping.registry.remove("plain")
    scraping.registry.remove("broken")
    assert scraping.metrics("plain") is None  # what was read from it is forgotten at once
    # its scrape-error series leave /metrics with it
    assert sample("extproc_scrape_errors_total", {"pod": "broken", "reason": "status"}) is None
    # A scrape already sent may still land; after that, none: 20 scrape intervals without one.
    settled = plain.metrics_requests + 1
    other = fleet.pod("percent")
    start_other = other.metrics_requests
    await eventually(lambda: other.metrics_requests >= start_other + 20, timeout=10.0)
    assert plain.metrics_requests <= settled
    assert scraping.metrics("plain") is None
