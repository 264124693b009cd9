"""The plain-HTTP side: Prometheus ``/metrics``, liveness ``/healthz``, readiness ``/readyz``."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from extproc.gateway import Gateway


def make_app(gateway: Gateway) -> web.Application:
    async def metrics(_: web.Request) -> web.Response:
        return web.Response(
            body=gateway.telemetry.render(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        if gateway.draining:
            return web.json_response({"status": "draining"}, status=503)
        if not gateway.registry.loaded:
            return web.json_response({"status": "pods not loaded"}, status=503)
        return web.json_response({"status": "ready", "pods": len(gateway.registry.pods())})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app
