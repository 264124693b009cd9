"""Access to the Kubernetes API with the official (synchronous) client, objects as plain dicts.

Every call here blocks: callers on the event loop go through ``asyncio.to_thread`` and watches run
in their own threads (``extproc.kube.informer``). Objects stay JSON dicts rather than the client's
models so that custom resources (ModelAdapter, HTTPRoute) and built-in kinds are handled alike.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from extproc.config import ConfigError

LIST_TIMEOUT = 30.0
CONNECT_TIMEOUT = 10.0
REQUEST_TIMEOUT = (CONNECT_TIMEOUT, LIST_TIMEOUT)
"""Every call is bounded: a hung API server must not hang a thread (or shutdown) for ever."""
POOL_SIZE = 32
"""Connections kept per API server: one per watch thread plus the writers."""

__all__ = ["ApiException", "Kube", "Resource", "load_api_client"]


@dataclass(frozen=True)
class Resource:
    group: str
    version: str
    plural: str
    kind: str

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


POD = Resource("", "v1", "pods", "Pod")
DEPLOYMENT = Resource("apps", "v1", "deployments", "Deployment")
MODEL_ADAPTER = Resource("model.aibrix.ai", "v1alpha1", "modeladapters", "ModelAdapter")
HTTPROUTE = Resource("gateway.networking.k8s.io", "v1", "httproutes", "HTTPRoute")
REFERENCE_GRANT = Resource(
    "gateway.networking.k8s.io", "v1beta1", "referencegrants", "ReferenceGrant"
)
INFERENCE_POOL = Resource("inference.networking.k8s.io", "v1", "inferencepools", "InferencePool")


def _as_dict(result: object) -> dict[str, Any]:
    if not isinstance(result, dict):
        raise TypeError(f"expected a JSON object from the API, got {type(result).__name__}")
    return result


def load_api_client(kubeconfig: Path | None, user_agent: str = "extproc") -> client.ApiClient:
    """An API client from ``kubeconfig``, else the pod's service account, else the default file.

    A fresh ``Configuration`` every time: the library's global default is never touched, so
    several clients (tests, two controllers) can coexist in one process.
    """
    configuration = client.Configuration()
    if kubeconfig is not None and not kubeconfig.is_file():
        raise ConfigError("kubeconfig", f"{kubeconfig} is not a readable file")
    try:
        if kubeconfig is not None:
            config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)  # type: ignore[no-untyped-call]
        elif os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        else:
            config.load_kube_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    except (config.ConfigException, OSError, TypeError, ValueError) as exc:
        where = "kubeconfig" if kubeconfig is not None else "kubeconfig (in-cluster or default)"
        raise ConfigError(where, f"cannot load Kubernetes credentials: {exc}") from None
    configuration.connection_pool_maxsize = POOL_SIZE
    api = client.ApiClient(configuration)
    api.user_agent = user_agent
    return api


class Kube:
    """List and watch any resource above; read and write those in API groups (not Pods)."""

    def __init__(self, api: client.ApiClient) -> None:
        self.api = api
        self._core = client.CoreV1Api(api)
        self._apps = client.AppsV1Api(api)
        self._custom = client.CustomObjectsApi(api)

    def _list_function(self, resource: Resource, namespace: str | None) -> Callable[..., Any]:
        if resource == POD:
            if namespace is None:
                return self._core.list_pod_for_all_namespaces
            return functools.partial(self._core.list_namespaced_pod, namespace)
        if resource == DEPLOYMENT:
            if namespace is None:
                return self._apps.list_deployment_for_all_namespaces
            return functools.partial(self._apps.list_namespaced_deployment, namespace)
        if namespace is None:
            return functools.partial(
                self._custom.list_cluster_custom_object,
                resource.group,
                resource.version,
                resource.plural,
            )
        return functools.partial(
            self._custom.list_namespaced_custom_object,
            resource.group,
            resource.version,
            namespace,
            resource.plural,
        )

    def list(
        self,
        resource: Resource,
        namespace: str | None,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> tuple[list[dict[str, Any]], str]:
        """Items (``kind`` and ``apiVersion`` filled in) and the list's resourceVersion."""
        response = self._list_function(resource, namespace)(
            label_selector=label_selector,
            field_selector=field_selector,
            _preload_content=False,
            _request_timeout=REQUEST_TIMEOUT,
        )
        try:
            document = json.loads(response.data)
        finally:
            response.release_conn()
        items = [
            {"apiVersion": resource.api_version, "kind": resource.kind, **item}
            for item in document.get("items") or []
        ]
        return items, str((document.get("metadata") or {}).get("resourceVersion", ""))

    def watch(
        self,
        resource: Resource,
        namespace: str | None,
        label_selector: str | None,
        resource_version: str,
        timeout_seconds: int,
        on_open: Callable[[watch.Watch], None],
        field_selector: str | None = None,
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """``(event type, object)`` from ``resource_version`` on, until the server ends the watch.

        An expired resourceVersion raises ``ApiException`` with status 410 (the caller re-lists).
        ``on_open`` receives the ``Watch`` so another thread can stop it.
        """
        stream = watch.Watch(return_type="object")  # type: ignore[no-untyped-call]
        on_open(stream)
        events = stream.stream(  # type: ignore[no-untyped-call]
            self._list_function(resource, namespace),
            label_selector=label_selector,
            field_selector=field_selector,
            resource_version=resource_version,
            timeout_seconds=timeout_seconds,
            allow_watch_bookmarks=True,
            _request_timeout=(CONNECT_TIMEOUT, timeout_seconds + LIST_TIMEOUT),
        )
        for event in events:
            obj = event["raw_object"]
            if isinstance(obj, dict):
                yield (
                    str(event["type"]),
                    {
                        "apiVersion": resource.api_version,
                        "kind": resource.kind,
                        **obj,
                    },
                )

    def get(self, resource: Resource, namespace: str, name: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        try:
            result = self._custom.get_namespaced_custom_object(
                resource.group,
                resource.version,
                namespace,
                resource.plural,
                name,
                _request_timeout=REQUEST_TIMEOUT,
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return _as_dict(result)

    def create(self, resource: Resource, body: dict[str, Any]) -> dict[str, Any]:
        namespace = body["metadata"]["namespace"]
        result = self._custom.create_namespaced_custom_object(
            resource.group,
            resource.version,
            namespace,
            resource.plural,
            body,
            _request_timeout=REQUEST_TIMEOUT,
        )
        return _as_dict(result)

    def replace(self, resource: Resource, body: dict[str, Any]) -> dict[str, Any]:
        """PUT with the body's resourceVersion: a concurrent writer makes this fail with 409."""
        meta = body["metadata"]
        result = self._custom.replace_namespaced_custom_object(
            resource.group,
            resource.version,
            meta["namespace"],
            resource.plural,
            meta["name"],
            body,
            _request_timeout=REQUEST_TIMEOUT,
        )
        return _as_dict(result)

    def delete(self, resource: Resource, namespace: str, name: str) -> None:
        try:
            self._custom.delete_namespaced_custom_object(
                resource.group,
                resource.version,
                namespace,
                resource.plural,
                name,
                _request_timeout=REQUEST_TIMEOUT,
            )
        except ApiException as exc:
            if exc.status != 404:
                raise
