"""Bootstraps for the server as an InferencePool's endpoint picker (``mode: epp``), in the shapes
two gateways generate for the Gateway API Inference Extension.

Both stream request and response bodies to the picker (FULL_DUPLEX_STREAMED, trailers sent, no
mode override) and read the destination it chooses; they differ in how:

- **Envoy AI Gateway** (its extension server's InferencePool support): an ORIGINAL_DST cluster
  reading the ``x-gateway-destination-endpoint`` header, and the picker reached over TLS that
  verifies nothing (the picker serves a self-signed certificate: ``--tls-self-signed``). The
  header must hold one ``ip:port``: ORIGINAL_DST cannot parse a list, so the server runs with
  ``--fallback-endpoints 0``, and there is no retry on another pod.
- **Istio** (pilot's inference-pool cluster and route): a cluster of the pool's endpoints with
  override_host load balancing reading the ``envoy.lb`` dynamic metadata key
  ``x-gateway-destination-endpoint`` (so the server's fallback list is honoured: a retry goes to
  the next endpoint), Istio's default route retry policy, the served endpoint written back to
  ``envoy.lb`` and forwarded to the picker, and the picker reached in plaintext. The ext_proc
  filter is a disabled placeholder on the listener, switched on and pointed at the picker by a
  per-route override, as Istio does it.

Either way Envoy's own errors are JSON (``local_replies``) and a declared body over
``max_body_bytes`` gets the JSON 413 at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from extproc.envoy_config import parts
from extproc.envoy_config.parts import TYPE, UpstreamTls

Shape = Literal["ai-gateway", "istio"]
SHAPES: tuple[Shape, ...] = ("ai-gateway", "istio")
POOL_CLUSTER = "inference_pool"
AI_GATEWAY_FILTER = "envoy.filters.http.ext_proc/endpointpicker/pool_default_ext_proc"
AI_GATEWAY_PICKER_CLUSTER = "envoy.clusters.endpointpicker_pool_default_ext_proc"
ISTIO_PICKER_CLUSTER = "outbound|9002||endpoint-picker.default.svc.cluster.local"
ISTIO_PLACEHOLDER_CLUSTER = "dummy"
"""Istio's listener-level filter names a cluster that does not exist: with both header phases
skipped it never opens a stream; routes to a pool override the service and the mode."""
ISTIO_RETRY_ON = "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
"""Istio's default retry conditions for HTTP routes (no status code is listed as retriable)."""


@dataclass
class PickerLayout:
    """Everything an endpoint-picker bootstrap depends on."""

    listen_port: int
    admin_port: int
    picker_port: int
    endpoints: Sequence[str] = ()
    """The pool's pods (``ip:port``): the Istio shape's cluster (Istio learns them by EDS)."""
    host: str = "127.0.0.1"
    admin_host: str = "127.0.0.1"
    picker_host: str = "127.0.0.1"
    picker_tls: UpstreamTls | None = None
    """TLS to the picker; ``UpstreamTls()`` encrypts without verifying (Envoy AI Gateway)."""
    max_body_bytes: int = 4 * 1024 * 1024
    route_timeout: str = "120s"
    message_timeout: str = "300s"
    """Envoy AI Gateway's; a full-duplex exchange lasts as long as the response streams."""
    retries: int = 2
    """Istio shape: retries on the next endpoint (Istio's default is 2)."""
    failure_mode_allow: bool = False
    access_log: bool = False


def _duplex_mode() -> dict[str, Any]:
    return parts.processing_mode(
        "FULL_DUPLEX_STREAMED", response_body="FULL_DUPLEX_STREAMED", trailers=True
    )


def _picker_cluster(layout: PickerLayout, name: str) -> dict[str, Any]:
    cluster = parts.grpc_cluster(
        name, f"{layout.picker_host}:{layout.picker_port}", layout.picker_tls, "10s"
    )
    cluster["lb_policy"] = "LEAST_REQUEST"
    return cluster


def _listener(
    layout: PickerLayout, routes: list[dict[str, Any]], ext_proc: dict[str, Any]
) -> dict[str, Any]:
    manager = parts.hcm(
        "gateway",
        routes,
        [ext_proc],
        access_log=layout.access_log,
        max_body_bytes=layout.max_body_bytes,
    )
    return parts.listener(
        "gateway", layout.host, layout.listen_port, manager, layout.max_body_bytes
    )


def _bootstrap(
    layout: PickerLayout, listener: dict[str, Any], clusters: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "static_resources": {"listeners": [listener], "clusters": clusters},
        "admin": parts.admin(layout.admin_host, layout.admin_port),
        "overload_manager": parts.overload_manager(),
    }


def ai_gateway_bootstrap(layout: PickerLayout) -> dict[str, Any]:
    """What Envoy AI Gateway generates for a route to an InferencePool."""
    ext_proc = parts.ext_proc_filter(
        AI_GATEWAY_PICKER_CLUSTER,
        _duplex_mode(),
        allow_mode_override=False,
        message_timeout=layout.message_timeout,
        failure_mode_allow=layout.failure_mode_allow,
        name=AI_GATEWAY_FILTER,
    )
    routes = [
        parts.too_large_route(layout.max_body_bytes, AI_GATEWAY_FILTER),
        {
            "name": "inference_pool",
            "match": {"prefix": "/"},
            "route": {"cluster": POOL_CLUSTER, "timeout": layout.route_timeout},
        },
    ]
    pool = {
        "name": POOL_CLUSTER,
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": "10s",
        "circuit_breakers": parts.unlimited(),
        "original_dst_lb_config": {
            "use_http_header": True,
            "http_header_name": parts.DESTINATION_ENDPOINT,
        },
    }
    clusters = [pool, _picker_cluster(layout, AI_GATEWAY_PICKER_CLUSTER)]
    return _bootstrap(layout, _listener(layout, routes, ext_proc), clusters)


def istio_bootstrap(layout: PickerLayout) -> dict[str, Any]:
    """What Istio generates for a gateway route to an InferencePool."""
    if not layout.endpoints:
        raise ValueError("the Istio shape needs the pool's endpoints")
    placeholder = parts.ext_proc_filter(
        ISTIO_PLACEHOLDER_CLUSTER,
        {"request_header_mode": "SKIP", "response_header_mode": "SKIP"},
        allow_mode_override=False,
        message_timeout="1000s",
        failure_mode_allow=True,
        lb_metadata=True,
    )
    placeholder["typed_config"]["grpc_service"]["timeout"] = "10s"
    override = {
        "@type": TYPE + "filters.http.ext_proc.v3.ExtProcPerRoute",
        "overrides": {
            "failure_mode_allow": layout.failure_mode_allow,
            "grpc_service": {"envoy_grpc": {"cluster_name": ISTIO_PICKER_CLUSTER}},
            "processing_mode": _duplex_mode(),
        },
    }
    routes = [
        parts.too_large_route(layout.max_body_bytes),
        {
            "name": "inference_pool",
            "match": {"prefix": "/"},
            "route": {
                "cluster": POOL_CLUSTER,
                "timeout": layout.route_timeout,
                "retry_policy": parts.retry_policy(layout.retries, ISTIO_RETRY_ON),
            },
            "typed_per_filter_config": {parts.EXT_PROC_FILTER: override},
        },
    ]
    pool = parts.override_host_cluster(
        POOL_CLUSTER, layout.endpoints, [parts.metadata_source()], fallback="round_robin"
    )
    clusters = [pool, _picker_cluster(layout, ISTIO_PICKER_CLUSTER)]
    return _bootstrap(layout, _listener(layout, routes, placeholder), clusters)


def bootstrap(layout: PickerLayout, shape: Shape) -> dict[str, Any]:
    return ai_gateway_bootstrap(layout) if shape == "ai-gateway" else istio_bootstrap(layout)
