"""HTTPRoutes (and ReferenceGrants) from model labels, as docs/kubernetes.md describes them.

A pure function of the Deployments and Pods carrying ``model.aibrix.ai/name``, and of the
ModelAdapters on their models (an adapter's name routes to its base model's Service): the CLI
renders from files or a cluster listing, and the controller applies the same output. Everything
about a model that the objects get wrong (a bad port, a key in the wrong place, two sources
disagreeing) comes back as a ``Finding`` beside the objects rather than being guessed at quietly.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from extproc.kube import model_labels as keys
from extproc.kube.model_labels import MisplacedKey, ObjectRef

ROUTE_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")
GATEWAY_GROUP = "gateway.networking.k8s.io"
HTTPROUTE_API = f"{GATEWAY_GROUP}/v1"
REFERENCEGRANT_API = f"{GATEWAY_GROUP}/v1beta1"
"""v1beta1 is the storage version and is served by every Gateway API release Envoy Gateway uses."""
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "extproc-httproutes"
OWNED_SELECTOR = f"{MANAGED_BY_LABEL}={MANAGED_BY}"
SOURCE_KINDS = ("Deployment", "Pod")
ADAPTER_KIND = "ModelAdapter"
MAX_BACKENDS = 16
"""The HTTPRoute schema's limit on backendRefs per rule."""

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_GATEWAY_DURATION = re.compile(r"^([0-9]{1,5}(h|m|s|ms)){1,4}$")
_DURATION_PART = re.compile(r"([0-9]{1,5})(h|ms|m|s)")
_DURATION_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
_NAME_SUFFIX = "-router"
_HASH_LENGTH = 8


@dataclass(frozen=True)
class RouteOptions:
    gateway_namespace: str = "aibrix-system"
    gateway_name: str = "aibrix-eg"
    timeout_seconds: float = 120.0


@dataclass(frozen=True)
class Finding:
    """Something about a model's objects the user should fix; ``code`` is a short stable tag."""

    code: str
    message: str
    model: str | None = None
    ref: ObjectRef | None = None
    misplaced: MisplacedKey | None = None


@dataclass
class Rendering:
    objects: list[dict[str, Any]] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    sources: list[ObjectRef] = field(default_factory=list)
    """Every Deployment and Pod that named a model, for reporting on them."""


@dataclass
class _Source:
    ref: ObjectRef
    port: int | None
    annotations: dict[str, str]


def is_dns1123_label(name: str) -> bool:
    return len(name) <= 63 and bool(_DNS1123_LABEL.match(name))


def is_service_name(name: str) -> bool:
    return len(name) <= 63 and bool(_DNS1035_LABEL.match(name))


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:_HASH_LENGTH]


def _sanitise(text: str) -> str:
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", text.lower())).strip("-")


def route_name(model: str) -> str:
    """``<model>-router``; when that is not a DNS-1123 label, a sanitised stem plus a hash.

    The hash is of the exact model name, so ``DeepSeek-R1`` and ``deepseek-r1`` never share a
    route, and the name is the same on every run and every replica.
    """
    plain = model + _NAME_SUFFIX
    if is_dns1123_label(plain):
        return plain
    suffix = f"-{_short_hash(model)}{_NAME_SUFFIX}"
    stem = _sanitise(model)[: 63 - len(suffix)].rstrip("-") or "model"
    return stem + suffix


def default_service_name(model: str) -> str:
    """The Service named after the model; lower-cased and sanitised when the name cannot be one."""
    if is_service_name(model):
        return model
    stem = _sanitise(model)
    if not stem or not stem[0].isalpha():
        stem = f"m-{stem}".rstrip("-")
    return stem[:63].rstrip("-")


def format_duration(seconds: float) -> str:
    """Seconds as a Gateway API duration: ``120s`` when whole, ``1500ms``, else e.g. ``30h1s``."""
    millis = round(seconds * 1000)
    if millis <= 0:
        return "0s"
    if millis % 1000 == 0 and millis // 1000 <= 99999:
        return f"{millis // 1000}s"
    if millis <= 99999:
        return f"{millis}ms"
    parts = []
    for unit, size in (("h", 3_600_000), ("m", 60_000), ("s", 1000), ("ms", 1)):
        count, millis = divmod(millis, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


def parse_duration(text: str) -> float:
    """A Gateway API duration in seconds; ``ValueError`` when it is not one."""
    if not _GATEWAY_DURATION.match(text):
        raise ValueError(f"{text!r} is not a Gateway API duration such as 120s, 5m or 1500ms")
    return sum(int(n) * _DURATION_UNITS[unit] for n, unit in _DURATION_PART.findall(text))


def flatten(documents: Iterable[Any]) -> list[dict[str, Any]]:
    """Objects from YAML documents, expanding lists (``kubectl get -o yaml`` prints a List)."""
    objects: list[dict[str, Any]] = []
    for document in documents:
        if not isinstance(document, dict):
            continue
        if document.get("kind") == "List" or (
            str(document.get("kind", "")).endswith("List") and "items" in document
        ):
            item_kind = str(document.get("kind", ""))[: -len("List")]
            for item in document.get("items") or []:
                if isinstance(item, dict):
                    if item_kind and "kind" not in item:
                        item = {**item, "kind": item_kind}
                    objects.append(item)
        else:
            objects.append(document)
    return objects


def render(objects: Iterable[Mapping[str, Any]], options: RouteOptions) -> Rendering:
    """The HTTPRoutes and ReferenceGrants the given Deployments and Pods call for."""
    result = Rendering()
    models: dict[str, list[_Source]] = {}
    adapters: list[tuple[str, str, ObjectRef]] = []
    for obj in objects:
        if obj.get("kind") == ADAPTER_KIND:
            base = (obj.get("spec") or {}).get("baseModel")
            if isinstance(base, str) and base:
                adapters.append((obj["metadata"]["name"], base, keys.ref_of(obj)))
            continue
        if obj.get("kind") not in SOURCE_KINDS:
            continue
        labels, annotations = keys.metadata(obj)
        model = labels.get(keys.NAME)
        if not model:
            continue
        ref = keys.ref_of(obj)
        result.sources.append(ref)
        for item in keys.misplaced_keys(labels, annotations):
            result.findings.append(
                Finding(
                    "misplaced_key",
                    f"{ref}: {item.key} is under {item.found_in}, where it is ignored; "
                    f"move it to {item.belongs_in}",
                    model,
                    ref,
                    item,
                )
            )
        try:
            port = keys.parse_port(labels.get(keys.PORT), keys.PORT, None)
        except ValueError as exc:
            result.findings.append(
                Finding("invalid_port", f"{ref}: {exc}; not used for routes", model, ref)
            )
            continue
        models.setdefault(model, []).append(_Source(ref, port, annotations))

    taken: dict[str, str] = {}
    for model in sorted(models):
        sources = sorted(models[model], key=lambda s: (s.ref.kind != "Deployment", s.ref))
        name = route_name(model)
        if name in taken:
            result.findings.append(
                Finding(
                    "name_collision",
                    f"model {model!r} maps to route {name}, already used by {taken[name]!r}",
                    model,
                )
            )
            continue
        taken[name] = model
        result.objects.extend(_model_objects(model, name, sources, options, result.findings))
    _adapter_routes(adapters, models, taken, result)
    result.objects.sort(
        key=lambda o: (o["kind"], o["metadata"]["namespace"], o["metadata"]["name"])
    )
    return result


def _first_agreed(
    model: str,
    values: list[tuple[ObjectRef, Any]],
    what: str,
    findings: list[Finding],
) -> Any:
    """The value of the first source that sets it; disagreement from later ones is reported."""
    if not values:
        return None
    chosen_ref, chosen = values[0]
    for ref, value in values[1:]:
        if value != chosen:
            findings.append(
                Finding(
                    "conflict",
                    f"model {model!r}: {ref} says {what} {value!r} but {chosen_ref} says "
                    f"{chosen!r}; using {chosen!r}",
                    model,
                    ref,
                )
            )
    return chosen


def _model_objects(
    model: str,
    name: str,
    sources: list[_Source],
    options: RouteOptions,
    findings: list[Finding],
) -> list[dict[str, Any]]:
    port = _first_agreed(
        model, [(s.ref, s.port) for s in sources if s.port is not None], "port", findings
    )
    port = keys.DEFAULT_PORT if port is None else port

    timeouts: list[tuple[ObjectRef, float]] = []
    services: list[tuple[ObjectRef, str]] = []
    for source in sources:
        text = source.annotations.get(keys.ROUTE_TIMEOUT)
        if text is not None:
            try:
                timeouts.append((source.ref, parse_duration(text.strip())))
            except ValueError as exc:
                findings.append(
                    Finding(
                        "invalid_annotation",
                        f"{source.ref}: {keys.ROUTE_TIMEOUT}: {exc}; using the default",
                        model,
                        source.ref,
                    )
                )
        service = source.annotations.get(keys.SERVICE_NAME)
        if service is not None:
            if is_service_name(service):
                services.append((source.ref, service))
            else:
                findings.append(
                    Finding(
                        "invalid_annotation",
                        f"{source.ref}: {keys.SERVICE_NAME}={service!r} is not a Service name",
                        model,
                        source.ref,
                    )
                )
    timeout = _first_agreed(model, timeouts, "route timeout", findings)
    service = _first_agreed(model, services, "service name", findings)
    if service is None:
        service = default_service_name(model)
        if service != model:
            findings.append(
                Finding(
                    "derived_service_name",
                    f"model {model!r} cannot name a Service; routing to Service {service!r} "
                    f"(set annotation {keys.SERVICE_NAME} to choose another)",
                    model,
                )
            )

    namespaces = sorted({s.ref.namespace for s in sources})
    if len(namespaces) > MAX_BACKENDS:
        findings.append(
            Finding(
                "too_many_namespaces",
                f"model {model!r} runs in {len(namespaces)} namespaces; an HTTPRoute rule holds "
                f"{MAX_BACKENDS} backends, so only {', '.join(namespaces[:MAX_BACKENDS])} get "
                "traffic",
                model,
            )
        )
        namespaces = namespaces[:MAX_BACKENDS]
    labels = {MANAGED_BY_LABEL: MANAGED_BY, keys.NAME: model}
    route = {
        "apiVersion": HTTPROUTE_API,
        "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": options.gateway_namespace, "labels": labels},
        "spec": {
            "parentRefs": [
                {
                    "group": GATEWAY_GROUP,
                    "kind": "Gateway",
                    "name": options.gateway_name,
                    "namespace": options.gateway_namespace,
                }
            ],
            "rules": [
                {
                    "matches": [
                        {
                            "path": {"type": "PathPrefix", "value": path},
                            "headers": [{"type": "Exact", "name": "model", "value": model}],
                        }
                        for path in ROUTE_PATHS
                    ],
                    "backendRefs": [
                        {
                            "group": "",
                            "kind": "Service",
                            "name": service,
                            "namespace": namespace,
                            "port": port,
                            "weight": 1,
                        }
                        for namespace in namespaces
                    ],
                    "timeouts": {
                        "request": format_duration(
                            options.timeout_seconds if timeout is None else timeout
                        )
                    },
                }
            ],
        },
    }
    objects: list[dict[str, Any]] = [route]
    for namespace in namespaces:
        if namespace == options.gateway_namespace:
            continue
        objects.append(
            {
                "apiVersion": REFERENCEGRANT_API,
                "kind": "ReferenceGrant",
                "metadata": {"name": name, "namespace": namespace, "labels": dict(labels)},
                "spec": {
                    "from": [
                        {
                            "group": GATEWAY_GROUP,
                            "kind": "HTTPRoute",
                            "namespace": options.gateway_namespace,
                        }
                    ],
                    "to": [{"group": "", "kind": "Service", "name": service}],
                },
            }
        )
    return objects


def _adapter_routes(
    adapters: list[tuple[str, str, ObjectRef]],
    models: Mapping[str, list[_Source]],
    taken: dict[str, str],
    result: Rendering,
) -> None:
    """A route per adapter: its name in the ``model`` header goes to the base model's Service
    (the server has already picked a pod of that Service holding the adapter). The base
    model's ReferenceGrants cover it: they admit any HTTPRoute of the gateway namespace."""
    routes = {
        o["metadata"]["labels"][keys.NAME]: o for o in result.objects if o["kind"] == "HTTPRoute"
    }
    for adapter, base, ref in sorted(adapters, key=lambda a: (a[0], a[2])):
        base_route = routes.get(base)
        if base_route is None:
            if base not in models:
                result.findings.append(
                    Finding(
                        "adapter_without_model",
                        f"{ref}: base model {base!r} has no Deployment or Pod labelled "
                        f"{keys.NAME}; no route for adapter {adapter!r}",
                        adapter,
                        ref,
                    )
                )
            continue
        name = route_name(adapter)
        if adapter in models or name in taken:
            result.findings.append(
                Finding(
                    "name_collision",
                    f"{ref}: adapter {adapter!r} maps to route {name}, already used by "
                    f"{taken.get(name, adapter)!r}",
                    adapter,
                    ref,
                )
            )
            continue
        taken[name] = adapter
        rule = dict(base_route["spec"]["rules"][0])
        rule["matches"] = [
            {**match, "headers": [{"type": "Exact", "name": "model", "value": adapter}]}
            for match in rule["matches"]
        ]
        labels = {MANAGED_BY_LABEL: MANAGED_BY, keys.NAME: adapter}
        result.objects.append(
            {
                "apiVersion": HTTPROUTE_API,
                "kind": "HTTPRoute",
                "metadata": {**base_route["metadata"], "name": name, "labels": labels},
                "spec": {**base_route["spec"], "rules": [rule]},
            }
        )
