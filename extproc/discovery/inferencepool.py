"""The inferencepool provider: the pods of one InferencePool (Gateway API Inference Extension).

The server is that pool's endpoint picker. It watches the one InferencePool named by
``kubernetes.inference_pool`` (a ``metadata.name`` field selector in the pool's namespace) and
the Pods of that namespace that the pool's ``spec.selector.matchLabels`` select, filtered by the
API server. The selector can change: a new one starts a new Pod watch (a fresh list); until it
has listed, the known pods the new selector still matches stay and the others leave at once.
Pods are never taken from another namespace (the pool's selector is namespace-local).

Each ready pod of the pool is one endpoint per target port: the pool's ``spec.targetPorts`` (up
to 8) are each a distinct endpoint ``<podIP>:<number>`` (a pod running one model server per
data-parallel rank, each on its own port). Every endpoint is a ``PodSpec``:

- name ``<namespace>/<pod>:<port>``, the same whether the pool lists one port or several, so
  adding a port leaves the existing endpoints (and what the server measured of them) alone;
- address ``<podIP>:<port>``; a pod's ``model.aibrix.ai/port`` label is ignored: the pool says
  where its pods serve;
- model: the pod's ``model.aibrix.ai/name`` label, else the pool's name;
- metrics ``http://<podIP>:<port>/metrics``; a ``model.aibrix.ai/metric-port`` label moves them
  to that port for the first target port, that port + i for the i-th;
- KV-cache events from the ``model.aibrix.ai/kv-events-port`` annotation as in the kubernetes
  provider, offset by i for the i-th target port (vLLM offsets each data-parallel rank's
  publisher port by its rank); ``auto`` asks each endpoint;
- ready as the kubernetes provider decides it (Ready condition True, a pod IP, not terminating).
  Pods not ready stay in the registry as not ready: known, never candidates.

The model check: the gateway sends a request to the picker because its route points at the
pool, so the pool's pods serve whatever model name the client sent. A name some ready pods carry
(their label, or the pool's name) is routed among those; any other name is routed among every
ready pod of the pool (the registry's ``ANY_MODEL`` candidates, which the pipeline uses in
endpoint-picker mode), never refused as unknown. In the AIBrix mode only the names pods carry are
served.

A pool that does not exist (not yet, or any more) leaves no pods: logged and counted in
``extproc_discovery_errors_total{provider="inferencepool"}`` once per disappearance; its pods come
back when it appears. A pool whose spec cannot be used (no matchLabels, no valid target port) is
counted the same way and the last good pod set is kept. LoRA adapters (ModelAdapter) are not read:
a cluster running the Inference Extension need not have AIBrix's CRD installed.

The registry counts as loaded once the pool has been listed and, when it exists, its pods too:
until then gRPC health reports NOT_SERVING.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from extproc.discovery.kubernetes import (
    UNASSIGNED_IP,
    PodLabelError,
    is_ready,
    kv_events_endpoint,
    pod_host,
    pod_name,
)
from extproc.fleet.registry import PodRegistry, PodSpec
from extproc.kube import model_labels as keys
from extproc.kube.informer import Change, Informer, Obj
from extproc.telemetry import Telemetry

log = logging.getLogger(__name__)

PROVIDER = "inferencepool"

PodInformerFactory = Callable[[str], Informer]
"""Makes the (not yet started) Pod informer of the pool's namespace for a label selector."""


class PoolSpecError(ValueError):
    """An InferencePool whose selector or target ports cannot be used."""


@dataclass(frozen=True)
class PoolSpec:
    """What discovery uses of an InferencePool."""

    name: str
    match_labels: tuple[tuple[str, str], ...]
    """Sorted, so that the same selector always renders to the same string."""
    ports: tuple[int, ...]
    """``targetPorts[].number`` in order: each is an endpoint on every pod of the pool."""

    @property
    def selector(self) -> str:
        return ",".join(f"{key}={value}" for key, value in self.match_labels)

    def selects(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(key) == value for key, value in self.match_labels)


def parse_pool(pool: Obj) -> PoolSpec:
    """The pool's selector and target ports. Raises ``PoolSpecError``."""
    spec: dict[str, Any] = pool.get("spec") or {}
    match_labels = (spec.get("selector") or {}).get("matchLabels")
    if not isinstance(match_labels, dict) or not match_labels:
        raise PoolSpecError("spec.selector.matchLabels is missing or empty")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in match_labels.items()):
        raise PoolSpecError("spec.selector.matchLabels must map strings to strings")
    targets = spec.get("targetPorts")
    if not isinstance(targets, list) or not targets:
        raise PoolSpecError("spec.targetPorts is missing or empty")
    ports: list[int] = []
    for i, target in enumerate(targets):
        number = target.get("number") if isinstance(target, dict) else None
        if not isinstance(number, int) or isinstance(number, bool) or not 0 < number < 65536:
            raise PoolSpecError(f"spec.targetPorts[{i}].number {number!r} is not a TCP port")
        if number in ports:
            raise PoolSpecError(f"spec.targetPorts[{i}].number {number} is listed twice")
        ports.append(number)
    return PoolSpec(pool["metadata"]["name"], tuple(sorted(match_labels.items())), tuple(ports))


def endpoint_name(namespace: str, pod: str, port: int) -> str:
    return f"{pod_name(namespace, pod)}:{port}"


def pool_pod_specs(pod: Obj, pool: PoolSpec) -> list[PodSpec]:
    """The registry entries of one pod of ``pool``, one per target port. Raises
    ``PodLabelError``."""
    meta = pod["metadata"]
    labels = meta.get("labels") or {}
    annotations = meta.get("annotations") or {}
    namespace = meta.get("namespace") or "default"
    try:
        metric_port = keys.parse_port(labels.get(keys.METRIC_PORT), keys.METRIC_PORT, None)
    except ValueError as exc:
        raise PodLabelError(str(exc)) from None
    host = pod_host(pod)
    assigned = host != UNASSIGNED_IP
    ready = is_ready(pod)
    model = labels.get(keys.NAME) or pool.name
    specs = []
    for rank, port in enumerate(pool.ports):
        metrics_at = port if metric_port is None else metric_port + rank
        if metrics_at > 65535:
            raise PodLabelError(f"{keys.METRIC_PORT}={metric_port} + rank {rank} is not a port")
        specs.append(
            PodSpec(
                name=endpoint_name(namespace, meta["name"], port),
                address=f"{host}:{port}",
                model=model,
                metrics_url=f"http://{host}:{metrics_at}/metrics" if assigned else "",
                ready=ready,
                namespace=namespace,
                kv_events=kv_events_endpoint(annotations, host, rank),
            )
        )
    return specs


class InferencePoolDiscovery:
    """Keeps the registry equal to the pool's pods; owns the pool watch and the Pod watch."""

    def __init__(
        self,
        registry: PodRegistry,
        telemetry: Telemetry,
        pools: Informer,
        pod_informer: PodInformerFactory,
        namespace: str,
        name: str,
    ) -> None:
        self._registry = registry
        self._telemetry = telemetry
        self._pools = pools
        self._pod_informer = pod_informer
        self._namespace = namespace
        self._name = name
        self._ref = f"{namespace}/{name}"
        self._pool: PoolSpec | None = None
        """The last usable spec of the pool; None while it does not exist."""
        self._pods: Informer | None = None
        """The Pod watch for ``_pool``'s selector; None while there is no pool."""
        self._absent = False
        self._rejected: str | None = None
        """The resourceVersion of the unusable pool spec last reported."""
        self._bad_pods: set[str] = set()
        self._retiring: set[asyncio.Task[None]] = set()
        self._loaded = asyncio.Event()
        self._stopped = False
        pools.subscribe(self._on_pool)

    @property
    def pool(self) -> PoolSpec | None:
        return self._pool

    def start(self) -> None:
        """Start the pool watch; the Pod watch starts once the pool is known."""
        self._pools.start()

    async def wait_loaded(self) -> None:
        await self._loaded.wait()

    async def stop(self) -> None:
        self._stopped = True  # results the threads posted before stopping are dropped
        await self._pools.stop()
        if self._pods is not None:
            self._retire(self._pods)
            self._pods = None
        await asyncio.gather(*self._retiring)

    # -- the pool ------------------------------------------------------------------------------

    def _on_pool(self, change: Change) -> None:
        if self._stopped or not self._pools.synced:
            return
        obj = self._pools.get(self._namespace, self._name)
        if obj is None:
            self._pool_missing()
            return
        try:
            pool = parse_pool(obj)
        except PoolSpecError as exc:
            self._pool_rejected(obj, exc)
            return
        self._rejected = None
        if self._absent:
            self._absent = False
            log.info(
                "InferencePool %s exists again",
                self._ref,
                extra={"provider": PROVIDER, "pool": self._ref},
            )
        previous, self._pool = self._pool, pool
        if self._pods is None or previous is None or previous.selector != pool.selector:
            self._watch_pods(pool)
        elif previous != pool:
            log.info(
                "InferencePool %s now serves on ports %s",
                self._ref,
                _ports(pool),
                extra={"provider": PROVIDER, "pool": self._ref},
            )
            self._apply_all()

    def _pool_missing(self) -> None:
        self._pool = None
        if self._pods is not None:
            self._retire(self._pods)
            self._pods = None
        if not self._absent:
            self._absent = True
            self._telemetry.discovery_errors.labels(PROVIDER).inc()
            log.warning(
                "InferencePool %s does not exist: no endpoints until it does",
                self._ref,
                extra={"provider": PROVIDER, "pool": self._ref},
            )
        self._replace([])

    def _pool_rejected(self, obj: Obj, exc: PoolSpecError) -> None:
        version = str((obj.get("metadata") or {}).get("resourceVersion", ""))
        if self._rejected != version:
            self._rejected = version
            self._telemetry.discovery_errors.labels(PROVIDER).inc()
            log.error(
                "InferencePool %s cannot be used (%s); %s",
                self._ref,
                exc,
                "keeping its last good pods" if self._pool is not None else "no endpoints",
                extra={"provider": PROVIDER, "pool": self._ref},
            )
        if self._pool is None:
            self._replace([])

    def _watch_pods(self, pool: PoolSpec) -> None:
        """A fresh Pod watch for ``pool``'s selector, replacing the one for the previous."""
        old = self._pods
        self._pods = informer = self._pod_informer(pool.selector)
        informer.subscribe(functools.partial(self._on_pod, informer))
        if old is not None:
            self._retire(old)
            if old.synced:
                # Pods both selectors match stay routable while the new watch lists.
                self._replace(old.objects())
        informer.start()
        log.info(
            "InferencePool %s selects pods %s in %s, serving on ports %s",
            self._ref,
            pool.selector,
            self._namespace,
            _ports(pool),
            extra={"provider": PROVIDER, "pool": self._ref},
        )

    def _retire(self, informer: Informer) -> None:
        task = asyncio.get_running_loop().create_task(
            informer.stop(), name=f"stop-pod-watch-{self._ref}"
        )
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    # -- its pods ------------------------------------------------------------------------------

    def _on_pod(self, informer: Informer, change: Change) -> None:
        if self._stopped or informer is not self._pods or not informer.synced:
            return  # a retired watch, or the reset completing the first list applies everything
        if change.type == "reset" or change.obj is None:
            self._apply_all()
            return
        meta = change.obj["metadata"]
        namespace = meta.get("namespace") or "default"
        # Every pool change re-applies all pods once this watch has listed, so the pod's entries
        # in the registry are named after the current pool's ports.
        names = [endpoint_name(namespace, meta["name"], port) for port in self._ports()]
        if change.type == "delete":
            self._bad_pods.discard(pod_name(namespace, meta["name"]))
            specs = []
        else:
            specs = self._specs(change.obj)
        kept = {spec.name for spec in specs}
        for name in names:
            if name not in kept:
                self._registry.remove(name)
        for spec in specs:
            self._registry.upsert(spec)

    def _ports(self) -> tuple[int, ...]:
        return self._pool.ports if self._pool is not None else ()

    def _apply_all(self) -> None:
        if self._pods is not None and self._pods.synced:
            self._replace(self._pods.objects())

    def _replace(self, pods: Iterable[Obj]) -> None:
        specs = [spec for pod in pods for spec in self._specs(pod)]
        first = not self._loaded.is_set()
        self._registry.replace_all(specs)
        self._loaded.set()
        if first:
            log.info(
                "loaded %d endpoints (%d ready) of InferencePool %s",
                len(specs),
                sum(s.ready for s in specs),
                self._ref,
                extra={"provider": PROVIDER, "pool": self._ref},
            )

    def _specs(self, pod: Obj) -> list[PodSpec]:
        """The pod's endpoints; none when the pool does not select it or it is not usable."""
        pool = self._pool
        meta = pod["metadata"]
        if pool is None or not pool.selects(meta.get("labels") or {}):
            return []
        name = pod_name(meta.get("namespace") or "default", meta["name"])
        try:
            specs = pool_pod_specs(pod, pool)
        except PodLabelError as exc:
            if name not in self._bad_pods:
                self._bad_pods.add(name)
                self._telemetry.discovery_errors.labels(PROVIDER).inc()
                log.error(
                    "pod %s is not routable: %s",
                    name,
                    exc,
                    extra={"provider": PROVIDER, "pod": name},
                )
            return []
        self._bad_pods.discard(name)
        return specs


def _ports(pool: PoolSpec) -> str:
    return ",".join(str(port) for port in pool.ports)
