"""The server's Kubernetes side: shared watches, pod discovery and the HTTPRoute controller.

Built only when ``discovery: kubernetes`` or ``manage_httproutes`` asks for it. The Pod watch is
shared: discovery and the controller read the same cache, so a pod is fetched once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid

from extproc.config import KubernetesSettings
from extproc.discovery.kubernetes import KubernetesDiscovery, slim_pod
from extproc.fleet.registry import PodRegistry
from extproc.kube.client import DEPLOYMENT, MODEL_ADAPTER, POD, Kube, load_api_client
from extproc.kube.controller import HTTPRouteController, slim_deployment
from extproc.kube.httproutes import RouteOptions
from extproc.kube.informer import Informer
from extproc.kube.lease import LeaderLease
from extproc.kube.metrics import KubeMetrics
from extproc.kube.model_labels import SELECTOR, MisplacedKeyReport
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
        discover_pods: bool,
    ) -> None:
        self.identity = replica_identity()
        self.api = load_api_client(settings.kubeconfig, user_agent=f"extproc/{self.identity}")
        self.kube = Kube(self.api)
        self.metrics = KubeMetrics(telemetry.registry)
        namespaces = settings.namespaces or None
        misplaced = MisplacedKeyReport(self.metrics.misplaced_keys)
        self.pods = Informer(
            self.kube,
            POD,
            namespaces,
            self.metrics,
            label_selector=SELECTOR,
            transform=slim_pod,
        )
        self.informers = [self.pods]
        self.discovery: KubernetesDiscovery | None = None
        if discover_pods:
            adapters = Informer(self.kube, MODEL_ADAPTER, namespaces, self.metrics)
            self.informers.append(adapters)
            self.discovery = KubernetesDiscovery(
                registry, telemetry, self.pods, adapters, misplaced
            )
        self.controller: HTTPRouteController | None = None
        if settings.manage_httproutes:
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
                self.pods,
                lease,
                options,
                self.metrics,
                misplaced,
                namespaces,
            )
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the watch threads (and the controller); returns without waiting for them."""
        for informer in self.informers:
            informer.start()
        if self.controller is not None:
            self._task = asyncio.create_task(self.controller.run(), name="httproute-controller")

    async def wait_loaded(self) -> None:
        """Until discovery has put the first complete pod list into the registry."""
        await self.pods.wait_synced()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for informer in self.informers:
            await informer.stop()
        self.api.close()  # type: ignore[no-untyped-call]
