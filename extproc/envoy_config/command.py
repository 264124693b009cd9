"""``extproc envoy-config``: print a complete Envoy bootstrap (YAML) for a plain Envoy in front
of ``extproc serve``.

``--shape aibrix`` (the default) is the server's default convention (``target-pod``); ``--pods``
(the server's static pod file) adds a cluster and a route per model, so requests without a
strategy header are routed too, and retries on another pod. ``--shape ai-gateway`` and
``--shape istio`` are the endpoint-picker setups (``extproc serve --mode epp``) as those gateways
generate them. ``envoy -c <file>`` runs the output as is.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from extproc.config import ConfigError, read_yaml
from extproc.envoy_config import aibrix, epp, to_yaml
from extproc.envoy_config.parts import UpstreamTls, split_address

SHAPES = ("aibrix", *epp.SHAPES)
AIBRIX_ONLY = ("response_phase", "full_duplex", "destination_endpoint_header")
DEFAULT_MESSAGE_TIMEOUT = {"aibrix": "5s", "ai-gateway": "300s", "istio": "300s"}
_SIZE = re.compile(r"^\s*([0-9]+)\s*(Ki|Mi|Gi)?\s*$")
_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(ms|s|m)?\s*$")


def size(text: str) -> int:
    """Bytes, with an optional ``Ki``, ``Mi`` or ``Gi`` suffix (as the server's settings)."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"must be a number of bytes (or e.g. 4Mi), got {text!r}")
    factor = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3}.get(match.group(2) or "", 1)
    value = int(match.group(1)) * factor
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def duration(text: str) -> str:
    """Seconds, or a number with ``ms``, ``s`` or ``m``, as Envoy's duration string."""
    match = _DURATION.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"must be seconds (or e.g. 500ms, 2m), got {text!r}")
    seconds = float(match.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0}[match.group(2) or "s"]
    return f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"


def host_port(text: str) -> str:
    try:
        split_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"must be a port number, got {text!r}")
    return int(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shape",
        choices=SHAPES,
        default="aibrix",
        help="aibrix: the server's target-pod convention (default); ai-gateway, istio: the "
        "server as endpoint picker (serve --mode epp), as Envoy AI Gateway or Istio wire it",
    )
    parser.add_argument(
        "--pods",
        type=Path,
        metavar="FILE",
        help="the server's static pod file: a cluster and a route per model (and LoRA adapter) "
        "so requests without a strategy are routed, and retries on another pod (aibrix); the "
        "pool's endpoints (istio, required)",
    )
    parser.add_argument("--listen-address", default="0.0.0.0", help="gateway listener address")
    parser.add_argument("--listen-port", type=port, default=8888, help="gateway listener port")
    parser.add_argument("--admin-address", default="127.0.0.1", help="Envoy admin address")
    parser.add_argument("--admin-port", type=port, default=9901, help="Envoy admin port")
    parser.add_argument(
        "--extproc-address",
        type=host_port,
        default="127.0.0.1:50052",
        metavar="HOST:PORT",
        help="the server's gRPC port (an IP, or a name Envoy resolves)",
    )
    tls = parser.add_argument_group("TLS to the server (extproc serve --tls-cert ...)")
    tls.add_argument("--extproc-tls-ca", metavar="FILE", help="verify the server against this CA")
    tls.add_argument(
        "--extproc-tls-server-name",
        metavar="NAME",
        help="name expected in the server certificate (default: the --extproc-address host)",
    )
    tls.add_argument(
        "--extproc-tls-cert", metavar="FILE", help="client certificate for mTLS (with the key)"
    )
    tls.add_argument("--extproc-tls-key", metavar="FILE", help="client certificate's key")
    tls.add_argument(
        "--extproc-tls-insecure",
        action="store_true",
        help="TLS without verifying the server (serve --tls-self-signed); ai-gateway always "
        "uses TLS, unverified unless --extproc-tls-ca is given",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=size,
        default=4 * 1024 * 1024,
        help="the server's max_body_bytes: bodies above it get the same JSON 413 from Envoy "
        "(default 4Mi, the server's default)",
    )
    parser.add_argument(
        "--response-phase",
        choices=("always", "when-needed", "never"),
        default="always",
        help="the server's response_phase (aibrix): never sets response headers SKIP",
    )
    parser.add_argument(
        "--full-duplex",
        action="store_true",
        help="request body FULL_DUPLEX_STREAMED with trailers (aibrix); with --response-phase "
        "never, one round trip per request",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=2,
        help="retries on another pod when the chosen one cannot be reached (aibrix with "
        "--pods, istio); 0 turns them off",
    )
    parser.add_argument(
        "--destination-endpoint-header",
        action="store_true",
        help="the server runs with --destination-endpoint-header: retries follow its list "
        "of fallback pods (aibrix)",
    )
    parser.add_argument(
        "--route-timeout", type=duration, default="120s", help="request timeout (default 120s)"
    )
    parser.add_argument(
        "--message-timeout",
        type=duration,
        help="ext_proc per-message timeout (default 5s for aibrix, 300s for ai-gateway/istio)",
    )
    parser.add_argument(
        "--failure-mode-allow",
        action="store_true",
        help="let requests through unrouted when the server fails (default: fail closed)",
    )
    parser.add_argument("--access-log", action="store_true", help="Envoy access log on stdout")


def run(args: argparse.Namespace, argv: Sequence[str] | None = None) -> int:
    """Print the bootstrap; ``argv`` (the command's arguments) goes in its first line."""
    try:
        config = build(args)
    except ValueError as exc:
        print(f"extproc envoy-config: {exc}", file=sys.stderr)
        return 2
    command = shlex.join(["extproc", "envoy-config", *(argv or [])])
    sys.stdout.write(f"# {command}\n" + to_yaml(config))
    return 0


def build(args: argparse.Namespace) -> dict[str, Any]:
    """The bootstrap the arguments describe (``ValueError`` names what is wrong)."""
    shape: str = args.shape
    if shape != "aibrix":
        defaults = {"response_phase": "always", "full_duplex": False}
        for name in AIBRIX_ONLY:
            if getattr(args, name) != defaults.get(name, False):
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag} applies to --shape aibrix only")
    if args.retries < 0:
        raise ValueError("--retries must be >= 0")
    pods = _pods(args.pods) if args.pods is not None else None
    tls = _tls(args, shape)
    host, extproc_port = split_address(args.extproc_address)
    message_timeout = args.message_timeout or DEFAULT_MESSAGE_TIMEOUT[shape]
    if shape == "aibrix":
        layout = aibrix.GatewayLayout(
            listen_port=args.listen_port,
            admin_port=args.admin_port,
            extproc_port=extproc_port,
            models=_models(pods or []),
            request_body_mode="FULL_DUPLEX_STREAMED" if args.full_duplex else "BUFFERED",
            response_header_mode="SKIP" if args.response_phase == "never" else "SEND",
            message_timeout=message_timeout,
            failure_mode_allow=args.failure_mode_allow,
            max_body_bytes=args.max_body_bytes,
            route_timeout=args.route_timeout,
            retries=args.retries,
            destination_endpoint_header=args.destination_endpoint_header,
            access_log=args.access_log,
            host=args.listen_address,
            admin_host=args.admin_address,
            extproc_host=host,
            extproc_tls=tls,
        )
        return aibrix.bootstrap(layout)
    if shape == "istio" and not pods:
        raise ValueError("--shape istio needs --pods (the pool's endpoints)")
    picker = epp.PickerLayout(
        listen_port=args.listen_port,
        admin_port=args.admin_port,
        picker_port=extproc_port,
        endpoints=[pod["address"] for pod in pods or []],
        host=args.listen_address,
        admin_host=args.admin_address,
        picker_host=host,
        picker_tls=tls,
        max_body_bytes=args.max_body_bytes,
        route_timeout=args.route_timeout,
        message_timeout=message_timeout,
        retries=args.retries,
        failure_mode_allow=args.failure_mode_allow,
        access_log=args.access_log,
    )
    return epp.bootstrap(picker, "istio" if shape == "istio" else "ai-gateway")


def _tls(args: argparse.Namespace, shape: str) -> UpstreamTls | None:
    if (args.extproc_tls_cert is None) != (args.extproc_tls_key is None):
        raise ValueError("--extproc-tls-cert and --extproc-tls-key go together")
    if args.extproc_tls_cert is not None and args.extproc_tls_ca is None:
        raise ValueError("a client certificate (mTLS) needs --extproc-tls-ca")
    if args.extproc_tls_insecure and args.extproc_tls_ca is not None:
        raise ValueError("--extproc-tls-insecure and --extproc-tls-ca exclude each other")
    if args.extproc_tls_server_name is not None and args.extproc_tls_ca is None:
        raise ValueError("--extproc-tls-server-name needs --extproc-tls-ca")
    if args.extproc_tls_ca is not None:
        for name in ("extproc_tls_ca", "extproc_tls_cert", "extproc_tls_key"):
            path = getattr(args, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"--{name.replace('_', '-')}: no such file: {path}")
        server_name = args.extproc_tls_server_name or split_address(args.extproc_address)[0]
        return UpstreamTls(
            str(Path(args.extproc_tls_ca).resolve()),
            server_name,
            str(Path(args.extproc_tls_cert).resolve()) if args.extproc_tls_cert else None,
            str(Path(args.extproc_tls_key).resolve()) if args.extproc_tls_key else None,
        )
    if args.extproc_tls_insecure or shape == "ai-gateway":
        return UpstreamTls()
    return None


def _pods(path: Path) -> list[dict[str, Any]]:
    """The ready pods of the server's static file, checked as the server checks them."""
    from extproc.discovery.static import PodFileError, parse_pods

    try:
        specs = parse_pods(read_yaml(path), str(path))
    except ConfigError as exc:
        raise ValueError(f"--pods: {exc.detail}") from None
    except PodFileError as exc:
        raise ValueError(f"--pods: {exc}") from None
    return [
        {"address": spec.address, "models": [spec.model, *sorted(spec.adapters)]}
        for spec in specs
        if spec.ready
    ]


def _models(pods: Sequence[dict[str, Any]]) -> dict[str, list[str]]:
    """Model or adapter name -> the addresses of the pods serving it."""
    models: dict[str, list[str]] = {}
    for pod in pods:
        for name in pod["models"]:
            models.setdefault(name, []).append(pod["address"])
    return models
