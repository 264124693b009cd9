"""The per-model signals on ``/metrics``: one row per model and adapter the registry knows
(declared models with no pod included), pod-side values from fresh readings, held requests, and
KV-cache usage in 0..1 even from a pod that reports percent (a seed's autoscaler kept seven
replicas up on a 0-100 reading compared with a 0.5 target)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import orjson
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from extproc.app import Server
from extproc.scraping.readings import Reading
from extproc.vllm_sim import PodSpec as SimSpec
from extproc.vllm_sim import SimParams, SimulatorFleet
from strategies.context import MetricsWindow, PodMetrics
from tests import envoy_protocol as ep
from tests.envoy_protocol import Stream
from tests.helpers import eventually

COLD = "cold-model"
PODS = [
    {"name": "pod-a", "address": "127.0.0.1:18001", "model": "m1"},
    {"name": "pod-b", "address": "127.0.0.1:18002", "model": "m1", "adapters": ["m1-lora"]},
    {"name": "pod-c", "address": "127.0.0.1:18003", "model": "m2", "ready": False},
]
Samples = dict[tuple[str, str, str], float]
"""(metric, model, adapter) -> value."""


async def samples(server: Server) -> Samples:
    url = f"http://127.0.0.1:{server.http_port}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        text = await response.text()
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("extproc_model_") or family.name.endswith("misplaced"):
            continue
        for sample in family.samples:
            assert set(sample.labels) == {"model", "adapter"}, sample
            found[(sample.name, sample.labels["model"], sample.labels["adapter"])] = sample.value
    return found


async def test_every_known_model_has_its_row(make_server: Callable[..., Any]) -> None:
    server: Server = await make_server(
        pods=PODS, static_reload_interval="50ms", metrics_stale_after="3600s"
    )
    assert server.settings.config is not None
    document = yaml.safe_load(server.settings.config.read_text())
    document["models"] = [COLD]
    server.settings.config.write_text(yaml.safe_dump(document))
    await eventually(lambda: server.registry.knows_model(COLD))

    now = time.monotonic()
    window = MetricsWindow(seconds=10.0, prompt_tokens=5000.0, generation_tokens=1000.0)
    for pod, waiting, usage in (("pod-a", 3.0, 0.2), ("pod-b", 2.0, 0.6)):
        metrics = PodMetrics(running=1.0, waiting=waiting, kv_cache_usage=usage, window=window)
        server.readings.publish(pod, Reading(metrics, now, now))

    held = Stream(server.grpc_port)
    unknown = Stream(server.grpc_port)
    try:
        body = {"model": COLD, "messages": [{"role": "user", "content": "hi"}]}
        await held.send(ep.request_headers(), ep.request_body(orjson.dumps(body)))
        await eventually(lambda: server.holds.held(COLD) == 1)
        typo = {**body, "model": "client-typo-9d1e"}
        await unknown.send(ep.request_headers(), ep.request_body(orjson.dumps(typo)))
        _, answer = await unknown.read(2)
        assert answer.immediate_response.status.code == 404

        found = await samples(server)
    finally:
        for stream in (held, unknown):
            stream.call.cancel()
            await stream.close()

    rows = {(model, adapter) for _, model, adapter in found}
    assert rows == {("m1", ""), ("m1", "m1-lora"), ("m2", ""), (COLD, "")}
    assert found[("extproc_model_ready_pods", "m1", "")] == 2
    assert found[("extproc_model_ready_pods", "m1", "m1-lora")] == 1
    assert found[("extproc_model_ready_pods", "m2", "")] == 0
    assert found[("extproc_model_ready_pods", COLD, "")] == 0
    assert found[("extproc_model_waiting", "m1", "")] == 5
    assert found[("extproc_model_waiting", "m1", "m1-lora")] == 2  # pod-b's queue
    assert found[("extproc_model_kv_cache_usage_mean", "m1", "")] == pytest.approx(0.4)
    assert found[("extproc_model_kv_cache_usage_max", "m1", "")] == pytest.approx(0.6)
    assert ("extproc_model_kv_cache_usage_mean", COLD, "") not in found  # no pod: unknown
    assert found[("extproc_model_prompt_tokens_per_second", "m1", "")] == 1000
    assert found[("extproc_model_generation_tokens_per_second", "m1", "")] == 200
    assert found[("extproc_model_held_requests", COLD, "")] == 1
    assert found[("extproc_model_in_flight", COLD, "")] == 1  # held requests are in flight
    assert found[("extproc_model_in_flight", "m1", "")] == 0
    assert found[("extproc_model_coldstart_seconds", "m1", "")] >= 0
    assert ("extproc_model_coldstart_seconds", "m2", "") not in found


@pytest.fixture
async def percent_pod() -> AsyncIterator[SimulatorFleet]:
    # The seed's pod: the old metric name, in percent.
    params = SimParams(
        percent_units=True, old_metric_names=True, num_gpu_blocks=64, decode_time_base=0.05
    )
    async with SimulatorFleet([SimSpec(name="pct", model="m", params=params)]) as fleet:
        yield fleet


async def test_kv_usage_is_a_fraction_whatever_unit_the_pod_reports(
    make_server: Callable[..., Any], percent_pod: SimulatorFleet
) -> None:
    pod = percent_pod[0]
    server: Server = await make_server(
        pods=[{"name": "pct", "address": f"127.0.0.1:{pod.port}", "model": "m"}]
    )
    async with aiohttp.ClientSession() as session:
        # A long streaming request holds KV blocks until it is closed.
        response = await session.post(
            f"{pod.url}/v1/completions",
            json={"model": "m", "prompt": "x" * 2000, "max_tokens": 500, "stream": True},
        )
        try:
            await response.content.readline()
            async with session.get(f"{pod.url}/metrics") as raw:
                exported = await raw.text()
            assert any(
                s.value > 1
                for f in text_string_to_metric_families(exported)
                for s in f.samples
                if s.name == "vllm:gpu_cache_usage_perc"
            ), "the pod should report percent"

            async def usage() -> float:
                return (await samples(server)).get(("extproc_model_kv_cache_usage_max", "m", ""), 0)

            async def loaded() -> bool:
                return await usage() > 0

            await eventually(loaded)
            assert 0 < await usage() <= 1
        finally:
            response.close()
