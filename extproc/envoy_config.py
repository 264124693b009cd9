"""A static Envoy bootstrap shaped like what Envoy Gateway builds from ``manifests/``.

One listener; the ext_proc filter (processing mode of DESIGN section 3, ``allow_mode_override``)
before the router; an ``original_route`` that sends requests carrying ``target-pod`` to an
ORIGINAL_DST cluster reading that header (what the EnvoyPatchPolicy adds); one route per model
matched on the ``model`` header (what each generated ``<model>-router`` HTTPRoute becomes) whose
cluster holds the model's pods (the model's Service); and the inference paths answered locally
when nothing routed them (the reserved route). With ``extproc_tls`` Envoy reaches the server over
TLS, presenting a client certificate for mTLS.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

INFERENCE_PREFIXES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")
ORIGINAL_DST_CLUSTER = "original_destination_cluster"
EXT_PROC_CLUSTER = "extproc"
NOOP_EXT_PROC_CLUSTER = "extproc_noop"
RESPONSE_COPIES = (
    ("x-request-id", "x-request-id"),
    ("routing-strategy", "routing-strategy"),
    ("target-pod", "x-target-pod-name"),
)
BIG = 1_000_000
TYPE = "type.googleapis.com/envoy.extensions."


@dataclass(frozen=True)
class ExtprocTls:
    """How Envoy reaches a server serving TLS: the CA to trust, the name to expect, and the
    client certificate to present when the server requires one (mTLS)."""

    ca: str
    server_name: str = "localhost"
    cert: str | None = None
    key: str | None = None


@dataclass
class GatewayLayout:
    """Everything the bootstrap depends on."""

    listen_port: int
    admin_port: int
    extproc_port: int
    models: Mapping[str, Sequence[str]] = field(default_factory=dict)
    """Model name -> its pods' ``ip:port``: the per-model routes' backends."""
    request_body_mode: str = "BUFFERED"
    response_header_mode: str = "SEND"
    send_body_without_waiting: bool = False
    allow_mode_override: bool = True
    message_timeout: str = "5s"
    failure_mode_allow: bool = False
    max_body_bytes: int = 4 * 1024 * 1024
    route_timeout: str = "120s"
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
    extproc_tls: ExtprocTls | None = None
    """TLS (mTLS with a client certificate) to the ext_proc server; plaintext when unset."""


def _address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _endpoint_cluster(name: str, addresses: Sequence[str], http2: bool = False) -> dict[str, Any]:
    endpoints = []
    for address in addresses:
        host, _, port = address.rpartition(":")
        endpoints.append({"endpoint": {"address": _address(host.strip("[]"), int(port))}})
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "2s",
        "lb_policy": "ROUND_ROBIN",
        "circuit_breakers": _unlimited(),
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": endpoints}]},
    }
    if http2:
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": TYPE + "upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
    return cluster


def _upstream_tls(tls: ExtprocTls) -> dict[str, Any]:
    """The ext_proc cluster's ``transport_socket``: verify the server, maybe present a cert."""
    context: dict[str, Any] = {
        "alpn_protocols": ["h2"],
        "validation_context": {
            "trusted_ca": {"filename": tls.ca},
            "match_typed_subject_alt_names": [
                {"san_type": "DNS", "matcher": {"exact": tls.server_name}}
            ],
        },
    }
    if tls.cert is not None and tls.key is not None:
        context["tls_certificates"] = [
            {"certificate_chain": {"filename": tls.cert}, "private_key": {"filename": tls.key}}
        ]
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": TYPE + "transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": tls.server_name,
            "common_tls_context": context,
        },
    }


def _unlimited() -> dict[str, Any]:
    """Envoy's default circuit breakers cap a cluster at 1024 concurrent requests."""
    limit = {"max_connections": BIG, "max_pending_requests": BIG, "max_requests": BIG}
    return {"thresholds": [{"priority": "DEFAULT", **limit}, {"priority": "HIGH", **limit}]}


def _ext_proc_filter(layout: GatewayLayout, cluster: str = EXT_PROC_CLUSTER) -> dict[str, Any]:
    duplex = layout.request_body_mode == "FULL_DUPLEX_STREAMED"
    config: dict[str, Any] = {
        "@type": TYPE + "filters.http.ext_proc.v3.ExternalProcessor",
        "grpc_service": {"envoy_grpc": {"cluster_name": cluster}, "timeout": "30s"},
        "failure_mode_allow": layout.failure_mode_allow,
        "allow_mode_override": layout.allow_mode_override,
        "message_timeout": layout.message_timeout,
        "processing_mode": {
            "request_header_mode": "SEND",
            "request_body_mode": layout.request_body_mode,
            "response_header_mode": layout.response_header_mode,
            "response_body_mode": "NONE",
            "request_trailer_mode": "SEND" if duplex else "SKIP",
            "response_trailer_mode": "SKIP",
        },
    }
    if layout.send_body_without_waiting:
        config["send_body_without_waiting_for_header_response"] = True
    return {"name": "envoy.filters.http.ext_proc", "typed_config": config}


def _routes(layout: GatewayLayout) -> list[dict[str, Any]]:
    timeout = layout.route_timeout
    original: dict[str, Any] = {
        "name": "original_route",
        "match": {"prefix": "/", "headers": [{"name": "target-pod", "present_match": True}]},
        "route": {"cluster": ORIGINAL_DST_CLUSTER, "timeout": timeout},
    }
    # With ``response_phase: when-needed`` the server skips most response phases, so Envoy puts
    # the routing headers on the client response itself (the server's own values win otherwise).
    original["response_headers_to_add"] = [
        {
            "header": {"key": key, "value": f"%REQ({source})%"},
            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            "keep_empty_value": False,
        }
        for key, source in RESPONSE_COPIES
    ]
    routes: list[dict[str, Any]] = [original]
    for model in layout.models:
        for prefix in INFERENCE_PREFIXES:
            routes.append(
                {
                    "name": f"{model}-router{prefix.replace('/', '-')}",
                    "match": {
                        "prefix": prefix,
                        "headers": [{"name": "model", "string_match": {"exact": model}}],
                    },
                    "route": {"cluster": f"model-{model}", "timeout": timeout},
                }
            )
    not_routed = (
        '{"error":{"message":"The request was not routed: the routing server gave no target.",'
        '"type":"server_error","code":"not_routed","param":null}}'
    )
    for prefix in (*INFERENCE_PREFIXES, "/v1/models"):
        routes.append(
            {
                "name": f"reserved{prefix.replace('/', '-')}",
                "match": {"prefix": prefix},
                "direct_response": {"status": 503, "body": {"inline_string": not_routed}},
                "response_headers_to_add": [
                    {
                        "header": {"key": "content-type", "value": "application/json"},
                        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                    }
                ],
            }
        )
    return routes


def _hcm(
    name: str, routes: list[dict[str, Any]], filters: list[dict[str, Any]], access_log: bool
) -> dict[str, Any]:
    config: dict[str, Any] = {
        "@type": TYPE + "filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": name,
        "route_config": {
            "name": name,
            "virtual_hosts": [{"name": name, "domains": ["*"], "routes": routes}],
        },
        "http_filters": [
            *filters,
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": TYPE + "filters.http.router.v3.Router"},
            },
        ],
    }
    if access_log:
        config["access_log"] = [
            {
                "name": "envoy.access_loggers.stdout",
                "typed_config": {"@type": TYPE + "access_loggers.stream.v3.StdoutAccessLog"},
            }
        ]
    return {"name": "envoy.filters.network.http_connection_manager", "typed_config": config}


def bootstrap(layout: GatewayLayout) -> dict[str, Any]:
    """The bootstrap as a dict (write it as YAML or JSON)."""
    buffer_limit = layout.max_body_bytes + 64 * 1024
    listeners = [
        {
            "name": "gateway",
            "address": _address(layout.host, layout.listen_port),
            "per_connection_buffer_limit_bytes": buffer_limit,
            "filter_chains": [
                {
                    "filters": [
                        _hcm(
                            "gateway",
                            _routes(layout),
                            [_ext_proc_filter(layout)],
                            layout.access_log,
                        )
                    ]
                }
            ],
        }
    ]
    clusters: list[dict[str, Any]] = [
        {
            "name": ORIGINAL_DST_CLUSTER,
            "type": "ORIGINAL_DST",
            "lb_policy": "CLUSTER_PROVIDED",
            "connect_timeout": "2s",
            "cleanup_interval": "60s",
            "circuit_breakers": _unlimited(),
            "original_dst_lb_config": {"use_http_header": True, "http_header_name": "target-pod"},
        },
        _endpoint_cluster(EXT_PROC_CLUSTER, [f"127.0.0.1:{layout.extproc_port}"], http2=True),
    ]
    if layout.extproc_tls is not None:
        clusters[-1]["transport_socket"] = _upstream_tls(layout.extproc_tls)
    for model, addresses in layout.models.items():
        clusters.append(_endpoint_cluster(f"model-{model}", addresses))
    if layout.direct_port is not None and layout.direct_target is not None:
        direct_routes = [
            {
                "match": {"prefix": "/"},
                "route": {"cluster": "direct", "timeout": layout.route_timeout},
            }
        ]
        listeners.append(
            {
                "name": "direct",
                "address": _address(layout.host, layout.direct_port),
                "per_connection_buffer_limit_bytes": buffer_limit,
                "filter_chains": [{"filters": [_hcm("direct", direct_routes, [], False)]}],
            }
        )
        clusters.append(_endpoint_cluster("direct", [layout.direct_target]))
    if layout.noop_port is not None and layout.noop_extproc_port is not None:
        filters = [_ext_proc_filter(layout, NOOP_EXT_PROC_CLUSTER)]
        listeners.append(
            {
                "name": "noop",
                "address": _address(layout.host, layout.noop_port),
                "per_connection_buffer_limit_bytes": buffer_limit,
                "filter_chains": [{"filters": [_hcm("noop", _routes(layout), filters, False)]}],
            }
        )
        clusters.append(
            _endpoint_cluster(
                NOOP_EXT_PROC_CLUSTER, [f"127.0.0.1:{layout.noop_extproc_port}"], http2=True
            )
        )
    if layout.stub_pod_port is not None:
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
        stub_routes = [
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
        listeners.append(
            {
                "name": "stub_pod",
                "address": _address(layout.host, layout.stub_pod_port),
                "filter_chains": [{"filters": [_hcm("stub_pod", stub_routes, [], False)]}],
            }
        )
    return {
        "static_resources": {"listeners": listeners, "clusters": clusters},
        "admin": {"address": _address("127.0.0.1", layout.admin_port)},
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": {
                        "@type": TYPE + "resource_monitors.downstream_connections.v3."
                        "DownstreamConnectionsConfig",
                        "max_active_downstream_connections": 50000,
                    },
                }
            ]
        },
    }
