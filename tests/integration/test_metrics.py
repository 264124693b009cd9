"""``/metrics`` after real traffic: every family is documented in docs/observability.md with
its labels, no label carries a user, a request id or a client-chosen value, and the Grafana
dashboard queries only metrics that exist."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingRequest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from extproc.app import Server
from extproc.kube.metrics import KubeMetrics
from tests import envoy_protocol as ep

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "manifests" / "grafana" / "extproc-dashboard.json"
USER = "user-4c1d-cardinality"
UNKNOWN_MODEL = "client-model-8e2f"
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


async def exchange(server: Server, messages: list[ProcessingRequest]) -> None:
    await ep.run_stream(server.grpc_port, messages)


async def traffic(server: Server) -> list[str]:
    """Requests of every outcome, each with the user header and its own request id."""
    cases = [
        ("least-request", "m1"),
        ("least-kv-cache", "m1"),  # falls back: no pod metrics
        ("prefix-cache:2,least-request:1", "m1-lora"),
        ("", "m1"),  # routed by model only
        ("random", UNKNOWN_MODEL),  # 404: Envoy sends nothing after the immediate response
        ("random", "m2"),  # 503
    ]
    request_ids = []
    for n, (strategy, model) in enumerate(cases):
        request_id = f"req-{n}-5b7a"
        request_ids.append(request_id)
        headers = {"x-request-id": request_id, "user": USER}
        if strategy:
            headers["routing-strategy"] = strategy
        body = {"model": model, "messages": [{"role": "user", "content": "hi " * 50}]}
        messages = [ep.request_headers(headers=headers), ep.request_body(orjson.dumps(body))]
        if model in ("m1", "m1-lora"):
            messages.append(ep.response_headers(200))
        await exchange(server, messages)
    return request_ids


async def scrape(server: Server) -> list[Metric]:
    url = f"http://127.0.0.1:{server.http_port}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        text = await response.text()
    return [f for f in text_string_to_metric_families(text) if f.name.startswith("extproc_")]


@pytest.fixture
async def scraped(make_server: Any) -> dict[str, Any]:
    server = await make_server(
        unknown_user_policy="default-limits", default_rpm=1000, hold_timeout="100ms"
    )
    KubeMetrics(server.telemetry.registry)  # what a server with Kubernetes discovery adds
    request_ids = await traffic(server)
    return {"families": await scrape(server), "request_ids": request_ids}


def readme_metrics() -> dict[str, tuple[str, set[str]]]:
    """The Observability table: exposed name -> (type, label names)."""
    text = (ROOT / "docs" / "observability.md").read_text()
    section = text[text.index("## Metrics") :]
    rows = re.findall(r"^\| `(extproc_[a-z_]+)` \| (\w+) \| ?(.*?) ?\|$", section, re.MULTILINE)
    table = {}
    for name, kind, labels in rows:
        while re.search(r"\([^()]*\)", labels):
            labels = re.sub(r"\([^()]*\)", "", labels)
        table[name] = (kind, set(re.findall(r"`([a-z_]+)`", labels.partition(":")[0])))
    return table


def exposed_name(family: Metric) -> str:
    return family.name + ("_total" if family.type == "counter" else "")


def test_the_docs_list_every_metric_with_its_labels(scraped) -> None:
    documented = readme_metrics()
    families = {exposed_name(f): f for f in scraped["families"]}
    assert set(documented) == set(families)
    for name, family in families.items():
        kind, labels = documented[name]
        assert kind == family.type, name
        if family.samples:
            seen = {key for sample in family.samples for key in sample.labels} - {"le"}
            assert seen == labels, name


def test_no_label_holds_a_user_a_request_id_or_a_client_value(scraped) -> None:
    forbidden = {USER, UNKNOWN_MODEL, *scraped["request_ids"]}
    values = {
        value
        for family in scraped["families"]
        for sample in family.samples
        for value in sample.labels.values()
    }
    assert not values & forbidden
    requests = next(f for f in scraped["families"] if f.name == "extproc_requests")
    statuses = {
        (s.labels["model"], s.labels["strategy"], s.labels["status"]) for s in requests.samples
    }
    assert {
        ("m1", "least-request", "200"),
        ("m1", "least-kv-cache", "200"),
        ("m1-lora", "weighted", "200"),
        ("m1", "none", "200"),
        ("unknown", "random", "404"),
        ("m2", "random", "503"),
    } <= statuses


def test_the_dashboard_queries_only_exposed_metrics(scraped) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exposed = {
        family.name + suffix for family in scraped["families"] for suffix in SUFFIXES[family.type]
    }
    expressions = [
        target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", ())
    ]
    assert len(expressions) >= 20
    queried = {name for expr in expressions for name in re.findall(r"\bextproc_[a-z_]+", expr)}
    assert queried <= exposed, queried - exposed
