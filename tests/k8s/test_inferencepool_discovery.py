"""InferencePool discovery with the real ``kubernetes`` client against the fake API server: the
pool's pods by its selector and first target port, the selector and ports changing, the pool
missing or deleted, watch expiry and API errors, and ``extproc serve --discovery inferencepool``
routing an ext_proc request to a pod of the pool."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import orjson
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from extproc import cli, config
from extproc.app import Server
from extproc.devstack.processes import free_port
from extproc.discovery.inferencepool import (
    InferencePoolDiscovery,
    PoolSpecError,
    parse_pool,
    pool_pod_specs,
)
from extproc.discovery.kubernetes import slim_pod
from extproc.fleet.registry import ANY_MODEL, PodRegistry
from extproc.kube.client import INFERENCE_POOL, POD, Kube, load_api_client
from extproc.kube.informer import Backoff, Informer
from extproc.kube.metrics import KubeMetrics
from extproc.telemetry import Telemetry
from tests import envoy_protocol as ep
from tests.helpers import eventually
from tests.k8s import objects
from tests.k8s.fake_apiserver import FakeApiServer

FAST = Backoff(initial=0.05, maximum=0.2)
NS = "serving"
POOL = "vllm-pool"
Obj = dict[str, Any]


def inference_pool(
    match_labels: dict[str, str] | None = None,
    ports: tuple[int, ...] = (8000,),
    *,
    name: str = POOL,
    namespace: str = NS,
) -> Obj:
    return {
        "apiVersion": "inference.networking.k8s.io/v1",
        "kind": "InferencePool",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "selector": {"matchLabels": match_labels or {"app": "vllm"}},
            "targetPorts": [{"number": port} for port in ports],
            "endpointPickerRef": {"name": "picker", "port": {"number": 9002}},
        },
    }


def endpoint(pod: str, port: int = 8000) -> str:
    return f"{NS}/{pod}:{port}"


def pool_pod(
    name: str,
    ip: str | None,
    app: str = "vllm",
    *,
    model: str | None = None,
    namespace: str = NS,
    labels: dict[str, str] | None = None,
    **options: Any,
) -> Obj:
    """A pod labelled ``app=<app>``; with no ``model``, without the model.aibrix.ai/name label."""
    labels = {"app": app, **(labels or {})}
    pod = objects.pod(name, model or "", ip, namespace=namespace, labels=labels, **options)
    if model is None:
        del pod["metadata"]["labels"]["model.aibrix.ai/name"]
    return pod


@dataclass
class Running:
    registry: PodRegistry
    telemetry: Telemetry
    metrics: KubeMetrics
    discovery: InferencePoolDiscovery

    def candidates(self, model: str = POOL) -> list[str]:
        return sorted(pod.name for pod in self.registry.candidates(model))

    def names(self) -> list[str]:
        return sorted(pod.name for pod in self.registry.pods())

    def address(self, name: str, port: int) -> str | None:
        pod = self.registry.get(endpoint(name, port))
        return pod.address if pod is not None else None

    @property
    def errors(self) -> float:
        return float(self.telemetry.discovery_errors.labels("inferencepool")._value.get())


@pytest.fixture
async def discovery(kubeconfig: Path) -> AsyncIterator[Callable[[], Running]]:
    """Start discovery of ``serving/vllm-pool`` against the fake, as the Cluster wires it."""
    started: list[InferencePoolDiscovery] = []
    clients = []

    def start() -> Running:
        api = load_api_client(kubeconfig)
        clients.append(api)
        kube = Kube(api)
        telemetry = Telemetry()
        metrics = KubeMetrics(CollectorRegistry())
        registry = PodRegistry()
        pools = Informer(
            kube,
            INFERENCE_POOL,
            [NS],
            metrics,
            field_selector=f"metadata.name={POOL}",
            backoff=FAST,
        )

        def pod_informer(selector: str) -> Informer:
            return Informer(
                kube,
                POD,
                [NS],
                metrics,
                label_selector=selector,
                transform=slim_pod,
                backoff=FAST,
            )

        found = InferencePoolDiscovery(registry, telemetry, pools, pod_informer, NS, POOL)
        found.start()
        started.append(found)
        return Running(registry, telemetry, metrics, found)

    yield start
    for found in started:
        await found.stop()
    for api in clients:
        api.close()


def counted(metrics: KubeMetrics, family: str, resource: str) -> float:
    counter = metrics.watch_errors if family == "watch_errors" else metrics.relists
    return float(counter.labels(resource)._value.get())


async def test_ready_pods_of_the_pool_become_candidates(
    fake_api: FakeApiServer, discovery: Callable[[], Running]
) -> None:
    fake_api.put(inference_pool())
    fake_api.put(pool_pod("a", "10.0.0.1"))
    fake_api.put(pool_pod("labelled", "10.0.0.2", model="llama", metric_port="9100"))
    fake_api.put(pool_pod("not-ready", "10.0.0.3", ready=False))
    fake_api.put(pool_pod("terminating", "10.0.0.4", terminating=True))
    fake_api.put(pool_pod("no-ip", None, ready=False))
    fake_api.put(pool_pod("other-app", "10.0.0.5", app="other"))
    fake_api.put(pool_pod("elsewhere", "10.0.0.6", namespace="default"))
    running = discovery()
    await running.discovery.wait_loaded()
    assert running.registry.loaded

    assert running.candidates() == [endpoint("a")]
    assert running.candidates("llama") == [endpoint("labelled")]
    assert running.candidates(ANY_MODEL) == [endpoint("a"), endpoint("labelled")]
    assert running.names() == [
        endpoint("a"),
        endpoint("labelled"),
        endpoint("no-ip"),
        endpoint("not-ready"),
        endpoint("terminating"),
    ]
    a = running.registry.get(endpoint("a"))
    assert a is not None
    assert a.spec.address == "10.0.0.1:8000"
    assert a.spec.metrics_url == "http://10.0.0.1:8000/metrics"
    assert a.spec.model == POOL and a.spec.namespace == NS
    labelled = running.registry.get(endpoint("labelled"))
    assert labelled is not None
    assert labelled.spec.address == "10.0.0.2:8000"
    assert labelled.spec.metrics_url == "http://10.0.0.2:9100/metrics"
    assert running.errors == 0

    fake_api.put(pool_pod("not-ready", "10.0.0.3"))
    await eventually(lambda: endpoint("not-ready") in running.candidates())
    fake_api.put(pool_pod("a", "10.0.0.1", app="other"))
    await eventually(lambda: endpoint("a") not in running.names())
    fake_api.delete("Pod", NS, "not-ready")
    await eventually(lambda: running.candidates() == [])

    pools = [r for r in fake_api.requests if "/inferencepools" in r.path]
    assert pools and all(r.query.get("fieldSelector") == f"metadata.name={POOL}" for r in pools)


async def test_a_changed_selector_moves_the_set(
    fake_api: FakeApiServer, discovery: Callable[[], Running]
) -> None:
    fake_api.put(inference_pool({"app": "blue"}))
    fake_api.put(pool_pod("blue-0", "10.0.0.1", app="blue"))
    fake_api.put(pool_pod("green-0", "10.0.0.2", app="green"))
    running = discovery()
    await eventually(lambda: running.candidates() == [endpoint("blue-0")])

    fake_api.put(inference_pool({"app": "green"}))
    await eventually(lambda: running.candidates() == [endpoint("green-0")])
    assert running.names() == [endpoint("green-0")]
    selectors = {r.query.get("labelSelector") for r in fake_api.requests if "/pods" in r.path}
    assert selectors == {"app=blue", "app=green"}

    # Only the new selector's watch counts: a blue pod coming up later stays out.
    fake_api.put(pool_pod("blue-1", "10.0.0.3", app="blue"))
    fake_api.put(pool_pod("green-1", "10.0.0.4", app="green"))
    await eventually(lambda: running.candidates() == [endpoint("green-0"), endpoint("green-1")])
    assert endpoint("blue-1") not in running.names()

    # Narrowed while the API refuses the new list: the pods both selectors match stay routable,
    # the others leave at once; once the new watch lists, it is the one that counts.
    fake_api.put(pool_pod("green-a", "10.0.0.5", app="green", labels={"tier": "a"}))
    await eventually(lambda: endpoint("green-a") in running.candidates())
    fake_api.fail(500, path_contains="/pods", times=1000)
    fake_api.put(inference_pool({"app": "green", "tier": "a"}))
    await eventually(lambda: counted(running.metrics, "watch_errors", "Pod") >= 1)
    assert running.candidates() == [endpoint("green-a")]
    fake_api.heal()
    fake_api.put(pool_pod("green-b", "10.0.0.6", app="green", labels={"tier": "a"}))
    await eventually(lambda: running.candidates() == [endpoint("green-a"), endpoint("green-b")])
    assert running.errors == 0


async def test_changed_target_ports_move_every_address(
    fake_api: FakeApiServer, discovery: Callable[[], Running]
) -> None:
    fake_api.put(inference_pool(ports=(8000,)))
    fake_api.put(pool_pod("a", "10.0.0.1"))
    fake_api.put(pool_pod("b", "fd00::2", annotations={"model.aibrix.ai/kv-events-port": "5557"}))
    running = discovery()
    await eventually(lambda: running.candidates() == [endpoint("a"), endpoint("b")])
    assert running.address("b", 8000) == "[fd00::2]:8000"

    # Two target ports: each pod serves one data-parallel rank on each.
    fake_api.put(inference_pool(ports=(9000, 9001)))
    both = [endpoint(p, port) for p in ("a", "b") for port in (9000, 9001)]
    await eventually(lambda: running.candidates() == both)
    assert running.address("a", 9000) == "10.0.0.1:9000"
    assert running.address("b", 9001) == "[fd00::2]:9001"
    rank1 = running.registry.get(endpoint("b", 9001))
    assert rank1 is not None and rank1.spec.metrics_url == "http://[fd00::2]:9001/metrics"
    assert rank1.spec.kv_events == "tcp://[fd00::2]:5558"
    assert endpoint("a") not in running.names()
    pod_watches = [r for r in fake_api.requests if "/pods" in r.path and "watch" in r.query]
    assert {r.query.get("labelSelector") for r in pod_watches} == {"app=vllm"}


async def test_a_deleted_pool_empties_the_set_until_it_returns(
    fake_api: FakeApiServer, discovery: Callable[[], Running], caplog: pytest.LogCaptureFixture
) -> None:
    fake_api.put(inference_pool())
    fake_api.put(pool_pod("a", "10.0.0.1"))
    running = discovery()
    await eventually(lambda: running.candidates() == [endpoint("a")])

    fake_api.delete("InferencePool", NS, POOL)
    await eventually(lambda: running.names() == [])
    assert running.errors == 1
    assert f"InferencePool {NS}/{POOL} does not exist" in caplog.text
    assert running.discovery.pool is None

    fake_api.put(inference_pool())
    await eventually(lambda: running.candidates() == [endpoint("a")])
    assert running.errors == 1


async def test_a_pool_that_does_not_exist_yet_loads_empty_and_recovers(
    fake_api: FakeApiServer, discovery: Callable[[], Running]
) -> None:
    fake_api.put(pool_pod("a", "10.0.0.1"))
    fake_api.put(inference_pool(name="another-pool"))
    running = discovery()
    await running.discovery.wait_loaded()
    assert running.registry.loaded and running.names() == []
    assert running.errors == 1
    assert not any("/pods" in r.path for r in fake_api.requests)

    fake_api.put(inference_pool())
    await eventually(lambda: running.candidates() == [endpoint("a")])


async def test_an_unusable_pool_spec_keeps_the_last_good_pods(
    fake_api: FakeApiServer, discovery: Callable[[], Running]
) -> None:
    fake_api.put(inference_pool())
    fake_api.put(pool_pod("a", "10.0.0.1"))
    running = discovery()
    await eventually(lambda: running.candidates() == [endpoint("a")])

    broken = inference_pool()
    broken["spec"]["targetPorts"] = []
    fake_api.put(broken)
    await eventually(lambda: running.errors == 1)
    assert running.candidates() == [endpoint("a")]
    fake_api.put(inference_pool(ports=(8100,)))
    await eventually(lambda: running.address("a", 8100) == "10.0.0.1:8100")


async def test_expired_watches_relist_and_api_errors_back_off(
    fake_api: FakeApiServer, discovery: Callable[[], Running]
) -> None:
    fake_api.fail(500, path_contains="/inferencepools", times=2)
    fake_api.fail(500, path_contains="/pods", times=2)
    fake_api.put(inference_pool())
    fake_api.put(pool_pod("a", "10.0.0.1"))
    running = discovery()
    await eventually(lambda: running.candidates() == [endpoint("a")])
    assert counted(running.metrics, "watch_errors", "InferencePool") == 2
    assert counted(running.metrics, "watch_errors", "Pod") == 2

    with fake_api.unobserved():
        fake_api.put(inference_pool(ports=(8200,)))
        fake_api.delete("Pod", NS, "a")
        fake_api.put(pool_pod("b", "10.0.0.2"))
    await eventually(lambda: running.candidates() == [endpoint("b", 8200)])
    assert running.address("b", 8200) == "10.0.0.2:8200"
    assert counted(running.metrics, "relists", "InferencePool") >= 1
    assert counted(running.metrics, "relists", "Pod") >= 1

    with fake_api.unobserved():
        fake_api.delete("InferencePool", NS, POOL)
    await eventually(lambda: running.names() == [])


def test_pool_spec_and_pod_spec() -> None:
    pool = parse_pool(inference_pool({"b": "2", "a": "1"}, (8001, 8002)))
    assert pool.selector == "a=1,b=2" and pool.ports == (8001, 8002) and pool.name == POOL
    first, second = pool_pod_specs(pool_pod("p", "fd00::5", model="qwen", metric_port="9100"), pool)
    assert (first.name, second.name) == (endpoint("p", 8001), endpoint("p", 8002))
    assert (first.address, second.address) == ("[fd00::5]:8001", "[fd00::5]:8002")
    assert first.metrics_url == "http://[fd00::5]:9100/metrics"
    assert second.metrics_url == "http://[fd00::5]:9101/metrics"
    assert first.model == "qwen" and first.ready

    (pending, _) = pool_pod_specs(pool_pod("q", None, ready=False), pool)
    assert pending.address == "0.0.0.0:8001" and pending.metrics_url == ""
    assert not pending.ready and pending.model == POOL

    for spec_change in (
        {"selector": {"matchLabels": {}}},
        {"targetPorts": []},
        {"targetPorts": [{"number": 0}]},
        {"targetPorts": [{"number": "8000"}]},
        {"targetPorts": [{"number": 8000}, {"number": 8000}]},
    ):
        bad = inference_pool()
        bad["spec"].update(spec_change)
        with pytest.raises(PoolSpecError):
            parse_pool(bad)


async def serving(server: Server) -> bool:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


@pytest.fixture
async def server(fake_api: FakeApiServer, kubeconfig: Path) -> AsyncIterator[Server]:
    fake_api.put(inference_pool())
    fake_api.put(pool_pod("vllm-0", "10.0.0.7"))
    fake_api.put(pool_pod("vllm-1", "10.0.0.8", ready=False))
    argv = [
        "serve",
        "--discovery",
        "inferencepool",
        "--inference-pool",
        f"{NS}/{POOL}",
        "--kubeconfig",
        str(kubeconfig),
        "--routing-strategy",
        "random",
        "--host",
        "127.0.0.1",
        "--port",
        str(free_port()),
        "--http-port",
        str(free_port()),
        "--users-port",
        str(free_port()),
    ]
    settings = config.load(cli.settings_flags(cli.build_parser().parse_args(argv)), {})
    running = Server(settings)
    await running.start()
    yield running
    await running.stop(grace=0.5)


async def test_serve_routes_to_a_pod_of_the_pool(server: Server, fake_api: FakeApiServer) -> None:
    await eventually(lambda: serving(server), what="gRPC health SERVING")
    assert server.registry.loaded
    cluster = server.cluster
    assert cluster is not None and cluster.pool is not None and cluster.discovery is None

    chat = orjson.dumps({"model": POOL, "messages": [{"role": "user", "content": "hello"}]})
    answers = await ep.run_stream(
        server.grpc_port,
        [ep.request_headers(headers={"x-request-id": "pool-1"}), ep.request_body(chat)],
    )
    assert ep.kinds(answers) == ["request_headers", "request_body"]
    assert ep.set_headers(answers[1])["target-pod"] == "10.0.0.7:8000"

    fake_api.put(inference_pool(ports=(8100,)))
    fake_api.put(pool_pod("vllm-0", "10.0.0.7", ready=False))
    fake_api.put(pool_pod("vllm-1", "10.0.0.8"))
    moved = ["10.0.0.8:8100"]
    await eventually(lambda: [p.address for p in server.registry.candidates(POOL)] == moved)
    answers = await ep.run_stream(server.grpc_port, [ep.request_headers(), ep.request_body(chat)])
    assert ep.set_headers(answers[1])["target-pod"] == "10.0.0.8:8100"
