"""KEDA's external scaler over gRPC, with a client built from KEDA's proto: the metric spec and
value of a model while requests are held for it, IsActive flipping, StreamIsActive pushing
without being polled, errors a ScaledObject author can act on, and two replicas sharing one
Redis giving the same answers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import orjson
import pytest
import yaml
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from extproc.app import Server
from extproc.autoscaling import keda
from extproc.autoscaling.externalscaler import externalscaler_pb2 as pb
from extproc.autoscaling.externalscaler.externalscaler_pb2_grpc import ExternalScalerStub
from extproc.scraping.readings import Reading
from strategies.context import PodMetrics
from tests import envoy_protocol as ep
from tests.envoy_protocol import Stream
from tests.helpers import eventually
from tools.redis_server import RedisServer

COLD = "cold-model"
PODS = [
    {"name": "pod-a", "address": "127.0.0.1:18001", "model": "m1"},
    {"name": "pod-b", "address": "127.0.0.1:18002", "model": "m1", "adapters": ["m1-lora"]},
]
PUSH_BOUND = 2.0
"""How long a test waits for a pushed answer: a bound against hanging, not a speed target."""


def chat(model: str = COLD) -> bytes:
    return orjson.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]})


def ref(**metadata: str) -> pb.ScaledObjectRef:
    return pb.ScaledObjectRef(name="vllm", namespace="default", scalerMetadata=metadata)


async def start(make_server: Callable[..., Any], **flags: Any) -> Server:
    """A server knowing m1 (two pods, one with the adapter m1-lora) and COLD (no pod)."""
    server: Server = await make_server(pods=PODS, static_reload_interval="50ms", **flags)
    assert server.settings.config is not None
    document = yaml.safe_load(server.settings.config.read_text())
    document["models"] = [COLD]
    server.settings.config.write_text(yaml.safe_dump(document))
    await eventually(lambda: server.registry.knows_model(COLD))
    return server


class Scaler:
    """KEDA's side of the connection to one server."""

    def __init__(self, server: Server) -> None:
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}")
        self.stub = ExternalScalerStub(self.channel)

    async def value(self, **metadata: str) -> float:
        request = pb.GetMetricsRequest(scaledObjectRef=ref(**metadata), metricName="m")
        answer = await self.stub.GetMetrics(request, timeout=5)
        (value,) = answer.metricValues
        assert value.metricName == "m"
        return value.metricValueFloat

    async def active(self, **metadata: str) -> bool:
        answer = await self.stub.IsActive(ref(**metadata), timeout=5)
        return answer.result


@pytest.fixture
async def scalers() -> AsyncIterator[Callable[[Server], Scaler]]:
    opened: list[Scaler] = []

    def connect(server: Server) -> Scaler:
        scaler = Scaler(server)
        opened.append(scaler)
        return scaler

    yield connect
    for scaler in opened:
        await scaler.channel.close()


async def hold(server: Server, count: int, model: str = COLD) -> list[Stream]:
    """``count`` requests held at ``server`` for a model with no ready pod."""
    before = server.holds.held(model)
    streams = [Stream(server.grpc_port) for _ in range(count)]
    for stream in streams:
        await stream.send(ep.request_headers(), ep.request_body(chat(model)))
    await eventually(lambda: server.holds.held(model) == before + count)
    return streams


async def leave(streams: list[Stream]) -> None:
    for stream in streams:
        stream.call.cancel()
        await stream.close()


async def test_spec_and_value_follow_the_requests_held_for_a_model(
    make_server: Callable[..., Any], scalers: Callable[[Server], Scaler]
) -> None:
    server = await start(make_server)
    scaler = scalers(server)
    spec = await scaler.stub.GetMetricSpec(ref(model=COLD, targetSize="5"), timeout=5)
    (metric,) = spec.metricSpecs
    assert metric.metricName == "extproc-concurrency-cold-model"
    assert metric.targetSizeFloat == 5.0 and metric.targetSize == 5
    default = await scaler.stub.GetMetricSpec(ref(model=COLD), timeout=5)
    assert default.metricSpecs[0].targetSizeFloat == keda.DEFAULT_TARGETS["concurrency"]

    assert await scaler.value(model=COLD) == 0
    assert not await scaler.active(model=COLD)
    streams = await hold(server, 3)
    try:
        assert await scaler.value(model=COLD) == 3
        assert await scaler.value(model=COLD, metric="waiting") == 3  # held: queued for a pod
        assert await scaler.active(model=COLD)
        assert not await scaler.active(model="m1")
    finally:
        await leave(streams)
    await eventually(lambda: server.accounting.model_in_flight(COLD) == 0)
    assert await scaler.value(model=COLD) == 0
    assert not await scaler.active(model=COLD)


async def test_pod_side_metrics_and_adapters(
    make_server: Callable[..., Any], scalers: Callable[[Server], Scaler]
) -> None:
    server = await start(make_server, metrics_stale_after="3600s")
    scaler = scalers(server)
    now = time.monotonic()
    for pod, waiting, usage in (("pod-a", 3.0, 0.2), ("pod-b", 1.0, 0.6)):
        metrics = PodMetrics(running=4.0, waiting=waiting, kv_cache_usage=usage)
        server.readings.publish(pod, Reading(metrics, now, now))
    # The pods' own queues count for the model (requests other replicas routed there).
    assert await scaler.value(model="m1") == 12.0
    assert await scaler.value(model="m1", metric="waiting") == 4.0
    assert await scaler.value(model="m1", metric="kv-cache") == pytest.approx(0.4)
    assert await scaler.active(model="m1")
    # An adapter: the gateway's own count for it; the pod side of the pods that serve it.
    assert await scaler.value(model="m1", adapter="m1-lora") == 0
    assert not await scaler.active(model="m1", adapter="m1-lora")
    assert await scaler.value(model="m1", adapter="m1-lora", metric="kv-cache") == 0.6
    assert await scaler.value(model="m1-lora", metric="waiting") == 1.0  # adapter named as model
    spec = await scaler.stub.GetMetricSpec(ref(model="m1", adapter="m1-lora", metric="kv-cache"))
    assert spec.metricSpecs[0].metricName == "extproc-kv-cache-m1-m1-lora"
    assert spec.metricSpecs[0].targetSizeFloat == keda.DEFAULT_TARGETS["kv-cache"]


@pytest.mark.parametrize(
    ("metadata", "code", "says"),
    [
        ({}, grpc.StatusCode.INVALID_ARGUMENT, "needs `model`"),
        ({"model": "no-such-model"}, grpc.StatusCode.NOT_FOUND, "'no-such-model' is not known"),
        ({"model": "m1", "metric": "qps"}, grpc.StatusCode.INVALID_ARGUMENT, "'qps' is not one"),
        ({"model": "m1", "targetSize": "0"}, grpc.StatusCode.INVALID_ARGUMENT, "must be a number"),
        ({"model": "m1", "targetSize": "x"}, grpc.StatusCode.INVALID_ARGUMENT, "must be a number"),
        ({"model": "m1", "adapter": "other"}, grpc.StatusCode.NOT_FOUND, "adapter 'other'"),
    ],
)
async def test_a_wrong_trigger_gets_a_clear_error(
    make_server: Callable[..., Any],
    scalers: Callable[[Server], Scaler],
    metadata: dict[str, str],
    code: grpc.StatusCode,
    says: str,
) -> None:
    server = await start(make_server)
    scaler = scalers(server)
    calls = (
        scaler.stub.IsActive(ref(**metadata), timeout=5),
        scaler.stub.GetMetricSpec(ref(**metadata), timeout=5),
        scaler.stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=ref(**metadata)), timeout=5),
    )
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call
        assert raised.value.code() == code
        assert says in (raised.value.details() or "")


async def test_the_service_is_listed_by_reflection(make_server: Callable[..., Any]) -> None:
    server = await start(make_server)

    def services() -> list[str]:
        with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            return list(ProtoReflectionDescriptorDatabase(channel).get_services())

    assert "externalscaler.ExternalScaler" in await asyncio.to_thread(services)


async def next_push(call: Any) -> tuple[bool, float]:
    """The next pushed answer and when it arrived (loop clock); fails after ``PUSH_BOUND``.
    Start it (``asyncio.ensure_future``) before the event that should cause the push, so the
    arrival is timed as it happens, not when the test gets round to reading it."""
    answer = await asyncio.wait_for(call.read(), PUSH_BOUND)
    assert answer is not grpc.aio.EOF
    return answer.result, asyncio.get_running_loop().time()


async def test_stream_pushes_when_a_request_is_held_and_when_activity_ends(
    make_server: Callable[..., Any], scalers: Callable[[Server], Scaler]
) -> None:
    server = await start(make_server)
    scaler = scalers(server)
    loop = asyncio.get_running_loop()
    held_at: list[float] = []
    server.holds.on_change(lambda model: held_at.append(loop.time()))
    call = scaler.stub.StreamIsActive(ref(model=COLD))
    assert (await next_push(call))[0] is False  # the current answer, when the stream opens

    push = asyncio.ensure_future(next_push(call))
    streams = await hold(server, 1)
    active, pushed_at = await push
    assert active
    push_latency = pushed_at - held_at[0]

    push = asyncio.ensure_future(next_push(call))
    left_at = loop.time()
    await leave(streams)
    active, ended_at = await push
    assert not active
    end_latency = ended_at - left_at
    print(f"\nStreamIsActive push: {push_latency * 1000:.1f} ms after the request was held; ")
    print(f"{end_latency * 1000:.1f} ms after its client went away (activity ended)")
    call.cancel()


async def test_stream_ends_when_the_server_stops(
    make_server: Callable[..., Any], scalers: Callable[[Server], Scaler]
) -> None:
    server = await start(make_server)
    scaler = scalers(server)
    call = scaler.stub.StreamIsActive(ref(model=COLD))
    await next_push(call)
    stopping = asyncio.create_task(server.stop(grace=3.0))
    assert await asyncio.wait_for(call.read(), PUSH_BOUND) is grpc.aio.EOF
    await stopping


async def test_replicas_sharing_a_redis_answer_the_same(
    make_server: Callable[..., Any],
    scalers: Callable[[Server], Scaler],
    redis_server: RedisServer,
) -> None:
    servers = [await start(make_server, redis_url=redis_server.url) for _ in range(2)]
    a, b = (scalers(server) for server in servers)
    loop = asyncio.get_running_loop()
    call = b.stub.StreamIsActive(ref(model=COLD))
    assert (await next_push(call))[0] is False

    held_at: list[float] = []
    servers[0].holds.on_change(lambda model: held_at.append(loop.time()))
    push = asyncio.ensure_future(next_push(call))
    on_a = await hold(servers[0], 1)
    active, pushed_at = await push  # replica B learns from A through Redis
    assert active
    print(f"\nStreamIsActive push across replicas: {(pushed_at - held_at[0]) * 1000:.1f} ms")

    async def both_say(value: float, active: bool) -> bool:
        answers = [await s.value(model=COLD) for s in (a, b)]
        states = [await s.active(model=COLD) for s in (a, b)]
        return answers == [value, value] and states == [active, active]

    on_b = await hold(servers[1], 2)
    try:
        await eventually(lambda: both_say(3, True))
    finally:
        await leave(on_a + on_b)
    await eventually(lambda: both_say(0, False))
    assert (await next_push(call))[0] is False
    call.cancel()


async def test_without_redis_a_replica_answers_from_itself(
    make_server: Callable[..., Any], scalers: Callable[[Server], Scaler]
) -> None:
    servers = [await start(make_server) for _ in range(2)]
    streams = await hold(servers[0], 2)
    try:
        assert await scalers(servers[0]).value(model=COLD) == 2
        assert await scalers(servers[1]).value(model=COLD) == 0
    finally:
        await leave(streams)


async def test_stream_with_an_unknown_model_fails_at_once(
    make_server: Callable[..., Any], scalers: Callable[[Server], Scaler]
) -> None:
    server = await start(make_server)
    call = scalers(server).stub.StreamIsActive(ref(model="nope"))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await asyncio.wait_for(call.read(), PUSH_BOUND)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
