"""Validation of Kubernetes objects against the official CRD schemas in ``../shared/crds``.

jsonschema checks each object against its CRD's ``openAPIV3Schema``, made strict: an object
schema that lists its properties rejects any other key (as ``kubectl apply --validate=strict``
does), so a misspelt field fails instead of being pruned silently. Not checked: the CEL rules
(``x-kubernetes-validations``), which need an API server. Built-in kinds are checked by a round
trip through the ``kubernetes`` client's models, which drop unknown fields.
"""

from __future__ import annotations

import copy
import json
import os
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


def _shared() -> Path:
    """The product's shared folder (official CRDs, seed examples): ``$EXTPROC_SHARED_DIR``, else
    beside the checkout, else the workplace's ``/work/shared`` (a clone made elsewhere)."""
    candidates = (os.environ.get("EXTPROC_SHARED_DIR"), REPO.parent / "shared", "/work/shared")
    for candidate in candidates:
        if candidate and (Path(candidate) / "crds").is_dir():
            return Path(candidate)
    return REPO.parent / "shared"


SHARED = _shared()
CRDS = SHARED / "crds"
SEED = SHARED / "seed-examples"


def require_shared(path: Path) -> Path:
    """Skip, saying where it looked, when the shared folder is not on this machine."""
    if not path.exists():
        pytest.skip(f"{path} is not here: set EXTPROC_SHARED_DIR to the product's shared folder")
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
def crds() -> dict[tuple[str, str], Crd]:
    """``(apiVersion, kind)`` -> schema, for every served version of every shared CRD."""
    require_shared(CRDS)
    found: dict[tuple[str, str], Crd] = {}
    for path in sorted(CRDS.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if not document or document.get("kind") != "CustomResourceDefinition":
                continue
            spec = document["spec"]
            for version in spec["versions"]:
                if not version.get("served", True):
                    continue
                api_version = f"{spec['group']}/{version['name']}"
                found[(api_version, spec["names"]["kind"])] = Crd(
                    spec["group"],
                    version["name"],
                    spec["names"]["kind"],
                    spec["scope"] == "Namespaced",
                    strict(version["schema"]["openAPIV3Schema"]),
                )
    return found


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


def errors(obj: Obj) -> list[str]:
    """Every problem found with ``obj``; KeyError when neither a CRD nor a core model knows it."""
    key = (obj.get("apiVersion", ""), obj.get("kind", ""))
    if key in CORE_MODELS:
        return metadata_errors(obj, obj["kind"] not in CLUSTER_SCOPED_CORE) + core_errors(obj)
    crd = crds()[key]
    validator = jsonschema.Draft7Validator(crd.schema)
    found = [
        f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
        for e in validator.iter_errors(obj)
    ]
    return metadata_errors(obj, crd.namespaced) + found
