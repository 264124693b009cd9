"""A static metrics exporter for scraper benchmarks: one process, many ports, a fixed page.

The page is a real simulator page padded with the other families a vLLM server exports
(histograms with their buckets, process and GC metrics), so its size is that of a real one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from pathlib import Path

from aiohttp import web


def vllm_like_page(model: str = "bench", extra_histograms: int = 10) -> bytes:
    """About 40 KB: what one vLLM engine's /metrics weighs with a dozen histograms."""
    from extproc.vllm_sim.config import SimParams
    from extproc.vllm_sim.engine import Engine
    from extproc.vllm_sim.metrics import render

    engine = Engine(SimParams())
    lines = [render(model, SimParams(), engine.snapshot(), engine.stats).rstrip("\n")]
    buckets = [0.001 * 2**i for i in range(20)]
    for h in range(extra_histograms):
        name = f"vllm:extra_histogram_{h}_seconds"
        lines.append(f"# HELP {name} Padding family standing for vLLM's other histograms.")
        lines.append(f"# TYPE {name} histogram")
        for le in buckets:
            lines.append(f'{name}_bucket{{engine="0",le="{le}",model_name="{model}"}} 0.0')
        lines.append(f'{name}_bucket{{engine="0",le="+Inf",model_name="{model}"}} 0.0')
        lines.append(f'{name}_count{{engine="0",model_name="{model}"}} 0.0')
        lines.append(f'{name}_sum{{engine="0",model_name="{model}"}} 0.0')
    return ("\n".join(lines) + "\n").encode()


async def serve(count: int, ports_file: Path) -> None:
    page = vllm_like_page()

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=page, content_type="text/plain")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    ports = []
    for _ in range(count):
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        ports.append(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
    ports_file.write_text(json.dumps(ports))
    print(f"serving {len(page)}-byte pages on {count} ports", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--ports-file", type=Path, required=True, help="JSON list written here")
    args = parser.parse_args()
    asyncio.run(serve(args.count, args.ports_file))


if __name__ == "__main__":
    main()
