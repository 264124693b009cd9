"""The kubernetes provider: Pods labelled ``model.aibrix.ai/name`` and ModelAdapter instances.

A pod is routable when its Ready condition is True, it has a pod IP and it is not terminating
(no deletionTimestamp). Pods that are not routable stay in the registry as not ready, so their
model is known and a request gets 503 (retry later) rather than 404; a pod with no IP yet gets the
placeholder address ``0.0.0.0:<port>``, which is never routed to nor scraped. Registry names are
``<namespace>/<pod>``, unique across namespaces. A ModelAdapter's name (its ``model.aibrix.ai/name``
label, else ``metadata.name``) becomes a model served by the pods in its ``status.instances``.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

from extproc.fleet.registry import PodRegistry, PodSpec
from extproc.kube import model_labels as keys
from extproc.kube.informer import Change, Informer, Obj
from extproc.kube.model_labels import MisplacedKeyReport
from extproc.telemetry import Telemetry

log = logging.getLogger(__name__)

UNASSIGNED_IP = "0.0.0.0"


class PodLabelError(ValueError):
    """A pod whose model labels cannot be turned into an address."""


def slim_pod(pod: Obj) -> Obj:
    """The parts of a Pod discovery reads; keeps the watch cache small on large clusters."""
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    return {
        "apiVersion": pod.get("apiVersion", "v1"),
        "kind": "Pod",
        "metadata": {
            k: meta[k]
            for k in ("name", "namespace", "uid", "labels", "annotations", "deletionTimestamp")
            if k in meta
        },
        "status": {k: status[k] for k in ("podIP", "conditions", "phase") if k in status},
    }


def is_ready(pod: Obj) -> bool:
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    if meta.get("deletionTimestamp") or not status.get("podIP"):
        return False
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )


def pod_name(namespace: str, name: str) -> str:
    return f"{namespace}/{name}"


def pod_host(pod: Obj) -> str:
    """The pod IP as it goes in ``host:port`` (IPv6 bracketed); ``UNASSIGNED_IP`` before it has
    one. Raises ``PodLabelError``."""
    ip = (pod.get("status") or {}).get("podIP") or ""
    if not ip:
        return UNASSIGNED_IP
    try:
        return f"[{ip}]" if ipaddress.ip_address(ip).version == 6 else ip
    except ValueError:
        raise PodLabelError(f"status.podIP {ip!r} is not an IP address") from None


def pod_spec(pod: Obj, adapters: frozenset[str] = frozenset()) -> PodSpec:
    meta = pod["metadata"]
    labels = meta.get("labels") or {}
    namespace = meta.get("namespace") or "default"
    try:
        port = keys.parse_port(labels.get(keys.PORT), keys.PORT, keys.DEFAULT_PORT)
        metric_port = keys.parse_port(labels.get(keys.METRIC_PORT), keys.METRIC_PORT, None)
    except ValueError as exc:
        raise PodLabelError(str(exc)) from None
    host = pod_host(pod)
    assigned = host != UNASSIGNED_IP
    metrics_url = f"http://{host}:{metric_port}/metrics" if assigned and metric_port else ""
    return PodSpec(
        kv_events=kv_events_endpoint(meta.get("annotations") or {}, host),
        name=pod_name(namespace, meta["name"]),
        address=f"{host}:{port}",
        model=labels[keys.NAME],
        adapters=adapters,
        metrics_url=metrics_url,
        ready=is_ready(pod),
        namespace=namespace,
    )


KV_EVENTS_PORT = "model.aibrix.ai/kv-events-port"
"""Pod annotation: the port the pod publishes KV-cache events on, or ``auto`` (ask the pod)."""


def kv_events_endpoint(annotations: dict[str, str], host: str, rank: int = 0) -> str:
    """The pod's ``PodSpec.kv_events``. ``rank`` offsets the annotated port, as vLLM offsets
    each data-parallel rank's publisher."""
    value = annotations.get(KV_EVENTS_PORT, "").strip()
    if not value:
        return ""
    if value == "auto":
        return value
    try:
        port = int(keys.parse_port(value, KV_EVENTS_PORT, None) or 0) + rank
    except ValueError as exc:
        raise PodLabelError(str(exc)) from None
    if port > 65535:
        raise PodLabelError(f"{KV_EVENTS_PORT}={value} + rank {rank} is not a TCP port")
    return f"tcp://{host}:{port}"


def adapter_model(adapter: Obj) -> str:
    labels, _ = keys.metadata(adapter)
    return labels.get(keys.NAME) or adapter["metadata"]["name"]


class KubernetesDiscovery:
    """Keeps the registry in step with the Pod and ModelAdapter informers (on the loop)."""

    def __init__(
        self,
        registry: PodRegistry,
        telemetry: Telemetry,
        pods: Informer,
        adapters: Informer,
        misplaced: MisplacedKeyReport,
    ) -> None:
        self._registry = registry
        self._telemetry = telemetry
        self._pods = pods
        self._adapters = adapters
        self._misplaced = misplaced
        self._adapters_by_pod: dict[str, frozenset[str]] = {}
        self._bad_pods: set[str] = set()
        pods.subscribe(self._on_pod)
        adapters.subscribe(self._on_adapter)

    def _spec(self, pod: Obj) -> PodSpec | None:
        meta = pod["metadata"]
        namespace = meta.get("namespace") or "default"
        name = pod_name(namespace, meta["name"])
        labels, annotations = keys.metadata(pod)
        self._misplaced.report(keys.ref_of(pod), keys.misplaced_keys(labels, annotations))
        if not labels.get(keys.NAME):
            return None
        try:
            spec = pod_spec(pod, self._adapters_by_pod.get(name, frozenset()))
        except PodLabelError as exc:
            if name not in self._bad_pods:
                self._bad_pods.add(name)
                self._telemetry.discovery_errors.labels("kubernetes").inc()
                log.error(
                    "pod %s is not routable: %s",
                    name,
                    exc,
                    extra={"provider": "kubernetes", "pod": name},
                )
            return None
        self._bad_pods.discard(name)
        return spec

    def _on_pod(self, change: Change) -> None:
        if not self._pods.synced:
            return  # the reset that completes the first listing applies everything at once
        if change.type == "reset" or change.obj is None:
            self._apply_all()
            return
        meta = change.obj["metadata"]
        namespace = meta.get("namespace") or "default"
        name = pod_name(namespace, meta["name"])
        if change.type == "delete":
            self._misplaced.forget(keys.ref_of(change.obj))
            self._bad_pods.discard(name)
            self._registry.remove(name)
            return
        spec = self._spec(change.obj)
        if spec is None:
            self._registry.remove(name)
        else:
            self._registry.upsert(spec)

    def _apply_all(self) -> None:
        pods = self._pods.objects()
        specs = [spec for pod in pods if (spec := self._spec(pod)) is not None]
        present = {keys.ref_of(pod) for pod in pods}
        for ref in self._misplaced.refs():
            if ref.kind == "Pod" and ref not in present:
                self._misplaced.forget(ref)
        first = not self._registry.loaded
        self._registry.replace_all(specs)
        if first:
            log.info(
                "loaded %d pods (%d ready) from the Kubernetes API",
                len(specs),
                sum(s.ready for s in specs),
                extra={"provider": "kubernetes"},
            )

    def _on_adapter(self, change: Change) -> None:
        index: dict[str, set[str]] = {}
        for adapter in self._adapters.objects():
            namespace = adapter["metadata"].get("namespace") or "default"
            model = adapter_model(adapter)
            status: dict[str, Any] = adapter.get("status") or {}
            for instance in status.get("instances") or []:
                if isinstance(instance, str):
                    index.setdefault(pod_name(namespace, instance), set()).add(model)
        updated = {name: frozenset(models) for name, models in index.items()}
        changed = {
            name
            for name in set(updated) | set(self._adapters_by_pod)
            if updated.get(name) != self._adapters_by_pod.get(name)
        }
        self._adapters_by_pod = updated
        if not changed or not self._pods.synced:
            return
        for name in sorted(changed):
            namespace, _, pod = name.partition("/")
            obj = self._pods.get(namespace, pod)
            if obj is None:
                continue
            spec = self._spec(obj)
            if spec is not None:
                self._registry.upsert(spec)
                log.info(
                    "pod %s serves adapters %s",
                    name,
                    ", ".join(sorted(spec.adapters)) or "(none)",
                    extra={"provider": "kubernetes", "pod": name},
                )
