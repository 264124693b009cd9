"""Pod discovery with the real ``kubernetes`` client against the fake API server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from extproc.discovery.kubernetes import KubernetesDiscovery, pod_spec, slim_pod
from extproc.fleet.registry import PodRegistry
from extproc.kube.client import MODEL_ADAPTER, POD, Kube, load_api_client
from extproc.kube.informer import Backoff, Informer
from extproc.kube.metrics import KubeMetrics
from extproc.kube.model_labels import SELECTOR, MisplacedKeyReport
from extproc.telemetry import Telemetry
from tests.k8s import objects
from tests.k8s.fake_apiserver import FakeApiServer
from tests.k8s.helpers import eventually

FAST = Backoff(initial=0.05, maximum=0.2)


@dataclass
class Running:
    registry: PodRegistry
    metrics: KubeMetrics
    pods: Informer
    telemetry: Telemetry

    def candidates(self, model: str) -> list[str]:
        return sorted(view.name for view in self.registry.candidates(model))

    def names(self) -> list[str]:
        return sorted(pod.spec.name for pod in self.registry.pods())


@pytest.fixture
async def discovery(kubeconfig: Path) -> AsyncIterator[Callable[..., Running]]:
    """Start discovery against the fake: ``discovery(namespaces=None)``."""
    started: list[tuple[Informer, ...]] = []
    clients = []

    def start(namespaces: list[str] | None = None) -> Running:
        api = load_api_client(kubeconfig)
        clients.append(api)
        kube = Kube(api)
        telemetry = Telemetry()
        metrics = KubeMetrics(CollectorRegistry())
        registry = PodRegistry()
        pods = Informer(
            kube,
            POD,
            namespaces,
            metrics,
            label_selector=SELECTOR,
            transform=slim_pod,
            backoff=FAST,
        )
        adapters = Informer(kube, MODEL_ADAPTER, namespaces, metrics, backoff=FAST)
        misplaced = MisplacedKeyReport(metrics.misplaced_keys)
        KubernetesDiscovery(registry, telemetry, pods, adapters, misplaced)
        pods.start()
        adapters.start()
        started.append((pods, adapters))
        return Running(registry, metrics, pods, telemetry)

    yield start
    for informers in started:
        for informer in informers:
            await informer.stop()
    for api in clients:
        api.close()


def value(metrics: KubeMetrics, name: str, **labels: str) -> float:
    for family in (metrics.relists, metrics.watch_errors, metrics.misplaced_keys):
        for metric in family.collect():
            for sample in metric.samples:
                if sample.name == name and sample.labels == labels:
                    return float(sample.value)
    return 0.0


async def test_pods_become_routable_unroutable_and_gone(fake_api: FakeApiServer, discovery) -> None:
    fake_api.put(objects.pod("vllm-0", "llama", "10.1.0.5", port="8001"))
    running = discovery()
    await eventually(lambda: running.registry.loaded)
    assert running.candidates("llama") == ["default/vllm-0"]
    spec = running.registry.get("default/vllm-0")
    assert spec is not None and spec.spec.address == "10.1.0.5:8001"

    fake_api.put(objects.pod("vllm-1", "llama", "10.1.0.6"))
    await eventually(lambda: running.candidates("llama") == ["default/vllm-0", "default/vllm-1"])
    added = running.registry.get("default/vllm-1")
    assert added is not None and added.spec.address == "10.1.0.6:8000"

    fake_api.put(objects.pod("vllm-1", "llama", "10.1.0.6", ready=False))
    await eventually(lambda: running.candidates("llama") == ["default/vllm-0"])
    assert running.registry.knows_model("llama")

    fake_api.put(objects.pod("vllm-0", "llama", "10.1.0.5", port="8001", terminating=True))
    await eventually(lambda: running.candidates("llama") == [])
    assert running.registry.knows_model("llama")

    fake_api.delete("Pod", "default", "vllm-0")
    fake_api.delete("Pod", "default", "vllm-1")
    await eventually(lambda: running.names() == [])
    assert not running.registry.knows_model("llama")


async def test_expired_watch_relists_and_loses_nothing(fake_api: FakeApiServer, discovery) -> None:
    fake_api.put(objects.pod("a", "m", "10.0.0.1"))
    fake_api.put(objects.pod("b", "m", "10.0.0.2", ready=False))
    running = discovery()
    await eventually(lambda: running.candidates("m") == ["default/a"])
    with fake_api.unobserved():
        fake_api.delete("Pod", "default", "a")
        fake_api.put(objects.pod("b", "m", "10.0.0.2"))
        fake_api.put(objects.pod("c", "m", "10.0.0.3"))
    await eventually(lambda: running.candidates("m") == ["default/b", "default/c"])
    assert running.names() == ["default/b", "default/c"]
    assert value(running.metrics, "extproc_kube_relists_total", resource="Pod") >= 1
    fake_api.put(objects.pod("d", "m", "10.0.0.4"))
    await eventually(lambda: "default/d" in running.candidates("m"))


async def test_api_errors_back_off_and_recover(fake_api: FakeApiServer, discovery) -> None:
    fake_api.fail(500, path_contains="/pods", times=3)
    fake_api.put(objects.pod("a", "m", "10.0.0.1"))
    running = discovery()
    await eventually(lambda: running.candidates("m") == ["default/a"])
    assert value(running.metrics, "extproc_kube_watch_errors_total", resource="Pod") == 3


async def test_pod_without_ip_is_known_but_not_routable(fake_api: FakeApiServer, discovery) -> None:
    fake_api.put(objects.pod("pending", "m", None, ready=False))
    running = discovery()
    await eventually(lambda: running.registry.loaded)
    assert running.registry.knows_model("m")
    assert running.candidates("m") == []
    fake_api.put(objects.pod("pending", "m", "10.0.0.9"))
    await eventually(lambda: running.candidates("m") == ["default/pending"])


async def test_same_pod_name_in_two_namespaces(fake_api: FakeApiServer, discovery) -> None:
    fake_api.put(objects.pod("vllm-0", "m", "10.0.0.1", namespace="team-a"))
    fake_api.put(objects.pod("vllm-0", "m", "10.0.0.2", namespace="team-b"))
    fake_api.put(objects.pod("vllm-0", "m", "10.0.0.3", namespace="elsewhere"))
    running = discovery(namespaces=["team-a", "team-b"])
    await eventually(lambda: running.registry.loaded)
    assert running.candidates("m") == ["team-a/vllm-0", "team-b/vllm-0"]


async def test_model_adapter_instances_serve_the_adapter(
    fake_api: FakeApiServer, discovery
) -> None:
    fake_api.put(objects.pod("base-0", "qwen", "10.0.0.1"))
    fake_api.put(objects.pod("base-1", "qwen", "10.0.0.2"))
    running = discovery()
    await eventually(lambda: running.candidates("qwen") == ["default/base-0", "default/base-1"])
    assert not running.registry.knows_model("qwen-lora")

    fake_api.put(objects.model_adapter("qwen-lora", "qwen", ["base-1"]))
    await eventually(lambda: running.candidates("qwen-lora") == ["default/base-1"])
    parents = {m.id: m.parent for m in running.registry.models()}
    assert parents["qwen-lora"] == "qwen"

    fake_api.put(objects.model_adapter("qwen-lora", "qwen", ["base-0", "base-1"]))
    await eventually(
        lambda: running.candidates("qwen-lora") == ["default/base-0", "default/base-1"]
    )

    fake_api.delete("ModelAdapter", "default", "qwen-lora")
    await eventually(lambda: not running.registry.knows_model("qwen-lora"))
    assert running.candidates("qwen") == ["default/base-0", "default/base-1"]


async def test_misplaced_keys_are_reported(fake_api: FakeApiServer, discovery, caplog) -> None:
    fake_api.put(
        objects.pod(
            "a",
            "m",
            "10.0.0.1",
            labels={"model.aibrix.ai/route-timeout": "300s"},
            annotations={"model.aibrix.ai/port": "9000"},
        )
    )
    running = discovery()
    await eventually(lambda: running.candidates("m") == ["default/a"])
    spec = running.registry.get("default/a")
    assert spec is not None and spec.spec.address == "10.0.0.1:8000"
    gauge = "extproc_model_keys_misplaced"
    assert (
        value(
            running.metrics,
            gauge,
            kind="Pod",
            key="model.aibrix.ai/route-timeout",
            found_in="labels",
        )
        == 1
    )
    assert (
        value(
            running.metrics, gauge, kind="Pod", key="model.aibrix.ai/port", found_in="annotations"
        )
        == 1
    )
    assert "model.aibrix.ai/route-timeout under labels" in caplog.text

    fake_api.delete("Pod", "default", "a")
    await eventually(lambda: running.names() == [])
    assert (
        value(
            running.metrics, gauge, kind="Pod", key="model.aibrix.ai/port", found_in="annotations"
        )
        == 0
    )


async def test_bad_port_label_is_an_error_not_a_guess(fake_api: FakeApiServer, discovery) -> None:
    fake_api.put(objects.pod("bad", "m", "10.0.0.1", port="http"))
    fake_api.put(objects.pod("good", "m", "10.0.0.2"))
    running = discovery()
    await eventually(lambda: running.registry.loaded)
    assert running.names() == ["default/good"]
    errors = running.telemetry.discovery_errors.labels("kubernetes")._value.get()
    assert errors == 1


def test_pod_spec_fields() -> None:
    spec = pod_spec(
        objects.pod("p", "m", "fd00::5", namespace="ns", port="8001", metric_port="9100"),
        frozenset({"lora"}),
    )
    assert spec.name == "ns/p"
    assert spec.address == "[fd00::5]:8001"
    assert spec.metrics_url == "http://[fd00::5]:9100/metrics"
    assert spec.adapters == frozenset({"lora"})
    assert spec.namespace == "ns" and spec.ready
