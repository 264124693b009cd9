"""The whole server with ``discovery: kubernetes`` and ``manage_httproutes`` against the fake API:
pods from the watch are routed through the gRPC ExternalProcessor, and the model's HTTPRoute is
written by the replica holding the Lease."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import orjson
import pytest
from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingRequest, ProcessingResponse
from envoy.service.ext_proc.v3.external_processor_pb2_grpc import ExternalProcessorStub
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc import config
from extproc.app import Server
from extproc.config import ConfigError
from extproc.devstack.processes import free_port
from tests import envoy_protocol as ep
from tests.k8s import objects
from tests.k8s.fake_apiserver import FakeApiServer
from tests.k8s.helpers import eventually

CHAT = orjson.dumps({"model": "llama", "messages": [{"role": "user", "content": "hello"}]})


async def exchange(server: Server, *messages: ProcessingRequest) -> list[ProcessingResponse]:
    """Send ``messages`` on one ext_proc stream; one answer per message."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        call = ExternalProcessorStub(channel).Process()
        answers = []
        for message in messages:
            await call.write(message)
            answer = await asyncio.wait_for(call.read(), 5)
            assert isinstance(answer, ProcessingResponse)
            if answer.HasField("override_message_timeout"):  # held for a first pod
                answer = await asyncio.wait_for(call.read(), 5)
                assert isinstance(answer, ProcessingResponse)
            answers.append(answer)
            if answer.HasField("immediate_response"):
                break
        await call.done_writing()
        return answers


async def health(server: Server) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        return int(reply.status)


@pytest.fixture
async def server(fake_api: FakeApiServer, kubeconfig: Path) -> AsyncIterator[Server]:
    fake_api.put(objects.deployment("llama", namespace="aibrix-system"))
    fake_api.put(objects.pod("llama-0", "llama", "10.0.0.7", namespace="aibrix-system"))
    fake_api.fail(500, path_contains="/pods", times=2)
    settings = config.load(
        {
            "discovery": "kubernetes",
            "kubeconfig": str(kubeconfig),
            "manage_httproutes": True,
            "lease_duration": 2,
            "routing_strategy": "random",
            "hold_timeout": "200ms",
            "host": "127.0.0.1",
            "port": free_port(),
            "http_port": free_port(),
            "users_port": free_port(),
        },
        {},
    )
    running = Server(settings)
    await running.start()
    yield running
    await running.stop(grace=0.5)


async def test_requests_are_routed_to_pods_from_the_kubernetes_api(
    server: Server, fake_api: FakeApiServer
) -> None:
    assert await health(server) == health_pb2.HealthCheckResponse.NOT_SERVING
    await eventually(lambda: server.registry.loaded)
    serving = health_pb2.HealthCheckResponse.SERVING
    for _ in range(100):
        if await health(server) == serving:
            break
        await asyncio.sleep(0.05)
    assert await health(server) == serving
    ready = f"http://127.0.0.1:{server.http_port}/readyz"
    async with aiohttp.ClientSession() as session, session.get(ready) as response:
        assert response.status == 200

    headers, body = await exchange(
        server,
        ep.request_headers(headers={"target-pod": "192.0.2.1:80", "x-request-id": "k8s-1"}),
        ep.request_body(CHAT),
    )
    assert "target-pod" in ep.removed_headers(headers)
    routed = ep.set_headers(body)
    assert routed["target-pod"] == "10.0.0.7:8000"
    assert routed["model"] == "llama"

    fake_api.put(
        objects.pod("llama-0", "llama", "10.0.0.7", namespace="aibrix-system", ready=False)
    )
    await eventually(lambda: not server.registry.candidates("llama"))
    _, refused = await exchange(server, ep.request_headers(), ep.request_body(CHAT))
    assert refused.immediate_response.status.code == 503

    await eventually(lambda: fake_api.get("HTTPRoute", "aibrix-system", "llama-router") is not None)
    cluster = server.cluster
    assert cluster is not None
    lease = fake_api.get("Lease", "aibrix-system", "extproc-httproutes")
    assert lease is not None and lease["spec"]["holderIdentity"] == cluster.identity
    metrics = server.telemetry.render().decode()
    assert "extproc_httproute_leader 1.0" in metrics
    assert 'extproc_kube_watch_errors_total{resource="Pod"} 2.0' in metrics


def test_bad_kubernetes_settings_stop_start_up(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing-kubeconfig")
    with pytest.raises(ConfigError, match=r"invalid setting kubeconfig: .* not a readable file"):
        Server(config.load({"discovery": "kubernetes", "kubeconfig": missing}, {}))
    with pytest.raises(ConfigError, match="--watch-namespaces"):
        config.load({"watch_namespaces": "default,Team_A"}, {})
    with pytest.raises(ConfigError, match="EXTPROC_ROUTE_TIMEOUT"):
        config.load({}, {"EXTPROC_ROUTE_TIMEOUT": "soon"})
