"""Validation of Kubernetes objects against the official CRD schemas vendored in ``tests/crds``.

jsonschema checks each object against its CRD's ``openAPIV3Schema``, made strict: an object
schema that lists its properties rejects any other key (as ``kubectl apply --validate=strict``
does), so a misspelt field fails instead of being pruned silently. Envoy Gateway's CRDs are kept
per release (``tests/crds/envoy-gateway-v*``): the oldest and the newest the manifests support, and
v1.4.0 for the patch-policy overlay only; an object must validate against every release it is
meant for, so a field one of them lacks fails. Not checked: the CEL
rules (``x-kubernetes-validations``), which need an API server. Built-in kinds are checked by a
round trip through the ``kubernetes`` client's models, which drop unknown fields. A kind no
vendored CRD serves is a failure (``KeyError``), never a skip.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from kubernetes.client import ApiClient

REPO = Path(__file__).resolve().parents[2]
CRDS = REPO / "tests" / "crds"
SEED = Path(__file__).resolve().parent / "seed-examples"
"""The objects users deploy today (a model Deployment, a hand-made HTTPRoute, a ModelAdapter)."""
PRE_ENDPOINT_OVERRIDE = "envoy-gateway-v1.4.0"
"""A release older than the base supports (no ``loadBalancer.endpointOverride``): only the
patch-policy overlay is checked against it."""


def require_shared(path: Path) -> Path:
    """``path``, which is vendored in the repository: its absence fails the test."""
    if not path.exists():
        pytest.fail(f"{path} is missing from the checkout")
    return path


Obj = dict[str, Any]

CORE_MODELS = {
    ("v1", "Namespace"): "V1Namespace",
    ("v1", "ServiceAccount"): "V1ServiceAccount",
    ("v1", "Service"): "V1Service",
    ("v1", "PersistentVolumeClaim"): "V1PersistentVolumeClaim",
    ("v1", "Pod"): "V1Pod",
    ("apps/v1", "Deployment"): "V1Deployment",
    ("rbac.authorization.k8s.io/v1", "ClusterRole"): "V1ClusterRole",
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"): "V1ClusterRoleBinding",
    ("rbac.authorization.k8s.io/v1", "Role"): "V1Role",
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): "V1RoleBinding",
    ("policy/v1", "PodDisruptionBudget"): "V1PodDisruptionBudget",
    ("autoscaling/v2", "HorizontalPodAutoscaler"): "V2HorizontalPodAutoscaler",
}
CLUSTER_SCOPED_CORE = {"Namespace", "ClusterRole", "ClusterRoleBinding"}

_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_NAME = re.compile(
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


@dataclass(frozen=True)
class Crd:
    group: str
    version: str
    kind: str
    namespaced: bool
    schema: Obj


def strict(schema: Any) -> Any:
    """A copy where every object schema with ``properties`` forbids keys it does not list."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict(value) for key, value in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@cache
def releases() -> dict[tuple[str, str], dict[str, Crd]]:
    """``(apiVersion, kind)`` -> {release folder ("" for tests/crds itself) -> schema}, for every
    served version of every vendored CRD."""
    if not CRDS.is_dir():
        pytest.fail(f"{CRDS} is missing from the checkout")
    found: dict[tuple[str, str], dict[str, Crd]] = {}
    for path in sorted(CRDS.rglob("*.yaml")):
        release = "" if path.parent == CRDS else path.parent.name
        for document in yaml.safe_load_all(path.read_text()):
            if not document or document.get("kind") != "CustomResourceDefinition":
                continue
            spec = document["spec"]
            for version in spec["versions"]:
                if not version.get("served", True):
                    continue
                api_version = f"{spec['group']}/{version['name']}"
                found.setdefault((api_version, spec["names"]["kind"]), {})[release] = Crd(
                    spec["group"],
                    version["name"],
                    spec["names"]["kind"],
                    spec["scope"] == "Namespaced",
                    strict(version["schema"]["openAPIV3Schema"]),
                )
    return found


def crds() -> dict[tuple[str, str], Crd]:
    """``(apiVersion, kind)`` -> the schema of the newest vendored release serving it."""
    return {key: by[max(by, key=_release_order)] for key, by in releases().items()}


def _release_order(release: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", release))


def schema_at(api_version: str, kind: str, *path: str) -> Obj:
    """A sub-schema of a CRD, following ``properties`` (and ``items`` for ``[]``)."""
    node = crds()[(api_version, kind)].schema
    for step in path:
        node = node["items"] if step == "[]" else node["properties"][step]
    return copy.deepcopy(node)


def metadata_errors(obj: Obj, namespaced: bool) -> list[str]:
    meta = obj.get("metadata") or {}
    errors = []
    name = meta.get("name", "")
    if not name or len(name) > 253 or not _SUBDOMAIN.match(name):
        errors.append(f"metadata.name {name!r} is not a DNS-1123 subdomain")
    if namespaced and not meta.get("namespace"):
        errors.append("metadata.namespace is missing on a namespaced kind")
    if not namespaced and "namespace" in meta:
        errors.append("metadata.namespace is set on a cluster-scoped kind")
    for key, value in (meta.get("labels") or {}).items():
        if not _LABEL_NAME.match(key):
            errors.append(f"label key {key!r} is invalid")
        if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE.match(value):
            errors.append(f"label {key} value {value!r} is invalid")
    return errors


def core_errors(obj: Obj) -> list[str]:
    """Differences after a round trip through the client's model (unknown fields vanish)."""
    model = CORE_MODELS[(obj["apiVersion"], obj["kind"])]
    client = ApiClient()
    typed = client.deserialize(json.dumps(obj), model, "application/json")
    back = client.sanitize_for_serialization(typed)
    return [f"round trip through {model} changed: {d}" for d in _differences(obj, back, "")]


def _differences(a: Any, b: Any, where: str) -> Iterator[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if key not in b:
                yield f"{where}.{key} dropped"
            elif key not in a:
                yield f"{where}.{key} added"
            else:
                yield from _differences(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            yield from _differences(x, y, f"{where}[{i}]")
    elif a != b:
        yield f"{where}: {a!r} became {b!r}"


def errors(obj: Obj, older: bool = False) -> list[str]:
    """Every problem found with ``obj``; KeyError when neither a CRD nor a core model knows it.

    A custom resource is checked against every vendored release of its CRD (``older``: also
    ``PRE_ENDPOINT_OVERRIDE``); each message names the release when there are several."""
    key = (obj.get("apiVersion", ""), obj.get("kind", ""))
    if key in CORE_MODELS:
        return metadata_errors(obj, obj["kind"] not in CLUSTER_SCOPED_CORE) + core_errors(obj)
    by_release = {
        release: crd
        for release, crd in releases()[key].items()
        if older or release != PRE_ENDPOINT_OVERRIDE
    }
    found: list[str] = []
    for release, crd in sorted(by_release.items()):
        prefix = f"[{release}] " if len(by_release) > 1 else ""
        validator = jsonschema.Draft7Validator(crd.schema)
        found += [
            f"{prefix}{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
            for e in validator.iter_errors(obj)
        ]
    namespaced = next(iter(by_release.values())).namespaced
    return metadata_errors(obj, namespaced) + found
