"""The gRPC ``envoy.service.ext_proc.v3.ExternalProcessor`` service: one stream per request."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_proc_grpc
from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingRequest

from extproc.envoy.exchange import Exchange, Interim, ProtocolViolation
from extproc.telemetry import Telemetry

log = logging.getLogger(__name__)

PROTOCOL_ERROR = "protocol_error"
CUT = "cut"
"""The status of a stream still open when the drain time ran out."""
"""The status a stream ended for a message out of order is counted and logged under."""

Context = Any
"""``grpc.aio.ServicerContext`` (grpc ships no type information)."""


class ExternalProcessor(ext_proc_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """Feeds each stream's messages to a new exchange and guarantees it is closed.

    The ``finally`` runs on every ending: Envoy half-closing the stream after the response, the
    client cancelling (Envoy resets the stream), an upstream reset, server shutdown cancelling
    the task, a message out of order, or an unexpected exception here.
    """

    def __init__(self, new_exchange: Callable[[Interim], Exchange], telemetry: Telemetry) -> None:
        self._new_exchange = new_exchange
        self._telemetry = telemetry
        self._open: set[Exchange] = set()

    def cut_open_streams(self) -> None:
        """The drain time is up: release the streams still open as cut (their streams end
        next; releasing is idempotent, so the later close changes nothing)."""
        for exchange in list(self._open):
            exchange.close(CUT)

    async def Process(
        self, request_iterator: AsyncIterator[ProcessingRequest], context: Context
    ) -> None:
        telemetry = self._telemetry
        exchange = self._new_exchange(context.write)
        self._open.add(exchange)
        telemetry.streams.inc()
        ended: str | None = None
        violation: str | None = None
        try:
            async for message in request_iterator:
                try:
                    responses = await exchange.handle(message)
                except ProtocolViolation as exc:
                    violation = str(exc)
                    ended = PROTOCOL_ERROR
                    break
                except Exception:
                    telemetry.internal_errors.inc()
                    log.exception(
                        "failed to process ext_proc message",
                        extra={"request_id": exchange.request_id},
                    )
                    answer = exchange.fail_internal()
                    if answer is None:
                        return
                    responses = (answer,)
                for response in responses:
                    await context.write(response)
        finally:
            self._open.discard(exchange)
            telemetry.streams.dec()
            exchange.close(ended)
        if violation is not None:
            telemetry.protocol_errors.inc()
            log.warning(
                "ext_proc stream ended: %s", violation, extra={"request_id": exchange.request_id}
            )
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, violation)
