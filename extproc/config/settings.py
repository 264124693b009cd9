"""Every setting of ``extproc serve``, grouped by the component that reads it.

Each component receives only its own section (``settings.scraping`` for the scraper,
``settings.users`` for the rate limiter and users API, ...). In the YAML file a section is a
mapping under its name; on the command line and in the environment every setting has a flat
name (``--scrape-interval``, ``EXTPROC_SCRAPE_INTERVAL``). Durations are seconds (``100ms``,
``2s`` and ``1m`` are accepted); sizes are bytes (``4Mi`` is accepted).

Checks that concern one section live in that section; a failing check raises ``ConfigError``
with the field's name, which the loader turns into the name the user wrote (flag, environment
variable or YAML key).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from extproc.config.knobs import ConfigError, knob
from strategies import registry
from strategies.selection import PlanSyntaxError, parse_weighted

Mode = Literal["aibrix", "epp"]

_HEADER_NAME = re.compile(r"[a-z0-9!#$%&'*+.^_`|~-]+")
_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def _positive(section: object, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if value <= 0:
            raise ConfigError(name, f"must be > 0, got {value}")


def _port(section: object, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if not 0 < value < 65536:
            raise ConfigError(name, f"must be a TCP port (1-65535), got {value}")


def _host(name: str, host: str) -> None:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise ConfigError(name, f"must be an IP address or localhost, got {host!r}") from None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ServerSettings:
    """The gRPC and HTTP listeners and how the server talks to Envoy."""

    host: str = knob("0.0.0.0", "address the gRPC and metrics servers bind to", name="host")
    port: int = knob(
        50052, "gRPC port: ExternalProcessor, health, reflection, debug API", name="port"
    )
    http_port: int = knob(8080, "HTTP port: /metrics, /healthz, /readyz", name="http_port")
    tls_cert: Path | None = knob(
        None,
        "PEM certificate chain for TLS on the gRPC port (with tls_key); unset serves plaintext; "
        "re-read when the file changes",
        name="tls_cert",
    )
    tls_key: Path | None = knob(
        None, "PEM private key of tls_cert; re-read when it changes", name="tls_key"
    )
    tls_self_signed: bool = knob(
        False,
        "serve TLS on the gRPC port with a certificate generated at start-up (for gateways "
        "that connect with TLS and do not verify, e.g. Envoy AI Gateway to an endpoint picker)",
        name="tls_self_signed",
    )
    tls_client_ca: Path | None = knob(
        None,
        "PEM CA bundle: when set (with tls_cert), clients must present a certificate it signed "
        "(mTLS); re-read when it changes",
        name="tls_client_ca",
    )
    max_body_bytes: int = knob(
        4 * 1024 * 1024,
        "largest request body accepted (413 above); keep Envoy's buffer limit a little higher",
        name="max_body_bytes",
    )
    response_phase: Literal["always", "when-needed", "never"] = knob(
        "always",
        "always: every routed response passes the server; when-needed: the server asks Envoy "
        "(mode override) to skip the response of requests needing no token usage, one round "
        "trip less; never: Envoy is set to skip it (the one-round-trip full-duplex setup) and "
        "token usage is estimated. Without the response phase Envoy copies the routing headers "
        "onto the response itself (docs/envoy.md)",
        name="response_phase",
    )
    destination_endpoint_header: bool = knob(
        False,
        "also set x-gateway-destination-endpoint (Gateway API Inference Extension convention); "
        "always on in epp mode",
        name="destination_endpoint_header",
    )
    drain_seconds: float = knob(
        5.0,
        "on SIGTERM, how long open streams may finish before they are cut and the process exits",
        name="drain_seconds",
    )
    event_loop: Literal["auto", "uvloop", "asyncio"] = knob(
        "auto",
        "asyncio event loop; auto means uvloop when installed (faster scraping)",
        name="event_loop",
    )

    def __post_init__(self) -> None:
        _port(self, "port", "http_port")
        _host("host", self.host)
        _positive(self, "max_body_bytes", "drain_seconds")
        if (self.tls_cert is None) != (self.tls_key is None):
            missing = "tls_key" if self.tls_key is None else "tls_cert"
            raise ConfigError(missing, "tls_cert and tls_key must be set together")
        if self.tls_self_signed and self.tls_cert is not None:
            raise ConfigError("tls_self_signed", "give either tls_cert/tls_key or tls_self_signed")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError("tls_client_ca", "mTLS needs tls_cert and tls_key as well")
        for name in ("tls_cert", "tls_key", "tls_client_ca"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ConfigError(name, f"no such file: {path}")


@dataclass(frozen=True)
class RoutingSettings:
    """How a request names its strategy and user, and the strategies it may name."""

    default_strategy: str | None = knob(
        None,
        "default strategy (or weighted list) when a request has no routing-strategy header; "
        "unset means route by model only",
        name="routing_strategy",
        env=("ROUTING_ALGORITHM",),
    )
    strategy_header: str = knob(
        "routing-strategy", "request header naming the strategy", name="strategy_header"
    )
    user_header: str = knob("user", "request header carrying the user identity", name="user_header")
    retry_after_seconds: int = knob(
        2, "Retry-After sent with 503 when a model has no ready pod", name="retry_after_seconds"
    )
    fallback_endpoints: int = knob(
        0,
        "endpoints after the chosen one in x-gateway-destination-endpoint (and envoy.lb "
        "metadata), best first, for gateways that try the next when one fails (override_host "
        "load balancing: Istio, `extproc envoy-config`); keep 0 where the header feeds an "
        "ORIGINAL_DST cluster (Envoy AI Gateway), which reads one address",
        name="fallback_endpoints",
    )
    strategies: dict[str, dict[str, Any]] = knob(
        {},
        "named strategy instances and their options: {least-request: {smoothing: 2}} sets "
        "options of a built-in; {sticky: {algorithm: prefix-cache, min_match_blocks: 4}} adds "
        "an instance a routing-strategy header can name; on the command line "
        "--strategy-option NAME.OPTION=VALUE (repeatable)",
        name="strategies",
        cli=False,
    )

    def __post_init__(self) -> None:
        if self.retry_after_seconds < 0:
            raise ConfigError("retry_after_seconds", "must be >= 0")
        if not 0 <= self.fallback_endpoints <= 16:
            raise ConfigError("fallback_endpoints", "must be between 0 and 16")
        for name in ("strategy_header", "user_header"):
            if not _HEADER_NAME.fullmatch(getattr(self, name)):
                raise ConfigError(name, "must be a lower-case HTTP header name")
        try:
            known = registry.instance_names(self.strategies)
        except registry.OptionError as exc:
            raise ConfigError(f"strategies.{exc.key}", exc.detail) from None
        if self.default_strategy is not None:
            try:
                entries = parse_weighted(self.default_strategy)
            except PlanSyntaxError as exc:
                raise ConfigError("default_strategy", str(exc)) from None
            for name, _ in entries:
                if name not in known:
                    raise ConfigError(
                        "default_strategy",
                        f"unknown strategy {name!r}; valid: {', '.join(known)}",
                    )


@dataclass(frozen=True)
class DiscoverySettings:
    """Where pods come from."""

    provider: Literal["static", "kubernetes", "inferencepool"] = knob(
        "static",
        "where pods come from: the static file (--config); the Kubernetes API (Pods labelled "
        "model.aibrix.ai/name, LoRA adapters from ModelAdapter status.instances); or one "
        "InferencePool's selector and targetPorts (inference_pool)",
        name="discovery",
    )
    static_reload_interval: float = knob(
        1.0, "how often the static pod file is checked for changes", name="static_reload_interval"
    )

    def __post_init__(self) -> None:
        _positive(self, "static_reload_interval")


def check_discovery(discovery: DiscoverySettings, kubernetes: KubernetesSettings) -> None:
    """Settings of two sections that must agree."""
    if discovery.provider == "inferencepool" and not kubernetes.inference_pool:
        raise ConfigError("inference_pool", "discovery: inferencepool needs NAMESPACE/NAME")


@dataclass(frozen=True)
class ScrapingSettings:
    """Reading the pods' own metrics."""

    interval: float = knob(
        1.0,
        "how often each pod's /metrics is scraped (the page costs the pod's API server CPU "
        "every time; between scrapes the server's own in-flight counts keep load current)",
        name="scrape_interval",
    )
    timeout: float = knob(
        0.5,
        "give up on one scrape after this long (a hung exporter delays only itself)",
        name="scrape_timeout",
    )
    stale_after: float = knob(
        3.0,
        "pod metrics older than this count as missing (strategies fall back for that pod)",
        name="metrics_stale_after",
    )
    window: float = knob(
        30.0,
        "window over which request rates and mean latencies are derived from scrapes",
        name="metrics_window",
    )
    models_interval: float = knob(
        5.0,
        "how often each ready pod's /v1/models is read for the LoRA adapters it holds (an "
        "adapter is routed only to pods holding it); 0 routes adapters as discovery declares them",
        name="models_interval",
    )

    def __post_init__(self) -> None:
        _positive(self, "interval", "timeout", "stale_after", "window")
        if self.models_interval < 0:
            raise ConfigError("models_interval", "must be >= 0")


@dataclass(frozen=True)
class PrefixSettings:
    """Tokenising prompts and the approximate prefix index."""

    tokenizer: Literal["character", "hf", "remote"] = knob(
        "character",
        "how prompts are tokenised for prefix hashing: UTF-8 bytes, a local tokenizer.json "
        "(hf_tokenizers), or the vLLM /tokenize of the model's pods, each in turn",
        name="tokenizer",
    )
    hf_tokenizers: dict[str, str] = knob(
        {},
        "with tokenizer: hf, model name -> tokenizer.json path ('*' for any other model)",
        name="hf_tokenizers",
    )
    remote_timeout: float = knob(
        0.2,
        "with tokenizer: remote, give up on /tokenize after this (character fallback)",
        name="remote_tokenizer_timeout",
    )
    block_chars: int = knob(
        64, "prefix block size in bytes (character tokenizer)", name="prefix_block_chars"
    )
    block_tokens: int = knob(
        16, "prefix block size in tokens (hf, remote, token ids)", name="prefix_block_tokens"
    )
    index_capacity: int = knob(
        500_000,
        "prefix index bound in blocks (about 200 bytes each); least recent evicted",
        name="prefix_index_capacity",
    )
    index_ttl: float = knob(
        600.0,
        "prefix index entries older than this count as evicted from the pod",
        name="prefix_index_ttl",
    )
    track_all: bool = knob(
        False,
        "hash and record every routed request, not only those a prefix strategy routes, so the "
        "index sees all traffic (costs hashing on every request)",
        name="prefix_track_all",
    )

    def __post_init__(self) -> None:
        _positive(self, "remote_timeout", "block_chars", "block_tokens", "index_capacity")
        _positive(self, "index_ttl")
        if self.tokenizer == "hf":
            if not self.hf_tokenizers:
                raise ConfigError("hf_tokenizers", "tokenizer: hf needs model -> tokenizer.json")
            for model, path in self.hf_tokenizers.items():
                if not Path(path).is_file():
                    raise ConfigError("hf_tokenizers", f"{model}: no such file: {path}")


@dataclass(frozen=True)
class KvEventsSettings:
    """Exact prefix matching from the pods' own KV-cache events (pods that publish them)."""

    hash_seed: str | None = knob(
        None,
        "the pods' PYTHONHASHSEED, which seeds their block hashes (unset: vLLM's default seed "
        "for sha256 and sha256_cbor; pods hashing with xxhash need it)",
        name="kv_hash_seed",
    )
    hash_algo: str = knob(
        "sha256",
        "the pods' --prefix-caching-hash-algo when their metrics do not say "
        "(vllm:cache_config_info)",
        name="kv_hash_algo",
    )
    block_size: int = knob(
        0,
        "the pods' KV block size in tokens when their metrics do not say; 0: wait for them",
        name="kv_block_size",
    )
    index_capacity: int = knob(
        2_000_000,
        "exact index bound in blocks over all pods (about 100 bytes each); oldest dropped",
        name="kv_index_capacity",
    )
    silence_after: float = knob(
        10.0,
        "a pod that runs requests but has published nothing for this long is matched "
        "approximately again until its events resume",
        name="kv_silence_after",
    )
    reconnect_max: float = knob(
        10.0,
        "longest wait between attempts to reach a pod's event publisher",
        name="kv_reconnect_max",
    )

    def __post_init__(self) -> None:
        from extproc.kvevents.block_hash import ALGORITHMS

        if self.hash_algo not in ALGORITHMS:
            raise ConfigError("hash_algo", f"must be one of {', '.join(ALGORITHMS)}")
        if self.block_size < 0:
            raise ConfigError("block_size", "must be >= 0")
        _positive(self, "index_capacity", "silence_after", "reconnect_max")


@dataclass(frozen=True)
class UsersSettings:
    """Users, their limits, and where both are kept. Values are never echoed in errors: the
    Redis URL may hold a password."""

    host: str | None = knob(
        None,
        "address the users API binds to; unset: the server's host when users_admin_token is "
        "set, else 127.0.0.1 (an API without a token stays on loopback)",
        name="users_host",
    )
    port: int = knob(
        8090,
        "HTTP port of the users API (POST /CreateUser, /ReadUser, /UpdateUser, /DeleteUser)",
        name="users_port",
    )
    admin_token: str | None = knob(
        None,
        "bearer token the users API requires when set; pass it as EXTPROC_USERS_ADMIN_TOKEN "
        "(a flag shows in ps)",
        name="users_admin_token",
    )
    redis_url: str | None = knob(
        None,
        "Redis holding users and rate-limit windows, shared by replicas "
        "(redis://[:password@]host:6379/0, rediss:// for TLS); unset keeps them in memory",
        name="redis_url",
    )
    redis_timeout: float = knob(
        0.1,
        "how long Redis may take to answer once a call is on the wire (connect included); time "
        "queued locally, or while the event loop was too busy to read the answer, does not count",
        name="redis_timeout",
    )
    redis_max_wait: float = knob(
        1.0,
        "bound on one Redis round trip however busy the event loop: a call not answered by then "
        "is a Redis failure even when stalls kept redis_timeout from telling",
        name="redis_max_wait",
    )
    redis_failure_policy: Literal["fail-open", "fail-closed"] = knob(
        "fail-open",
        "when Redis fails or times out: fail-open serves the request without limits (warns, "
        "counts), fail-closed answers 503",
        name="redis_failure_policy",
    )
    redis_retry_interval: float = knob(
        1.0,
        "after a Redis failure, checks skip Redis this long and apply the policy at once",
        name="redis_retry_interval",
    )
    unknown_user_policy: Literal["reject", "default-limits"] = knob(
        "reject",
        "a user header naming no registered user: reject (401), or apply default_rpm/default_tpm",
        name="unknown_user_policy",
    )
    default_rpm: int = knob(
        0, "RPM of unregistered users under default-limits (0 = no limit)", name="default_rpm"
    )
    default_tpm: int = knob(
        0, "TPM of unregistered users under default-limits (0 = no limit)", name="default_tpm"
    )

    def __post_init__(self) -> None:
        _port(self, "port")
        if self.host is not None:
            _host("host", self.host)
        if self.redis_url is not None and not self.redis_url.startswith(
            ("redis://", "rediss://", "unix://")
        ):
            raise ConfigError("redis_url", "must start with redis://, rediss:// or unix://")
        _positive(self, "redis_timeout")
        if self.redis_timeout > self.redis_max_wait:
            raise ConfigError(
                "redis_timeout", f"must be at most redis_max_wait ({self.redis_max_wait:g}s)"
            )
        if self.redis_retry_interval < 0:
            raise ConfigError("redis_retry_interval", "must be >= 0")
        for name in ("default_rpm", "default_tpm"):
            if getattr(self, name) < 0:
                raise ConfigError(name, "must be >= 0 (0 means no limit)")
        token = self.admin_token
        if token is not None and (not token or any(ch.isspace() for ch in token)):
            raise ConfigError("admin_token", "must be non-empty, without whitespace")


@dataclass(frozen=True)
class KubernetesSettings:
    """The Kubernetes API: what is watched, and the HTTPRoutes kept from model labels."""

    kubeconfig: Path | None = knob(
        None,
        "kubeconfig for the Kubernetes API; unset: the pod's service account in a cluster, "
        "else $KUBECONFIG or ~/.kube/config",
        name="kubeconfig",
    )
    watch_namespaces: str = knob(
        "",
        "comma-separated namespaces whose model Pods, Deployments and ModelAdapters are watched; "
        "empty watches all namespaces",
        name="watch_namespaces",
    )
    manage_httproutes: bool = knob(
        False,
        "keep one HTTPRoute per model (from model.aibrix.ai/name labels) in gateway_namespace; "
        "replicas elect one writer through a Lease",
        name="manage_httproutes",
    )
    gateway_namespace: str = knob(
        "aibrix-system",
        "namespace of the Gateway, the generated HTTPRoutes and their Lease",
        name="gateway_namespace",
    )
    gateway_name: str = knob(
        "aibrix-eg", "Gateway the generated HTTPRoutes attach to", name="gateway_name"
    )
    route_timeout: float = knob(
        120.0,
        "request timeout of generated HTTPRoutes; per model: annotation "
        "model.aibrix.ai/route-timeout",
        name="route_timeout",
    )
    inference_pool: str = knob(
        "",
        "the InferencePool this server picks endpoints for, as NAMESPACE/NAME (discovery: "
        "inferencepool)",
        name="inference_pool",
    )
    lease_duration: float = knob(
        15.0,
        "HTTPRoute writer Lease: renewed every third of this; a writer that stops renewing is "
        "replaced after this long",
        name="lease_duration",
    )

    def __post_init__(self) -> None:
        names = [("gateway_namespace", self.gateway_namespace)]
        names += [("gateway_name", self.gateway_name)]
        names += [("watch_namespaces", n) for n in self.namespaces]
        for key, value in names:
            if len(value) > 63 or not _DNS1123_LABEL.fullmatch(value):
                raise ConfigError(key, f"{value!r} is not a Kubernetes name (DNS-1123 label)")
        if not 0 < self.route_timeout <= 86400:
            raise ConfigError(
                "route_timeout", f"must be > 0 and at most 24h, got {self.route_timeout}"
            )
        if self.lease_duration < 1:
            raise ConfigError("lease_duration", f"must be >= 1s, got {self.lease_duration}")
        if self.inference_pool:
            namespace, slash, name = self.inference_pool.partition("/")
            if not slash or not _DNS1123_LABEL.fullmatch(namespace) or not name:
                raise ConfigError("inference_pool", "must be NAMESPACE/NAME")

    @property
    def namespaces(self) -> list[str]:
        """``watch_namespaces`` as a list; empty means every namespace."""
        return [n.strip() for n in self.watch_namespaces.split(",") if n.strip()]


@dataclass(frozen=True)
class HealthSettings:
    """Outlier detection: pods that fail are taken out of rotation for a while."""

    consecutive_failures: int = knob(
        3,
        "5xx answers in a row that eject a pod (a pod that cannot be reached at all, told by "
        "Envoy's response code details or a failed /health check, is ejected at once); 0 turns "
        "ejection off",
        name="eject_after_failures",
    )
    base_ejection: float = knob(
        1.0,
        "first ejection's length; each ejection in a row doubles it",
        name="base_ejection",
    )
    max_ejection: float = knob(30.0, "longest ejection", name="max_ejection")
    probe_timeout: float = knob(
        0.5,
        "timeout of the /health check made when a pod fails, and while it is ejected for "
        "being unreachable (a passing check brings it back early)",
        name="health_probe_timeout",
    )
    probe_interval: float = knob(
        1.0, "how often an unreachable ejected pod's /health is checked", name="probe_interval"
    )

    def __post_init__(self) -> None:
        if self.consecutive_failures < 0:
            raise ConfigError("consecutive_failures", "must be >= 0")
        _positive(self, "base_ejection", "max_ejection", "probe_timeout", "probe_interval")
        if self.max_ejection < self.base_ejection:
            raise ConfigError("max_ejection", "must be >= base_ejection")


@dataclass(frozen=True)
class AutoscalingSettings:
    """What the server does for models scaled to zero, and the signals it exports."""

    hold_requests: int = knob(
        100,
        "requests held per model while a known model has no ready pod (scale from zero); "
        "beyond it, 503 at once; 0 turns holding off",
        name="hold_requests",
    )
    hold_timeout: float = knob(
        60.0,
        "longest a request is held waiting for a model's first ready pod, then 503 with "
        "Retry-After; keep Envoy's ext_proc max_message_timeout above it",
        name="hold_timeout",
    )

    def __post_init__(self) -> None:
        if self.hold_requests < 0:
            raise ConfigError("hold_requests", "must be >= 0")
        _positive(self, "hold_timeout")


@dataclass(frozen=True)
class LoggingSettings:
    format: Literal["text", "json"] = knob(
        "text",
        "log line format: text for people, json (one object per line) for log pipelines",
        name="log_format",
    )
    level: Literal["debug", "info", "warning", "error"] = knob(
        "info", "log level", name="log_level"
    )
    prompts: bool = knob(
        False,
        "SENSITIVE, for debugging only: add each request's prompt text to its access-log line "
        "(without it no prompt or header value is ever logged)",
        name="log_prompts",
    )


SECTIONS: dict[str, type] = {
    "server": ServerSettings,
    "routing": RoutingSettings,
    "discovery": DiscoverySettings,
    "scraping": ScrapingSettings,
    "prefix": PrefixSettings,
    "kv_events": KvEventsSettings,
    "users": UsersSettings,
    "kubernetes": KubernetesSettings,
    "health": HealthSettings,
    "autoscaling": AutoscalingSettings,
    "logging": LoggingSettings,
}
"""YAML section name -> its settings class, in the order of the generated table."""


@dataclass(frozen=True)
class Settings:
    """Every setting, one section per component. ``config`` and ``mode`` stand alone."""

    config: Path | None = knob(
        None,
        "YAML file with settings sections and/or the static pod list (pods: re-read on change)",
        name="config",
    )
    mode: Mode = knob(
        "aibrix",
        "aibrix: set target-pod for an ORIGINAL_DST cluster (Envoy Gateway, plain Envoy); epp: "
        "be an InferencePool's endpoint picker (x-gateway-destination-endpoint header and "
        "envoy.lb metadata)",
        name="mode",
    )
    server: ServerSettings = ServerSettings()
    routing: RoutingSettings = RoutingSettings()
    discovery: DiscoverySettings = DiscoverySettings()
    scraping: ScrapingSettings = ScrapingSettings()
    prefix: PrefixSettings = PrefixSettings()
    kv_events: KvEventsSettings = KvEventsSettings()
    users: UsersSettings = UsersSettings()
    kubernetes: KubernetesSettings = KubernetesSettings()
    health: HealthSettings = HealthSettings()
    autoscaling: AutoscalingSettings = AutoscalingSettings()
    logging: LoggingSettings = LoggingSettings()

    def __post_init__(self) -> None:
        check_discovery(self.discovery, self.kubernetes)
