"""Scraper CPU against many pods: the process's CPU time while it scrapes N pods at a rate.

The pods are a static exporter in another process (``tools/bench/exporter.py``), so the figure
is the scraper's own cost: HTTP client plus parsing plus publishing.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

from extproc.config import ScrapingSettings
from extproc.devstack.processes import Managed
from extproc.fleet.registry import PodRegistry, PodSpec
from extproc.scraping.readings import Readings
from extproc.scraping.scraper import Scraper
from extproc.telemetry import Telemetry


def _scrape_count(telemetry: Telemetry) -> float:
    value = telemetry.registry.get_sample_value("extproc_scrape_duration_seconds_count")
    return value or 0.0


async def _measure(ports: list[int], interval: float, seconds: float) -> dict[str, Any]:
    pods = len(ports)
    registry = PodRegistry()
    telemetry = Telemetry()
    registry.replace_all(
        PodSpec(name=f"p{i}", address=f"127.0.0.1:{port}", model="bench")
        for i, port in enumerate(ports)
    )
    settings = ScrapingSettings(interval=interval, timeout=1.0, stale_after=10 * interval)
    scraper = Scraper(settings, registry, Readings(settings.stale_after), telemetry)
    await scraper.start()
    await asyncio.sleep(2.0)  # warm up: connections open, first pages parsed
    scrapes_before = _scrape_count(telemetry)
    cpu_before, wall_before = time.process_time(), time.monotonic()
    await asyncio.sleep(seconds)
    cpu = time.process_time() - cpu_before
    wall = time.monotonic() - wall_before
    scrapes = _scrape_count(telemetry) - scrapes_before
    errors = sum(
        sample.value
        for family in telemetry.registry.collect()
        if family.name == "extproc_scrape_errors"
        for sample in family.samples
        if sample.name.endswith("_total")
    )
    await scraper.stop()
    return {
        "pods": pods,
        "interval_seconds": interval,
        "target_scrapes_per_second": round(pods / interval, 1),
        "achieved_scrapes_per_second": round(scrapes / wall, 1),
        "scraper_cpu_percent_of_one_core": round(100 * cpu / wall, 1),
        "cpu_microseconds_per_scrape": round(1e6 * cpu / max(scrapes, 1), 1),
        "scrape_errors": errors,
    }


def run(pods: int, interval: float, seconds: float, loop: str = "uvloop") -> dict[str, Any]:
    with TemporaryDirectory() as tmp:
        ports_file = Path(tmp) / "ports.json"
        exporter = Managed(
            "exporter",
            [
                sys.executable,
                "-m",
                "tools.bench.exporter",
                "--count",
                str(pods),
                "--ports-file",
                str(ports_file),
            ],
            Path(tmp) / "exporter.log",
        ).start()
        try:
            deadline = time.monotonic() + 60
            while not ports_file.exists():
                exporter.check_alive()
                if time.monotonic() > deadline:
                    raise TimeoutError("exporter did not start")
                time.sleep(0.1)
            from tools.bench.exporter import vllm_like_page

            ports = json.loads(ports_file.read_text())
            measure = _measure(ports, interval, seconds)
            if loop == "uvloop":
                import uvloop

                result = uvloop.run(measure)
            else:
                result = asyncio.run(measure)
            result["event_loop"] = loop
            result["page_bytes"] = len(vllm_like_page())
        finally:
            exporter.stop()
    return {"benchmark": "scraper", **result}
