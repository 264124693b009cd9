"""The plain-HTTP side: Prometheus ``/metrics``, liveness ``/healthz``, readiness ``/readyz``."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from extproc.fleet.registry import PodRegistry
from extproc.telemetry import Telemetry


def make_app(
    telemetry: Telemetry, registry: PodRegistry, draining: Callable[[], bool]
) -> web.Application:
    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=telemetry.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        if draining():
            return web.json_response({"status": "draining"}, status=503)
        if not registry.loaded:
            return web.json_response({"status": "pods not loaded"}, status=503)
        return web.json_response({"status": "ready", "pods": len(registry.pods())})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app
