"""The server's Kubernetes side: shared watches, pod discovery and the HTTPRoute controller.

Built only when ``discovery: kubernetes`` or ``inferencepool``, or ``manage_httproutes``, asks for
it. The watch of model-labelled Pods is shared: kubernetes discovery and the controller read the
same cache, so a pod is fetched once. InferencePool discovery watches its own pool's pods.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid

from extproc.config import KubernetesSettings
from extproc.discovery.inferencepool import InferencePoolDiscovery
from extproc.discovery.kubernetes import KubernetesDiscovery, slim_pod
from extproc.fleet.registry import PodRegistry
from extproc.kube.client import (
    DEPLOYMENT,
    INFERENCE_POOL,
    MODEL_ADAPTER,
    POD,
    Kube,
    load_api_client,
)
from extproc.kube.controller import HTTPRouteController, slim_deployment
from extproc.kube.httproutes import RouteOptions
from extproc.kube.informer import Informer
from extproc.kube.lease import LeaderLease
from extproc.kube.metrics import KubeMetrics
from extproc.kube.model_labels import SELECTOR, MisplacedKeyReport
from extproc.tasks import cancel_and_wait
from extproc.telemetry import Telemetry

log = logging.getLogger(__name__)

LEASE_NAME = "extproc-httproutes"


def replica_identity() -> str:
    """The pod name (hostname in Kubernetes) plus a random suffix: unique per process."""
    base = os.environ.get("POD_NAME") or socket.gethostname()
    return f"{base}-{uuid.uuid4().hex[:6]}"


class Cluster:
    def __init__(
        self,
        settings: KubernetesSettings,
        registry: PodRegistry,
        telemetry: Telemetry,
        *,
        provider: str,
    ) -> None:
        """``provider`` is the discovery provider: ``kubernetes`` and ``inferencepool`` find
        pods here; any other leaves the Cluster to the HTTPRoute controller."""
        self.identity = replica_identity()
        self.api = load_api_client(settings.kubeconfig, user_agent=f"extproc/{self.identity}")
        self.kube = Kube(self.api)
        self.metrics = KubeMetrics(telemetry.registry)
        namespaces = settings.namespaces or None
        misplaced = MisplacedKeyReport(self.metrics.misplaced_keys)
        self.informers: list[Informer] = []
        self._pods: Informer | None = None
        if provider == "kubernetes" or settings.manage_httproutes:
            self._pods = Informer(
                self.kube,
                POD,
                namespaces,
                self.metrics,
                label_selector=SELECTOR,
                transform=slim_pod,
            )
            self.informers.append(self._pods)
        self.discovery: KubernetesDiscovery | None = None
        adapters: Informer | None = None
        if self._pods is not None:
            # Discovery reads which pods hold each adapter; the controller routes its name.
            adapters = Informer(self.kube, MODEL_ADAPTER, namespaces, self.metrics)
            self.informers.append(adapters)
        if provider == "kubernetes" and self._pods is not None and adapters is not None:
            self.discovery = KubernetesDiscovery(
                registry, telemetry, self._pods, adapters, misplaced
            )
        self.pool: InferencePoolDiscovery | None = None
        if provider == "inferencepool":
            self.pool = self._pool_discovery(settings.inference_pool, registry, telemetry)
        self.controller: HTTPRouteController | None = None
        if settings.manage_httproutes and self._pods is not None:
            deployments = Informer(
                self.kube,
                DEPLOYMENT,
                namespaces,
                self.metrics,
                label_selector=SELECTOR,
                transform=slim_deployment,
            )
            self.informers.append(deployments)
            lease = LeaderLease(
                self.api,
                settings.gateway_namespace,
                LEASE_NAME,
                self.identity,
                settings.lease_duration,
            )
            options = RouteOptions(
                settings.gateway_namespace, settings.gateway_name, settings.route_timeout
            )
            self.controller = HTTPRouteController(
                self.kube,
                deployments,
                self._pods,
                lease,
                options,
                self.metrics,
                misplaced,
                namespaces,
                adapters=adapters,
            )
        self._task: asyncio.Task[None] | None = None

    def _pool_discovery(
        self, pool: str, registry: PodRegistry, telemetry: Telemetry
    ) -> InferencePoolDiscovery:
        """Discovery of ``NAMESPACE/NAME``: one watch of the pool, one of its namespace's pods."""
        namespace, _, name = pool.partition("/")
        pools = Informer(
            self.kube,
            INFERENCE_POOL,
            [namespace],
            self.metrics,
            field_selector=f"metadata.name={name}",
        )

        def pod_informer(selector: str) -> Informer:
            return Informer(
                self.kube,
                POD,
                [namespace],
                self.metrics,
                label_selector=selector,
                transform=slim_pod,
            )

        return InferencePoolDiscovery(registry, telemetry, pools, pod_informer, namespace, name)

    def start(self) -> None:
        """Start the watch threads (and the controller); returns without waiting for them."""
        for informer in self.informers:
            informer.start()
        if self.pool is not None:
            self.pool.start()
        if self.controller is not None:
            self._task = asyncio.create_task(self.controller.run(), name="httproute-controller")

    async def wait_loaded(self) -> None:
        """Until discovery has put the first complete pod list into the registry."""
        if self.pool is not None:
            await self.pool.wait_loaded()
        elif self._pods is not None:
            await self._pods.wait_synced()

    async def stop(self) -> None:
        await cancel_and_wait([self._task])
        for informer in self.informers:
            await informer.stop()
        if self.pool is not None:
            await self.pool.stop()
        self.api.close()  # type: ignore[no-untyped-call]
