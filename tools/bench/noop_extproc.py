"""A no-op ext_proc server: Python's floor for the routing hop, measured beside ours.

It answers every message with a constant and routes every request to one fixed address, with
no parsing, no strategy and no accounting: what any Python ext_proc built on ``grpc.aio`` pays
before doing anything useful.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_proc_grpc
from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingRequest, ProcessingResponse

from extproc.envoy import messages as msgs


class NoopProcessor(ext_proc_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    def __init__(self, target: str) -> None:
        mutation = msgs.mutation([msgs.header("target-pod", target.encode())])
        self._routed = msgs.request_body(mutation, clear_route_cache=True)
        self._routed_headers = msgs.request_headers(mutation, clear_route_cache=True)

    async def Process(
        self,
        request_iterator: AsyncIterator[ProcessingRequest],
        context: grpc.aio.ServicerContext[ProcessingRequest, ProcessingResponse],
    ) -> AsyncIterator[ProcessingResponse]:
        duplex = False
        chunks: list[bytes] = []
        async for message in request_iterator:
            kind = message.WhichOneof("request")
            if kind == "request_headers":
                duplex = (
                    message.protocol_config.request_body_mode == msgs.BodyMode.FULL_DUPLEX_STREAMED
                )
                if not duplex:
                    yield msgs.CONTINUE_REQUEST_HEADERS
            elif kind == "request_body" and duplex:
                # Full duplex: answer once, after the last chunk, handing the body back.
                chunks.append(message.request_body.body)
                if message.request_body.end_of_stream:
                    yield self._routed_headers
                    yield msgs.streamed_request_body(b"".join(chunks), end_of_stream=True)
            elif kind == "request_body":
                yield self._routed
            elif kind == "response_headers":
                yield msgs.CONTINUE_RESPONSE_HEADERS
            elif kind == "response_body":
                yield msgs.CONTINUE_RESPONSE_BODY
            elif kind == "request_trailers":
                yield msgs.CONTINUE_REQUEST_TRAILERS


async def serve(port: int, target: str) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    ext_proc_grpc.add_ExternalProcessorServicer_to_server(NoopProcessor(target), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--target", required=True, help="ip:port every request goes to")
    args = parser.parse_args()
    import uvloop

    uvloop.run(serve(args.port, args.target))


if __name__ == "__main__":
    main()
