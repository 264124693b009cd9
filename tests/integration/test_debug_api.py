"""The RouterDebug service over a real gRPC channel: Explain agrees with the exchange, changes
nothing, and fails like the gateway; ListPods and ListModels describe the fleet."""

from __future__ import annotations

import dataclasses
import pickle
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import orjson
import pytest
from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingRequest
from envoy.service.ext_proc.v3.external_processor_pb2_grpc import ExternalProcessorStub

from extproc.app import Server
from extproc.debug.v1 import debug_pb2 as pb
from extproc.debug.v1.debug_pb2_grpc import RouterDebugStub
from extproc.scraping.readings import Reading
from extproc.users.store import User
from strategies.context import MetricsWindow, PodMetrics
from tests import envoy_protocol as ep

LONG = "You are a careful assistant. " * 12  # several 64-byte prefix blocks


@pytest.fixture
async def debug(make_server: Callable[..., Any]) -> AsyncIterator[Callable[..., Any]]:
    channels: list[grpc.aio.Channel] = []

    def stub(server: Server) -> RouterDebugStub:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}")
        channels.append(channel)
        return RouterDebugStub(channel)

    yield stub
    for channel in channels:
        await channel.close()


async def route(server: Server, body: dict[str, Any], **headers: str) -> str:
    """One request through ExternalProcessor, start to end; the pod it was routed to."""
    messages = [
        ep.request_headers(headers={k.replace("_", "-"): v for k, v in headers.items()}),
        ep.request_body(orjson.dumps(body)),
        ep.response_headers(200),
    ]

    async def send() -> AsyncIterator[ProcessingRequest]:
        for message in messages:
            yield message

    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        answers = [a async for a in ExternalProcessorStub(channel).Process(send())]
    return ep.set_headers(answers[1])["target-pod"]


SCRAPER_OWNED = ("extproc_scrape_", "extproc_pod_metrics_age", "extproc_pod_coldstart")


def routing_exposition(server: Server) -> list[str]:
    """The server's own metrics, less the scraper's (which move on their own)."""
    lines = server.telemetry.render().decode().splitlines()
    return [
        line for line in lines if "extproc_" in line and not any(s in line for s in SCRAPER_OWNED)
    ]


def chat(content: str, model: str = "m1") -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}]}


async def test_explain_reports_scores_loads_and_the_choice(make_server, debug) -> None:
    server = await make_server()
    claims = [server.accounting.claim("pod-a", None, 0) for _ in range(3)]
    answer = await debug(server).Explain(
        pb.ExplainRequest(
            model="m1",
            messages=[pb.ChatMessage(role="user", content="hi")],
            strategy="least-request:3,random:1",
        )
    )
    assert answer.pod == "pod-b" and answer.address == "127.0.0.1:18002"
    assert answer.strategy == "least-request:3,random:1"
    assert answer.path == "/v1/chat/completions"
    by_name = {c.pod: c for c in answer.candidates}
    assert set(by_name) == {"pod-a", "pod-b"}
    assert by_name["pod-a"].load == 3 and by_name["pod-a"].in_flight == 3
    assert by_name["pod-b"].load == 0 and by_name["pod-b"].best
    for candidate in answer.candidates:
        scores = {s.strategy: s.score for s in candidate.scores}
        assert list(scores) == ["least-request", "random"]
        expected = (3 * scores["least-request"] + scores["random"]) / 4
        assert candidate.score == pytest.approx(expected)
    assert dict(answer.upstream_headers) == {
        "target-pod": "127.0.0.1:18002",
        "routing-strategy": "least-request:3,random:1",
        "model": "m1",
        "x-request-id": answer.request_id,
    }
    assert server.accounting.counters("pod-a").in_flight == 3
    for claim in claims:
        claim.release()


def routing_state(server: Server) -> bytes:
    """Everything a routing decision may change, serialised: every strategy instance's state,
    the live random generator, the plan cache, the prefix index, the accounting and the
    server's own metrics."""
    index = server.prefix.index
    return pickle.dumps(
        (
            {name: vars(strategy) for name, strategy in server.plans.strategies.items()},
            server.pipeline.rng.getstate(),
            list(server.plans._cache),
            list(index._entries.items()),
            dict(index._held),
            {name: dataclasses.astuple(c) for name, c in server.accounting.pods.items()},
            server.accounting.in_flight_by_model(),
            routing_exposition(server),
        )
    )


async def test_explain_changes_no_routing_state(make_server, debug) -> None:
    server = await make_server()
    # some history first, so strategies, the index and the accounting hold state
    await server.users.create(User("u1"))
    for strategy in ("vtc-basic", "least-busy-time", "prefix-cache", "random"):
        await route(server, chat(LONG), routing_strategy=strategy, user="u1")
    before = routing_state(server)
    stub = debug(server)
    for strategy in (
        "prefix-cache",
        "prefix-cache-and-load",
        "least-kv-cache",
        "vtc-basic",
        "least-busy-time",
        "random",
        "throughput:1,random:1",
    ):
        answer = await stub.Explain(
            pb.ExplainRequest(body=orjson.dumps(chat(LONG)).decode(), strategy=strategy, user="u1")
        )
        assert answer.pod in ("pod-a", "pod-b")
    assert routing_state(server) == before


async def test_explain_agrees_with_the_exchange(make_server, debug) -> None:
    server = await make_server()
    stub = debug(server)
    first = await route(server, chat(LONG), routing_strategy="prefix-cache")
    explained = await stub.Explain(
        pb.ExplainRequest(
            model="m1",
            messages=[pb.ChatMessage(role="user", content=LONG)],
            headers={"routing-strategy": "prefix-cache"},
        )
    )
    assert explained.uses_prefix and explained.prompt_blocks >= 5
    assert explained.address == first
    matched = {c.address: c.prefix_match_blocks for c in explained.candidates}
    assert matched[first] == explained.prompt_blocks
    assert [c.address for c in explained.candidates if c.best] == [first]
    assert await route(server, chat(LONG), routing_strategy="prefix-cache") == explained.address


async def test_fallbacks_are_reported_not_counted(make_server, debug) -> None:
    server = await make_server()
    answer = await debug(server).Explain(
        pb.ExplainRequest(model="m1", prompt="hello", strategy="least-kv-cache")
    )
    assert answer.path == "/v1/completions"
    assert [(f.strategy, f.reason, f.used) for f in answer.fallbacks] == [
        ("least-kv-cache", "no-metrics", "least-request")
    ]
    assert "extproc_routing_fallback_total{" not in server.telemetry.render().decode()


async def test_no_strategy_means_routing_by_model(make_server, debug) -> None:
    server = await make_server()
    answer = await debug(server).Explain(pb.ExplainRequest(model="m1-lora", prompt="x"))
    assert answer.routed_by_model and not answer.pod and not answer.strategy
    assert [c.pod for c in answer.candidates] == ["pod-b"]
    assert dict(answer.upstream_headers) == {"model": "m1-lora", "x-request-id": answer.request_id}


async def test_default_strategy_headers_user_and_request_id(make_server, debug) -> None:
    server = await make_server(routing_strategy="least-request")
    answer = await debug(server).Explain(
        pb.ExplainRequest(
            body=orjson.dumps(chat("x")).decode(),
            headers={"User": "alice", "X-Request-Id": "rid-7"},
        )
    )
    assert answer.strategy == "least-request"
    assert (answer.user, answer.request_id) == ("alice", "rid-7")


@pytest.mark.parametrize(
    ("request_", "code", "message"),
    [
        (pb.ExplainRequest(body="{nope"), grpc.StatusCode.INVALID_ARGUMENT, "not valid JSON"),
        (
            pb.ExplainRequest(body="[]"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "Request body must be a JSON object, not an array.",
        ),
        (pb.ExplainRequest(prompt="x"), grpc.StatusCode.INVALID_ARGUMENT, "`model` is required"),
        (
            pb.ExplainRequest(model="m1", strategy="nope", prompt="x"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "Unknown routing strategy 'nope'. Valid strategies: ",
        ),
        (
            pb.ExplainRequest(model="m1", strategy="random:0", prompt="x"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "Invalid routing-strategy header",
        ),
        (pb.ExplainRequest(model="m1"), grpc.StatusCode.INVALID_ARGUMENT, "`messages` is required"),
        (
            pb.ExplainRequest(model="m1", prompt="x", body="{}"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "either body or",
        ),
        (
            pb.ExplainRequest(model="m1", prompt="x", path="/v1/other"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "not an inference path",
        ),
        (
            pb.ExplainRequest(model="zz", prompt="x", strategy="random"),
            grpc.StatusCode.NOT_FOUND,
            "The model zz does not exist.",
        ),
        (
            pb.ExplainRequest(model="m2", prompt="x", strategy="random"),
            grpc.StatusCode.UNAVAILABLE,
            "No ready pod serves model m2; retry later.",
        ),
        (
            pb.ExplainRequest(model="m1", prompt="x" * 100, strategy="random"),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "Request body is larger than the 64-byte limit.",
        ),
    ],
)
async def test_errors_are_the_gateways(make_server, debug, request_, code, message) -> None:
    server = await make_server(max_body_bytes="64")
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await debug(server).Explain(request_)
    assert failure.value.code() == code
    assert message in failure.value.details()


async def test_list_pods_and_models(make_server, debug) -> None:
    server = await make_server()
    await route(server, chat(LONG), routing_strategy="prefix-cache")
    pod_b = server.registry.get("pod-b")
    assert pod_b is not None and pod_b.ready_since is not None
    metrics = PodMetrics(
        running=2,
        waiting=1,
        kv_cache_usage=0.5,
        window=MetricsWindow(seconds=30, requests=3, ttft_seconds=0.25),
    )
    server.readings.publish("pod-b", Reading(metrics, pod_b.ready_since, pod_b.ready_since))
    stub = debug(server)

    pods = {p.name: p for p in (await stub.ListPods(pb.ListPodsRequest())).pods}
    assert set(pods) == {"pod-a", "pod-b", "pod-c"}
    assert not pods["pod-c"].ready and not pods["pod-c"].HasField("ready_for_seconds")
    assert list(pods["pod-b"].adapters) == ["m1-lora"]
    assert pods["pod-b"].metrics.running == 2 and pods["pod-b"].metrics.kv_cache_usage == 0.5
    assert not pods["pod-b"].metrics.HasField("block_size")
    window = pods["pod-b"].metrics.window
    assert (window.requests, window.ttft_seconds) == (3, 0.25)
    assert not window.HasField("e2e_seconds")
    assert pods["pod-b"].HasField("metrics_age_seconds")
    assert not pods["pod-a"].HasField("metrics")
    assert pods["pod-a"].metrics_url == "http://127.0.0.1:18001/metrics"
    explained = await stub.Explain(
        pb.ExplainRequest(body=orjson.dumps(chat(LONG)).decode(), strategy="prefix-cache")
    )
    held = {name: p.prefix_blocks for name, p in pods.items()}
    assert held == {n: explained.prompt_blocks if n == explained.pod else 0 for n in held}
    assert [p.name for p in (await stub.ListPods(pb.ListPodsRequest(model="m1-lora"))).pods] == [
        "pod-b"
    ]

    models = {m.id: m for m in (await stub.ListModels(pb.ListModelsRequest())).models}
    assert {k: (m.parent, m.ready_pods, m.pods) for k, m in models.items()} == {
        "m1": ("", 2, 2),
        "m1-lora": ("m1", 1, 1),
        "m2": ("", 0, 1),
    }


async def test_list_pods_shows_ejected_pods(make_server, debug) -> None:
    from extproc.fleet.health import UNREACHABLE

    server = await make_server()
    server.pod_health.failed("pod-a", UNREACHABLE)
    pods = {p.name: p for p in (await debug(server).ListPods(pb.ListPodsRequest())).pods}
    assert pods["pod-a"].ejected and pods["pod-a"].ejection_reason == "unreachable"
    assert 0 < pods["pod-a"].ejected_for_seconds <= 1.0
    assert not pods["pod-b"].ejected and not pods["pod-b"].HasField("ejected_for_seconds")
