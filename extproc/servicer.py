"""The gRPC ``envoy.service.ext_proc.v3.ExternalProcessor`` service: one stream per request."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_proc_grpc
from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingRequest, ProcessingResponse

from extproc.exchange import Exchange
from extproc.gateway import Gateway

log = logging.getLogger(__name__)


class ExternalProcessor(ext_proc_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """Feeds each stream's messages to an ``Exchange`` and guarantees it is closed.

    The ``finally`` runs on every ending: Envoy half-closing the stream after the response, the
    client cancelling (Envoy resets the stream), an upstream reset, server shutdown cancelling
    the task, or an unexpected exception here.
    """

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    async def Process(
        self,
        request_iterator: AsyncIterator[ProcessingRequest],
        context: grpc.aio.ServicerContext[ProcessingRequest, ProcessingResponse],
    ) -> AsyncIterator[ProcessingResponse]:
        telemetry = self._gateway.telemetry
        exchange = Exchange(self._gateway)
        telemetry.streams.inc()
        try:
            async for message in request_iterator:
                try:
                    responses = await exchange.handle(message)
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
                    yield response
        finally:
            telemetry.streams.dec()
            exchange.close()
