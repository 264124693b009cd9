"""Scale from zero over gRPC: a request for a known model with no ready pod is held (Envoy told
to wait), released to the first pod that becomes ready, bounded in number and in time, and
dropped at once when its client goes away."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import yaml

from extproc.app import Server
from tests import envoy_protocol as ep
from tests.envoy_protocol import Stream
from tests.helpers import eventually

COLD = "cold-model"
POD = {"name": "late", "address": "127.0.0.1:18009", "model": COLD}
BASE = [{"name": "pod-a", "address": "127.0.0.1:18001", "model": "m1"}]


def chat(model: str = COLD) -> bytes:
    return orjson.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]})


async def start(make_server: Callable[..., Any], tmp_path: Path, **flags: Any) -> Server:
    server: Server = await make_server(pods=BASE, static_reload_interval="50ms", **flags)
    assert server.settings.config is not None
    document = yaml.safe_load(server.settings.config.read_text())
    document["models"] = [COLD]
    server.settings.config.write_text(yaml.safe_dump(document))
    await eventually(lambda: server.registry.knows_model(COLD))
    return server


def add_pod(server: Server) -> None:
    assert server.settings.config is not None
    document = yaml.safe_load(server.settings.config.read_text())
    document["pods"].append(POD)
    server.settings.config.write_text(yaml.safe_dump(document))


async def test_a_held_request_goes_to_the_first_pod_that_becomes_ready(
    make_server: Callable[..., Any], tmp_path: Path
) -> None:
    server = await start(make_server, tmp_path)
    stream = Stream(server.grpc_port)
    try:
        await stream.send(ep.request_headers(headers={"routing-strategy": "least-request"}))
        await stream.read()
        await stream.send(ep.request_body(chat()))
        (extension,) = await stream.read()
        assert extension.HasField("override_message_timeout")
        assert extension.override_message_timeout.seconds >= 60
        await eventually(lambda: server.holds.held(COLD) == 1)
        await shows_held(server, 1)
        add_pod(server)
        (routed,) = await stream.read(timeout=10)
        assert ep.set_headers(routed)["target-pod"] == POD["address"]
        assert server.holds.held(COLD) == 0
    finally:
        await stream.close()


async def test_past_the_time_bound_the_answer_is_a_503_with_retry_after(
    make_server: Callable[..., Any], tmp_path: Path
) -> None:
    server = await start(make_server, tmp_path, hold_timeout="300ms")
    stream = Stream(server.grpc_port)
    try:
        await stream.send(ep.request_headers(), ep.request_body(chat()))
        _, extension, answer = await stream.read(3)
        assert extension.HasField("override_message_timeout")
        assert answer.immediate_response.status.code == 503
        assert ep.set_headers(answer)["retry-after"] == "2"
        assert server.holds.held(COLD) == 0
    finally:
        await stream.close()


async def test_past_the_count_bound_the_answer_is_a_503_at_once(
    make_server: Callable[..., Any], tmp_path: Path
) -> None:
    server = await start(make_server, tmp_path, hold_requests="2")
    streams = [Stream(server.grpc_port) for _ in range(3)]
    try:
        for stream in streams[:2]:
            await stream.send(ep.request_headers(), ep.request_body(chat()))
            await stream.read(2)
        await eventually(lambda: server.holds.held(COLD) == 2)
        await streams[2].send(ep.request_headers(), ep.request_body(chat()))
        _, answer = await streams[2].read(2)
        assert answer.immediate_response.status.code == 503
    finally:
        for stream in streams:
            await stream.close()


async def test_clients_that_go_away_while_held_leave_nothing_held(
    make_server: Callable[..., Any], tmp_path: Path
) -> None:
    server = await start(make_server, tmp_path)
    streams = [Stream(server.grpc_port) for _ in range(100)]
    for stream in streams:
        await stream.send(ep.request_headers(), ep.request_body(chat()))
    await eventually(lambda: server.holds.held(COLD) == 100, timeout=10)
    for stream in streams:
        stream.call.cancel()
        await stream.close()
    await eventually(lambda: server.holds.held(COLD) == 0, timeout=10)
    await eventually(lambda: server.accounting.model_in_flight(COLD) == 0)


async def test_unknown_models_are_still_404_and_holding_can_be_off(
    make_server: Callable[..., Any], tmp_path: Path
) -> None:
    server = await start(make_server, tmp_path, hold_requests="0")
    stream = Stream(server.grpc_port)
    try:
        await stream.send(ep.request_headers(), ep.request_body(chat("never-heard-of")))
        _, answer = await stream.read(2)
        assert answer.immediate_response.status.code == 404
        stream2 = Stream(server.grpc_port)
        await stream2.send(ep.request_headers(), ep.request_body(chat()))
        _, answer = await stream2.read(2)
        assert answer.immediate_response.status.code == 503
        await stream2.close()
    finally:
        await stream.close()


async def shows_held(server: Server, count: int) -> None:
    import grpc

    from extproc.debug.v1 import debug_pb2 as pb
    from extproc.debug.v1.debug_pb2_grpc import RouterDebugStub

    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = RouterDebugStub(channel)
        models = {m.id: m for m in (await stub.ListModels(pb.ListModelsRequest())).models}
        assert models[COLD].held_requests == count and models[COLD].in_flight == count
        assert models[COLD].ready_pods == 0
