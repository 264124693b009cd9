"""Builders for the Kubernetes objects the tests put into the fake API server."""

from __future__ import annotations

from typing import Any

Obj = dict[str, Any]


def pod(
    name: str,
    model: str,
    ip: str | None = "10.0.0.1",
    *,
    namespace: str = "default",
    ready: bool = True,
    port: str | None = None,
    metric_port: str | None = None,
    terminating: bool = False,
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
) -> Obj:
    all_labels = {"model.aibrix.ai/name": model, **(labels or {})}
    if port is not None:
        all_labels["model.aibrix.ai/port"] = port
    if metric_port is not None:
        all_labels["model.aibrix.ai/metric-port"] = metric_port
    metadata: Obj = {"name": name, "namespace": namespace, "labels": all_labels}
    if annotations:
        metadata["annotations"] = annotations
    if terminating:
        metadata["deletionTimestamp"] = "2025-01-01T00:00:00Z"
    status: Obj = {
        "phase": "Running" if ip else "Pending",
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
    }
    if ip:
        status["podIP"] = ip
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai"}]},
        "status": status,
    }


def deployment(
    name: str,
    model: str | None = None,
    *,
    namespace: str = "default",
    port: str | None = None,
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
) -> Obj:
    model = model or name
    all_labels = {"model.aibrix.ai/name": model, **(labels or {})}
    if port is not None:
        all_labels["model.aibrix.ai/port"] = port
    metadata: Obj = {"name": name, "namespace": namespace, "labels": all_labels}
    if annotations:
        metadata["annotations"] = annotations
    selector = {"model.aibrix.ai/name": model}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata,
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": selector},
                "spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai"}]},
            },
        },
    }


def model_adapter(name: str, base: str, instances: list[str], namespace: str = "default") -> Obj:
    return {
        "apiVersion": "model.aibrix.ai/v1alpha1",
        "kind": "ModelAdapter",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"model.aibrix.ai/name": name, "model.aibrix.ai/port": "8000"},
        },
        "spec": {
            "baseModel": base,
            "podSelector": {"matchLabels": {"model.aibrix.ai/name": base}},
            "artifactURL": f"huggingface://example/{name}",
        },
        "status": {"phase": "Running", "instances": instances},
    }
