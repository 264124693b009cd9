"""The HTTPRoute controller and its Lease, with the real client against the fake API server."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from extproc.discovery.kubernetes import slim_pod
from extproc.kube.client import DEPLOYMENT, MODEL_ADAPTER, POD, Kube, load_api_client
from extproc.kube.controller import HTTPRouteController, slim_deployment
from extproc.kube.httproutes import MANAGED_BY, MANAGED_BY_LABEL, RouteOptions
from extproc.kube.informer import Backoff, Informer
from extproc.kube.lease import LeaderLease
from extproc.kube.metrics import KubeMetrics
from extproc.kube.model_labels import SELECTOR, MisplacedKeyReport
from tests.k8s import objects
from tests.k8s.fake_apiserver import FakeApiServer
from tests.k8s.helpers import eventually

FAST = Backoff(initial=0.05, maximum=0.2)
LEASE = "extproc-httproutes"


@dataclass
class Controller:
    identity: str
    controller: HTTPRouteController
    lease: LeaderLease
    metrics: KubeMetrics
    task: asyncio.Task[None]
    informers: tuple[Informer, ...]

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        for informer in self.informers:
            await informer.stop()


@pytest.fixture
async def controllers(kubeconfig: Path) -> AsyncIterator[Callable[..., Controller]]:
    """Start controllers against the fake: ``controllers("replica-a", namespaces=None)``."""
    started: list[Controller] = []

    def start(identity: str, namespaces: list[str] | None = None) -> Controller:
        api = load_api_client(kubeconfig, user_agent=f"extproc/{identity}")
        kube = Kube(api)
        metrics = KubeMetrics(CollectorRegistry())
        deployments = Informer(
            kube,
            DEPLOYMENT,
            namespaces,
            metrics,
            label_selector=SELECTOR,
            transform=slim_deployment,
            backoff=FAST,
        )
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
        lease = LeaderLease(api, "aibrix-system", LEASE, identity, duration=2.0)
        controller = HTTPRouteController(
            kube,
            deployments,
            pods,
            lease,
            RouteOptions(),
            metrics,
            MisplacedKeyReport(metrics.misplaced_keys),
            namespaces,
            adapters=adapters,
            resync=0.5,
            debounce=0.02,
            backoff=FAST,
        )
        deployments.start()
        pods.start()
        adapters.start()
        task = asyncio.create_task(controller.run())
        informers = (deployments, pods, adapters)
        running = Controller(identity, controller, lease, metrics, task, informers)
        started.append(running)
        return running

    yield start
    for running in started:
        await running.stop()


def route(fake: FakeApiServer, name: str) -> dict | None:
    return fake.get("HTTPRoute", "aibrix-system", name)


async def test_first_deployment_creates_route_and_last_one_deletes_it(
    fake_api: FakeApiServer, controllers
) -> None:
    controllers("replica-a")
    fake_api.put(objects.deployment("llama", namespace="aibrix-system", port="8001"))
    await eventually(lambda: route(fake_api, "llama-router") is not None)
    created = route(fake_api, "llama-router")
    assert created is not None
    assert created["metadata"]["labels"][MANAGED_BY_LABEL] == MANAGED_BY
    backend = created["spec"]["rules"][0]["backendRefs"][0]
    assert (backend["name"], backend["namespace"], backend["port"]) == (
        "llama",
        "aibrix-system",
        8001,
    )
    assert fake_api.objects("ReferenceGrant") == []

    fake_api.put(objects.deployment("llama-b", "llama", namespace="aibrix-system", port="8001"))
    await asyncio.sleep(0.3)
    assert route(fake_api, "llama-router") is not None

    fake_api.delete("Deployment", "aibrix-system", "llama")
    await asyncio.sleep(0.3)
    assert route(fake_api, "llama-router") is not None, "one Deployment of the model is left"

    fake_api.delete("Deployment", "aibrix-system", "llama-b")
    await eventually(lambda: route(fake_api, "llama-router") is None)
    assert len(fake_api.writes("HTTPRoute")) == 2, "one create, one delete"


async def test_cross_namespace_backend_gets_a_reference_grant(
    fake_api: FakeApiServer, controllers
) -> None:
    controllers("replica-a")
    fake_api.put(objects.deployment("deepseek-r1-distill-llama-8b", namespace="default"))
    await eventually(
        lambda: (
            fake_api.get("ReferenceGrant", "default", "deepseek-r1-distill-llama-8b-router")
            is not None
        )
    )
    created = route(fake_api, "deepseek-r1-distill-llama-8b-router")
    assert created is not None
    fake_api.delete("Deployment", "default", "deepseek-r1-distill-llama-8b")
    await eventually(lambda: fake_api.objects("ReferenceGrant") == [])
    await eventually(lambda: fake_api.objects("HTTPRoute") == [])


async def test_a_model_adapter_gets_a_route_to_its_base_model(
    fake_api: FakeApiServer, controllers
) -> None:
    controllers("replica-a")
    fake_api.put(objects.deployment("qwen", namespace="aibrix-system"))
    fake_api.put(objects.model_adapter("qwen-lora", "qwen", ["qwen-0"], namespace="aibrix-system"))
    await eventually(lambda: route(fake_api, "qwen-lora-router") is not None)
    adapter = route(fake_api, "qwen-lora-router")
    base = route(fake_api, "qwen-router")
    assert adapter is not None and base is not None
    rule = adapter["spec"]["rules"][0]
    assert rule["backendRefs"] == base["spec"]["rules"][0]["backendRefs"]
    assert rule["matches"][0]["headers"][0]["value"] == "qwen-lora"
    fake_api.delete("ModelAdapter", "aibrix-system", "qwen-lora")
    await eventually(lambda: route(fake_api, "qwen-lora-router") is None)
    assert route(fake_api, "qwen-router") is not None


async def test_pods_alone_name_a_model_and_changes_update_the_route(
    fake_api: FakeApiServer, controllers
) -> None:
    controllers("replica-a")
    fake_api.put(objects.pod("standalone-0", "phi", "10.0.0.1", namespace="aibrix-system"))
    await eventually(lambda: route(fake_api, "phi-router") is not None)
    fake_api.put(
        objects.deployment(
            "phi",
            namespace="aibrix-system",
            port="9000",
            annotations={"model.aibrix.ai/route-timeout": "300s"},
        )
    )

    def updated() -> bool:
        current = route(fake_api, "phi-router")
        if current is None:
            return False
        rule = current["spec"]["rules"][0]
        return rule["backendRefs"][0]["port"] == 9000 and rule["timeouts"]["request"] == "300s"

    await eventually(updated)


async def test_routes_it_does_not_own_are_left_alone(fake_api: FakeApiServer, controllers) -> None:
    handmade = {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "qwen-router", "namespace": "aibrix-system"},
        "spec": {"parentRefs": [{"name": "aibrix-eg"}]},
    }
    fake_api.put(handmade)
    running = controllers("replica-a")
    fake_api.put(objects.deployment("qwen", namespace="aibrix-system"))
    fake_api.put(objects.deployment("other", namespace="aibrix-system"))
    await eventually(lambda: route(fake_api, "other-router") is not None)
    await asyncio.sleep(0.2)
    kept = route(fake_api, "qwen-router")
    assert kept is not None and kept["spec"] == handmade["spec"]
    findings = {
        s.labels["code"]: s.value for m in running.metrics.findings.collect() for s in m.samples
    }
    assert findings.get("not_owned") == 1
    fake_api.delete("Deployment", "aibrix-system", "qwen")
    await asyncio.sleep(0.3)
    assert route(fake_api, "qwen-router") is not None


async def test_two_controllers_one_writer(fake_api: FakeApiServer, controllers) -> None:
    first = controllers("replica-a")
    second = controllers("replica-b")
    await eventually(lambda: first.lease.is_leader() or second.lease.is_leader())
    leader, follower = (first, second) if first.lease.is_leader() else (second, first)
    for i in range(3):
        fake_api.put(objects.deployment(f"model-{i}", namespace="aibrix-system"))
    await eventually(lambda: len(fake_api.objects("HTTPRoute")) == 3)
    await asyncio.sleep(0.5)
    agents = {r.user_agent for r in fake_api.writes("HTTPRoute")}
    assert agents == {f"extproc/{leader.identity}"}
    assert not follower.lease.is_leader()
    lease = fake_api.get("Lease", "aibrix-system", LEASE)
    assert lease is not None and lease["spec"]["holderIdentity"] == leader.identity

    await leader.stop()
    released = fake_api.get("Lease", "aibrix-system", LEASE)
    assert released is not None and not released["spec"].get("holderIdentity")
    await eventually(follower.lease.is_leader)
    fake_api.delete("Deployment", "aibrix-system", "model-0")
    await eventually(lambda: len(fake_api.objects("HTTPRoute")) == 2)
    deletes = [r for r in fake_api.writes("HTTPRoute") if r.method == "DELETE"]
    assert {r.user_agent for r in deletes} == {f"extproc/{follower.identity}"}


async def test_a_silent_leader_is_replaced_after_the_lease_expires(
    fake_api: FakeApiServer, kubeconfig: Path
) -> None:
    api_a = load_api_client(kubeconfig)
    api_b = load_api_client(kubeconfig)
    a = LeaderLease(api_a, "aibrix-system", LEASE, "a", duration=2.0)
    b = LeaderLease(api_b, "aibrix-system", LEASE, "b", duration=2.0)
    assert await asyncio.to_thread(a.try_acquire_or_renew)
    assert not await asyncio.to_thread(b.try_acquire_or_renew)
    await asyncio.sleep(0.5)
    assert not await asyncio.to_thread(b.try_acquire_or_renew), "a's lease has not expired"
    await asyncio.sleep(1.7)
    assert await asyncio.to_thread(b.try_acquire_or_renew), "a stopped renewing a whole duration"
    assert not await asyncio.to_thread(a.try_acquire_or_renew)
    lease = fake_api.get("Lease", "aibrix-system", LEASE)
    assert lease is not None
    assert lease["spec"]["holderIdentity"] == "b" and lease["spec"]["leaseTransitions"] == 1
    api_a.close()
    api_b.close()


async def test_nothing_is_deleted_before_the_watches_have_listed(
    fake_api: FakeApiServer, controllers
) -> None:
    fake_api.put(objects.deployment("kept", namespace="aibrix-system"))
    running = controllers("replica-a")
    await eventually(lambda: route(fake_api, "kept-router") is not None)
    await running.stop()
    fake_api.fail(500, path_contains="/deployments", times=5)
    controllers("replica-b")
    await asyncio.sleep(0.4)
    assert route(fake_api, "kept-router") is not None
    assert [r for r in fake_api.writes("HTTPRoute") if r.method == "DELETE"] == []
