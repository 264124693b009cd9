"""The AIBrix-convention bootstrap: the server names the pod in ``target-pod: ip:port``.

What ``extproc dev``, the end-to-end tests and ``extproc envoy-config`` run, shaped like what
Envoy Gateway builds from ``manifests/`` (plus what a plain Envoy needs on its own). Routes, in
order:

1. ``too_large``: a declared body over ``max_body_bytes`` gets the JSON 413 at once.
2. ``<model>-pinned`` (with ``retries`` and known pods): the server chose a pod of this model's
   cluster; override_host load balancing sends the request there and, when it cannot be
   reached, retries on another pod (the next of the server's fallback list with
   ``destination_endpoint_header``, else the least loaded).
3. ``original_route``: any other ``target-pod`` goes to an ORIGINAL_DST cluster reading it (what
   the patch-policy overlay's EnvoyPatchPolicy adds): the server's choice is honoured for pods
   Envoy was never told about (the server's pod file changed, Kubernetes discovery).
4. ``<model>-router``: a request the server routed by model only (no strategy header, no default
   strategy) goes to the model's pods, least-request first, retried on another pod.
5. ``reserved-*``: the inference paths answer a JSON 503 when nothing routed them.

The ext_proc filter sits before the router; requests and Envoy's own errors are JSON
(``local_replies``). ``extproc_tls`` makes Envoy reach the server over TLS (mTLS with a client
certificate).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from extproc.envoy_config import local_replies, parts
from extproc.envoy_config.parts import UpstreamTls

INFERENCE_PREFIXES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")
INFERENCE_PATH_REGEX = "/v1/(chat/completions|completions|embeddings|responses)(/.*)?"
ORIGINAL_DST_CLUSTER = "original_destination_cluster"
EXT_PROC_CLUSTER = "extproc"
NOOP_EXT_PROC_CLUSTER = "extproc_noop"
TARGET_POD = "target-pod"
RESPONSE_COPIES = (
    ("x-request-id", "x-request-id"),
    ("routing-strategy", "routing-strategy"),
    ("target-pod", "x-target-pod-name"),
)
"""Response header <- request header: with the response phase skipped (``response_phase:
when-needed`` or ``never``) the server cannot name the pod on the response, so Envoy copies what
the server set on the request (the server's own values win when it does see the response)."""
NOT_ROUTED = local_replies.error_body(
    "The request was not routed: the routing server gave no target.",
    "server_error",
    "not_routed",
)


@dataclass
class GatewayLayout:
    """Everything the bootstrap depends on."""

    listen_port: int
    admin_port: int
    extproc_port: int
    models: Mapping[str, Sequence[str]] = field(default_factory=dict)
    """Model (or LoRA adapter) name -> its pods' ``ip:port``: the per-model clusters."""
    request_body_mode: str = "BUFFERED"
    response_header_mode: str = "SEND"
    send_body_without_waiting: bool = False
    allow_mode_override: bool = True
    message_timeout: str = "5s"
    failure_mode_allow: bool = False
    max_body_bytes: int = 4 * 1024 * 1024
    """The server's ``max_body_bytes``: Envoy answers the same JSON 413 above it."""
    route_timeout: str = "120s"
    retries: int = 0
    """Retries on another pod when the chosen one cannot be reached (needs ``models``)."""
    destination_endpoint_header: bool = False
    """The server sets ``x-gateway-destination-endpoint`` (chosen pod, then fallbacks): retries
    walk that list before the least-loaded fallback."""
    direct_port: int | None = None
    """An extra listener with no ext_proc sending everything to ``direct_target`` (benchmarks)."""
    direct_target: str | None = None
    noop_port: int | None = None
    """A second gateway listener whose ext_proc is the no-op server on ``noop_extproc_port``
    (``tools/bench/noop_extproc.py``): the Python floor, measured beside our server."""
    noop_extproc_port: int | None = None
    stub_pod_port: int | None = None
    """A listener answering every request itself with a fixed chat completion: an upstream that
    costs next to nothing, so throughput benchmarks measure the routing path, not a pod."""
    access_log: bool = False
    host: str = "127.0.0.1"
    """Address the listeners bind to."""
    admin_host: str = "127.0.0.1"
    extproc_host: str = "127.0.0.1"
    """The server's address (an IP, or a name Envoy resolves)."""
    extproc_tls: UpstreamTls | None = None
    """TLS (mTLS with a client certificate) to the ext_proc server; plaintext when unset."""
    extproc_replica_ports: Sequence[int] = ()
    """Further server replicas on ``extproc_host``: the ext_proc cluster gets an endpoint each
    and Envoy spreads the requests' streams over them."""


def _ext_proc_filter(layout: GatewayLayout, cluster: str = EXT_PROC_CLUSTER) -> dict[str, Any]:
    mode = parts.processing_mode(
        layout.request_body_mode, response_headers=layout.response_header_mode
    )
    extra = (
        {"send_body_without_waiting_for_header_response": True}
        if layout.send_body_without_waiting
        else None
    )
    return parts.ext_proc_filter(
        cluster,
        mode,
        allow_mode_override=layout.allow_mode_override,
        message_timeout=layout.message_timeout,
        failure_mode_allow=layout.failure_mode_allow,
        extra=extra,
    )


def _copies() -> list[dict[str, Any]]:
    return [
        {
            "header": {"key": key, "value": f"%REQ({source})%"},
            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            "keep_empty_value": False,
        }
        for key, source in RESPONSE_COPIES
    ]


def _model_cluster(model: str) -> str:
    return f"model-{model}"


def _model_match(model: str, target_pods: Sequence[str] | None = None) -> dict[str, Any]:
    headers: list[dict[str, Any]] = [{"name": "model", "string_match": {"exact": model}}]
    if target_pods is not None:
        alternatives = "|".join(re.escape(pod) for pod in target_pods)
        headers.append(
            {"name": TARGET_POD, "string_match": {"safe_regex": {"regex": f"({alternatives})"}}}
        )
    return {"safe_regex": {"regex": INFERENCE_PATH_REGEX}, "headers": headers}


def _routes(layout: GatewayLayout) -> list[dict[str, Any]]:
    timeout = layout.route_timeout
    retry = layout.retries > 0
    routes: list[dict[str, Any]] = [parts.too_large_route(layout.max_body_bytes)]
    if retry:
        for model, pods in layout.models.items():
            routes.append(
                {
                    "name": f"{model}-pinned",
                    "match": _model_match(model, pods),
                    "route": {
                        "cluster": _model_cluster(model),
                        "timeout": timeout,
                        "retry_policy": parts.retry_policy(layout.retries),
                    },
                    "response_headers_to_add": _copies(),
                }
            )
    routes.append(
        {
            "name": "original_route",
            "match": {"prefix": "/", "headers": [{"name": TARGET_POD, "present_match": True}]},
            "route": {"cluster": ORIGINAL_DST_CLUSTER, "timeout": timeout},
            "response_headers_to_add": _copies(),
        }
    )
    for model in layout.models:
        action: dict[str, Any] = {"cluster": _model_cluster(model), "timeout": timeout}
        if retry:
            action["retry_policy"] = parts.retry_policy(layout.retries)
        routes.append({"name": f"{model}-router", "match": _model_match(model), "route": action})
    for prefix in (*INFERENCE_PREFIXES, "/v1/models"):
        routes.append(
            {
                "name": f"reserved{prefix.replace('/', '-')}",
                "match": {"prefix": prefix},
                "direct_response": {"status": 503, "body": {"inline_string": NOT_ROUTED}},
                "response_headers_to_add": parts.json_reply_headers(),
            }
        )
    return routes


def _model_clusters(layout: GatewayLayout) -> list[dict[str, Any]]:
    clusters = []
    for model, pods in layout.models.items():
        name = _model_cluster(model)
        if layout.retries > 0:
            header = (
                parts.DESTINATION_ENDPOINT if layout.destination_endpoint_header else TARGET_POD
            )
            clusters.append(parts.override_host_cluster(name, pods, [parts.header_source(header)]))
        else:
            clusters.append(parts.endpoint_cluster(name, pods, lb_policy="LEAST_REQUEST"))
    return clusters


def original_destination_cluster() -> dict[str, Any]:
    return {
        "name": ORIGINAL_DST_CLUSTER,
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": "2s",
        "cleanup_interval": "60s",
        "circuit_breakers": parts.unlimited(),
        "original_dst_lb_config": {"use_http_header": True, "http_header_name": TARGET_POD},
    }


def _gateway_listener(
    layout: GatewayLayout, name: str, port: int, cluster: str, access_log: bool
) -> dict[str, Any]:
    manager = parts.hcm(
        name,
        _routes(layout),
        [_ext_proc_filter(layout, cluster)],
        access_log=access_log,
        max_body_bytes=layout.max_body_bytes,
    )
    return parts.listener(name, layout.host, port, manager, layout.max_body_bytes)


def bootstrap(layout: GatewayLayout) -> dict[str, Any]:
    """The bootstrap as a dict (write it as YAML or JSON)."""
    listeners = [
        _gateway_listener(
            layout, "gateway", layout.listen_port, EXT_PROC_CLUSTER, layout.access_log
        )
    ]
    clusters: list[dict[str, Any]] = [
        original_destination_cluster(),
        parts.grpc_cluster(
            EXT_PROC_CLUSTER,
            [
                f"{layout.extproc_host}:{port}"
                for port in (layout.extproc_port, *layout.extproc_replica_ports)
            ],
            layout.extproc_tls,
        ),
        *_model_clusters(layout),
    ]
    if layout.direct_port is not None and layout.direct_target is not None:
        direct_routes = [
            {
                "match": {"prefix": "/"},
                "route": {"cluster": "direct", "timeout": layout.route_timeout},
            }
        ]
        listeners.append(
            parts.listener(
                "direct", layout.host, layout.direct_port, parts.hcm("direct", direct_routes, [])
            )
        )
        clusters.append(parts.endpoint_cluster("direct", [layout.direct_target]))
    if layout.noop_port is not None and layout.noop_extproc_port is not None:
        listeners.append(
            _gateway_listener(layout, "noop", layout.noop_port, NOOP_EXT_PROC_CLUSTER, False)
        )
        clusters.append(
            parts.grpc_cluster(NOOP_EXT_PROC_CLUSTER, f"127.0.0.1:{layout.noop_extproc_port}", None)
        )
    if layout.stub_pod_port is not None:
        listeners.append(_stub_pod_listener(layout.host, layout.stub_pod_port))
    return {
        "static_resources": {"listeners": listeners, "clusters": clusters},
        "admin": parts.admin(layout.admin_host, layout.admin_port),
        "overload_manager": parts.overload_manager(),
    }


def _stub_pod_listener(host: str, port: int) -> dict[str, Any]:
    answer = (
        '{"id":"stub","object":"chat.completion","model":"stub","choices":[{"index":0,'
        '"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],'
        '"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}'
    )
    page = (
        "# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running 0\n"
        "# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting 0\n"
        "# TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc 0.1\n"
    )
    routes = [
        {
            "match": {"path": "/metrics"},
            "direct_response": {"status": 200, "body": {"inline_string": page}},
        },
        {
            "match": {"prefix": "/"},
            "direct_response": {"status": 200, "body": {"inline_string": answer}},
            "response_headers_to_add": [
                {"header": {"key": "content-type", "value": "application/json"}},
                {"header": {"key": "x-pod-name", "value": "stub"}},
            ],
        },
    ]
    return parts.listener("stub_pod", host, port, parts.hcm("stub_pod", routes, []))
