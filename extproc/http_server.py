"""The plain-HTTP side: Prometheus ``/metrics``, liveness ``/healthz``, readiness ``/readyz``.

A malformed request (an 80 KB URL, a bad request line) is answered 400 by aiohttp, which logs it
at ERROR with a traceback; ``BadRequestFilter`` turns that into one WARNING line: a client's
mistake, not the server's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import CONTENT_TYPE_LATEST

from extproc.fleet.registry import PodRegistry
from extproc.logs import cut
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


class BadRequestFilter(logging.Filter):
    """On ``aiohttp.server``: a request that could not be parsed becomes one WARNING line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.msg = "malformed HTTP request answered %d: %s"
            record.args = (exc.code, cut(exc.message.splitlines()[0] if exc.message else "", 120))
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


_FILTER = BadRequestFilter()


def install_bad_request_filter() -> None:
    """Once per process (the logger is aiohttp's, shared by every app in it)."""
    server_log = logging.getLogger("aiohttp.server")
    if _FILTER not in server_log.filters:
        server_log.addFilter(_FILTER)
