"""Pieces every generated Envoy bootstrap is built from: addresses, clusters, TLS, the ext_proc
filter, the HTTP connection manager, retries and the body-size guard.

The bootstraps are plain dicts (written as YAML or JSON); each function returns a fragment
that ``envoy --mode validate`` accepts on its own terms, so the shapes only arrange them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from extproc.envoy_config import local_replies

TYPE = "type.googleapis.com/envoy.extensions."
BIG = 1_000_000
EXT_PROC_FILTER = "envoy.filters.http.ext_proc"
BODY_MARGIN_BYTES = 64 * 1024
"""How far above ``max_body_bytes`` Envoy keeps buffering a body whose size it cannot know in
advance (chunked), so the server still sees, and answers, the slightly oversized ones itself."""
RETRY_ON = "connect-failure,refused-stream,reset-before-request"
"""Only failures where the pod never saw the request: a generation is never run twice."""


@dataclass(frozen=True)
class UpstreamTls:
    """TLS from Envoy to the ext_proc server (or endpoint picker).

    ``ca`` set: verify the server's certificate against it, expecting ``server_name``; with
    ``cert`` and ``key``, present a client certificate (mTLS). ``ca`` unset: encrypt without
    verifying anything (what Envoy AI Gateway does towards an endpoint picker, which serves a
    self-signed certificate)."""

    ca: str | None = None
    server_name: str = "localhost"
    cert: str | None = None
    key: str | None = None


ExtprocTls = UpstreamTls
"""The older name, kept for callers that build a layout by hand."""


def address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def split_address(value: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r} must be host:port")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host:
        raise ValueError(f"{value!r} must be host:port")
    return host, int(port)


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def unlimited() -> dict[str, Any]:
    """Envoy's default circuit breakers cap a cluster at 1024 concurrent requests."""
    limit = {"max_connections": BIG, "max_pending_requests": BIG, "max_requests": BIG}
    return {"thresholds": [{"priority": "DEFAULT", **limit}, {"priority": "HIGH", **limit}]}


def http2_options() -> dict[str, Any]:
    return {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": TYPE + "upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    }


def endpoint_cluster(
    name: str,
    addresses: Sequence[str],
    *,
    http2: bool = False,
    lb_policy: str = "ROUND_ROBIN",
    connect_timeout: str = "2s",
) -> dict[str, Any]:
    """A cluster of fixed endpoints: STATIC for IP literals, STRICT_DNS when one is a name."""
    endpoints = []
    dns = False
    for entry in addresses:
        host, port = split_address(entry)
        dns = dns or not is_ip(host)
        endpoints.append({"endpoint": {"address": address(host, port)}})
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STRICT_DNS" if dns else "STATIC",
        "connect_timeout": connect_timeout,
        "lb_policy": lb_policy,
        "circuit_breakers": unlimited(),
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": endpoints}]},
    }
    if http2:
        cluster["typed_extension_protocol_options"] = http2_options()
    return cluster


def grpc_cluster(
    name: str,
    target: str | Sequence[str],
    tls: UpstreamTls | None,
    connect_timeout: str = "2s",
) -> dict[str, Any]:
    """The cluster Envoy reaches the ext_proc server through: HTTP/2, maybe TLS. Several
    targets (server replicas) get Envoy's round robin: each request's stream picks one."""
    targets = [target] if isinstance(target, str) else list(target)
    cluster = endpoint_cluster(name, targets, http2=True, connect_timeout=connect_timeout)
    if tls is not None:
        cluster["transport_socket"] = upstream_tls(tls)
    return cluster


def upstream_tls(tls: UpstreamTls) -> dict[str, Any]:
    """A ``transport_socket`` for TLS to a gRPC server: verify it (or not), maybe present a
    client certificate."""
    context: dict[str, Any] = {"alpn_protocols": ["h2"]}
    if tls.ca is None:
        context["validation_context"] = {}
    else:
        context["validation_context"] = {
            "trusted_ca": {"filename": tls.ca},
            "match_typed_subject_alt_names": [
                {"san_type": "DNS", "matcher": {"exact": tls.server_name}}
            ],
        }
    if tls.cert is not None and tls.key is not None:
        context["tls_certificates"] = [
            {"certificate_chain": {"filename": tls.cert}, "private_key": {"filename": tls.key}}
        ]
    socket: dict[str, Any] = {
        "@type": TYPE + "transport_sockets.tls.v3.UpstreamTlsContext",
        "common_tls_context": context,
    }
    if tls.ca is not None:
        socket["sni"] = tls.server_name
    return {"name": "envoy.transport_sockets.tls", "typed_config": socket}


def processing_mode(
    request_body: str,
    response_headers: str = "SEND",
    response_body: str = "NONE",
    trailers: bool | None = None,
) -> dict[str, Any]:
    """ext_proc's processing mode. Trailers are sent whenever a body is streamed full-duplex
    (Envoy requires it: the server must see the end of a body that ends in trailers)."""
    request_trailers = request_body == "FULL_DUPLEX_STREAMED" if trailers is None else trailers
    response_trailers = response_body == "FULL_DUPLEX_STREAMED" if trailers is None else trailers
    return {
        "request_header_mode": "SEND",
        "request_body_mode": request_body,
        "response_header_mode": response_headers,
        "response_body_mode": response_body,
        "request_trailer_mode": "SEND" if request_trailers else "SKIP",
        "response_trailer_mode": "SEND" if response_trailers else "SKIP",
    }


MAX_MESSAGE_TIMEOUT = "300s"
"""Above the server's longest hold (``autoscaling.hold_timeout``, 60 s by default)."""


def ext_proc_filter(
    cluster: str,
    mode: Mapping[str, Any],
    *,
    allow_mode_override: bool,
    message_timeout: str,
    failure_mode_allow: bool = False,
    name: str = EXT_PROC_FILTER,
    lb_metadata: bool = False,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ext_proc HTTP filter. ``lb_metadata`` lets the server write the ``envoy.lb`` dynamic
    metadata (the endpoint list override_host reads) and shows it the same namespace back (the
    endpoint that served, which override_host records)."""
    config: dict[str, Any] = {
        "@type": TYPE + "filters.http.ext_proc.v3.ExternalProcessor",
        "grpc_service": {"envoy_grpc": {"cluster_name": cluster}, "timeout": "30s"},
        "failure_mode_allow": failure_mode_allow,
        "allow_mode_override": allow_mode_override,
        "message_timeout": message_timeout,
        # The server may ask for longer while a request waits for a model's first pod.
        "max_message_timeout": MAX_MESSAGE_TIMEOUT,
        # Tells the server whether a response came from the pod or from Envoy (an unreachable
        # pod is ejected at once).
        "response_attributes": ["response.code_details"],
        "processing_mode": dict(mode),
    }
    if lb_metadata:
        config["metadata_options"] = lb_metadata_options()
    config.update(extra or {})
    return {"name": name, "typed_config": config}


def lb_metadata_options() -> dict[str, Any]:
    namespaces = {"untyped": [LB_NAMESPACE]}
    return {"receiving_namespaces": namespaces, "forwarding_namespaces": namespaces}


def ext_proc_disabled() -> dict[str, Any]:
    return {"@type": TYPE + "filters.http.ext_proc.v3.ExtProcPerRoute", "disabled": True}


LB_NAMESPACE = "envoy.lb"
DESTINATION_ENDPOINT = "x-gateway-destination-endpoint"
SERVED_ENDPOINT = "x-gateway-destination-endpoint-served"


FALLBACK_POLICIES = {
    "least_request": "least_request.v3.LeastRequest",
    "round_robin": "round_robin.v3.RoundRobin",
}


def override_host_policy(
    sources: Sequence[Mapping[str, Any]], fallback: str = "least_request"
) -> dict[str, Any]:
    """``load_balancing_policy`` sending each attempt to the next endpoint the ext_proc server
    listed (header or ``envoy.lb`` metadata), falling back to ``fallback`` among the cluster's
    endpoints when the list is absent or used up. It records the endpoint that served in
    ``envoy.lb`` / ``x-gateway-destination-endpoint-served``."""
    fallback_policy = {
        "typed_extension_config": {
            "name": f"envoy.load_balancing_policies.{fallback}",
            "typed_config": {
                "@type": TYPE + "load_balancing_policies." + FALLBACK_POLICIES[fallback]
            },
        }
    }
    return {
        "policies": [
            {
                "typed_extension_config": {
                    "name": "envoy.load_balancing_policies.override_host",
                    "typed_config": {
                        "@type": TYPE + "load_balancing_policies.override_host.v3.OverrideHost",
                        "override_host_sources": list(sources),
                        "selected_host_key": {
                            "key": LB_NAMESPACE,
                            "path": [{"key": SERVED_ENDPOINT}],
                        },
                        "fallback_policy": {"policies": [fallback_policy]},
                    },
                }
            }
        ]
    }


def header_source(name: str) -> dict[str, Any]:
    return {"header": name}


def metadata_source() -> dict[str, Any]:
    return {"metadata": {"key": LB_NAMESPACE, "path": [{"key": DESTINATION_ENDPOINT}]}}


def override_host_cluster(
    name: str,
    addresses: Sequence[str],
    sources: Sequence[Mapping[str, Any]],
    fallback: str = "least_request",
) -> dict[str, Any]:
    cluster = endpoint_cluster(name, addresses, lb_policy="CLUSTER_PROVIDED")
    cluster["load_balancing_policy"] = override_host_policy(sources, fallback)
    return cluster


def retry_policy(retries: int, retry_on: str = RETRY_ON) -> dict[str, Any]:
    """Retry on another endpoint when the pod could not be reached. ``previous_hosts`` keeps
    the fallback policy off endpoints already tried; override_host walks its list on its own."""
    return {
        "retry_on": retry_on,
        "num_retries": retries,
        "retry_host_predicate": [
            {
                "name": "envoy.retry_host_predicates.previous_hosts",
                "typed_config": {
                    "@type": TYPE + "retry.host.previous_hosts.v3.PreviousHostsPredicate"
                },
            }
        ],
        "host_selection_retry_max_attempts": 5,
    }


def body_limit(max_body_bytes: int) -> int:
    """Envoy's request body buffer: the server's limit plus ``BODY_MARGIN_BYTES``."""
    return max_body_bytes + BODY_MARGIN_BYTES


def too_large_route(max_body_bytes: int, ext_proc: str = EXT_PROC_FILTER) -> dict[str, Any]:
    """First route: a declared ``content-length`` over the limit is answered at once with the
    server's JSON 413, without buffering the body and with the ext_proc filter (named
    ``ext_proc``) off: the server never sees the request."""
    return {
        "name": "too_large",
        "match": {
            "prefix": "/",
            "headers": [
                {
                    "name": "content-length",
                    "range_match": {"start": max_body_bytes + 1, "end": 2**62},
                }
            ],
        },
        "direct_response": {
            "status": 413,
            "body": {"inline_string": local_replies.too_large_body(max_body_bytes)},
        },
        "response_headers_to_add": json_reply_headers(),
        "typed_per_filter_config": {ext_proc: ext_proc_disabled()},
    }


def json_reply_headers() -> list[dict[str, Any]]:
    return [
        {
            "header": {"key": "content-type", "value": "application/json"},
            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
        },
        {
            "header": {"key": "x-request-id", "value": "%REQ(x-request-id)%"},
            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            "keep_empty_value": False,
        },
    ]


def router_filter() -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": TYPE + "filters.http.router.v3.Router"},
    }


def hcm(
    name: str,
    routes: list[dict[str, Any]],
    filters: list[dict[str, Any]],
    *,
    access_log: bool = False,
    max_body_bytes: int | None = None,
) -> dict[str, Any]:
    """An HTTP connection manager with one catch-all virtual host. With ``max_body_bytes``
    Envoy's own error replies are rewritten as JSON (``local_replies``)."""
    virtual_host = {"name": name, "domains": ["*"], "routes": routes}
    config: dict[str, Any] = {
        "@type": TYPE + "filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": name,
        "route_config": {"name": name, "virtual_hosts": [virtual_host]},
        "http_filters": [*filters, router_filter()],
    }
    if max_body_bytes is not None:
        config["local_reply_config"] = local_replies.config(max_body_bytes)
    if access_log:
        config["access_log"] = [
            {
                "name": "envoy.access_loggers.stdout",
                "typed_config": {"@type": TYPE + "access_loggers.stream.v3.StdoutAccessLog"},
            }
        ]
    return {"name": "envoy.filters.network.http_connection_manager", "typed_config": config}


def listener(
    name: str, host: str, port: int, manager: dict[str, Any], max_body_bytes: int | None = None
) -> dict[str, Any]:
    """A listener; with ``max_body_bytes`` its buffers hold a whole body up to ``body_limit``.

    The limit is the listener's, not a route's ``request_body_buffer_limit``: Envoy applies a
    route's limit only when the route first matched forwards the request, and before the server
    has routed it an inference request matches the reserved (direct response) route."""
    config: dict[str, Any] = {"name": name, "address": address(host, port)}
    if max_body_bytes is not None:
        config["per_connection_buffer_limit_bytes"] = body_limit(max_body_bytes)
    config["filter_chains"] = [{"filters": [manager]}]
    return config


def admin(host: str, port: int) -> dict[str, Any]:
    return {"address": address(host, port)}


def overload_manager() -> dict[str, Any]:
    """A bound on downstream connections (Envoy warns at start-up without one)."""
    return {
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
    }
