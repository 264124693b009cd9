"""The one typed settings object, filled from flags, environment variables and a YAML file.

Precedence: command-line flag > environment variable > YAML file > default. Every knob is a
field below with its help text; the CLI flags, the ``EXTPROC_*`` environment variables and the
README's configuration table are all derived from these fields, so they cannot drift apart.
The YAML file may also hold the static pod list (``pods:``) and per-strategy options
(``strategy_options:``); those are read by their own modules.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from strategies import registry

ENV_PREFIX = "EXTPROC_"
YAML_SECTIONS = frozenset({"pods", "strategy_options"})
"""Top-level YAML keys that are data for other modules, not settings."""


class ConfigError(ValueError):
    """A bad setting; ``key`` names it the way the user wrote it (flag, env var or YAML key)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"invalid setting {key}: {message}")
        self.key = key


def _knob(default: Any, help: str, *, env: tuple[str, ...] = (), **extra: Any) -> Any:
    """A settings field with the metadata the CLI, env loader and docs read."""
    metadata = {"help": help, "env": env, **extra}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Settings:
    """Every setting of ``extproc serve``. Durations are seconds; sizes are bytes."""

    config: Path | None = _knob(
        None, "YAML file with settings and/or the static pod list (re-read for pods on change)"
    )
    host: str = _knob("0.0.0.0", "address the gRPC and HTTP servers bind to")
    port: int = _knob(50052, "gRPC port: ExternalProcessor, health, reflection, debug API")
    http_port: int = _knob(8080, "HTTP port: /metrics, /healthz, /readyz")
    tls_cert: Path | None = _knob(
        None,
        "PEM certificate chain for TLS on the gRPC port (with tls_key); unset serves plaintext; "
        "re-read when the file changes",
    )
    tls_key: Path | None = _knob(None, "PEM private key of tls_cert; re-read when it changes")
    tls_client_ca: Path | None = _knob(
        None,
        "PEM CA bundle: when set (with tls_cert), clients must present a certificate it signed "
        "(mTLS); re-read when it changes",
    )
    routing_strategy: str | None = _knob(
        None,
        "default strategy (or weighted list) when a request has no routing-strategy header; "
        "unset means route by model only",
        env=("ROUTING_ALGORITHM",),
    )
    strategy_header: str = _knob("routing-strategy", "request header naming the strategy")
    user_header: str = _knob("user", "request header carrying the user identity")
    users_port: int = _knob(
        8090, "HTTP port of the users API (POST /CreateUser, /ReadUser, /UpdateUser, /DeleteUser)"
    )
    users_admin_token: str | None = _knob(
        None,
        "bearer token the users API requires when set; pass it as EXTPROC_USERS_ADMIN_TOKEN "
        "(a flag shows in ps)",
    )
    redis_url: str | None = _knob(
        None,
        "Redis holding users and rate-limit windows, shared by replicas "
        "(redis://[:password@]host:6379/0, rediss:// for TLS); unset keeps them in memory",
    )
    redis_timeout: float = _knob(
        0.1, "bound on every Redis call (connect, rate-limit check, token charge, users API)"
    )
    redis_failure_policy: Literal["fail-open", "fail-closed"] = _knob(
        "fail-open",
        "when Redis fails or times out: fail-open serves the request without limits (warns, "
        "counts), fail-closed answers 503",
    )
    redis_retry_interval: float = _knob(
        1.0, "after a Redis failure, checks skip Redis this long and apply the policy at once"
    )
    unknown_user_policy: Literal["reject", "default-limits"] = _knob(
        "reject",
        "a user header naming no registered user: reject (401), or apply default_rpm/default_tpm",
    )
    default_rpm: int = _knob(0, "RPM of unregistered users under default-limits (0 = no limit)")
    default_tpm: int = _knob(0, "TPM of unregistered users under default-limits (0 = no limit)")
    destination_endpoint_header: bool = _knob(
        False,
        "also set x-gateway-destination-endpoint (Gateway API Inference Extension convention)",
    )
    max_body_bytes: int = _knob(
        4 * 1024 * 1024,
        "largest request body accepted (413 above); keep Envoy's buffer limit a little higher",
    )
    retry_after_seconds: int = _knob(2, "Retry-After sent with 503 when a model has no ready pod")
    static_reload_interval: float = _knob(
        1.0, "how often the static pod file is checked for changes"
    )
    discovery: Literal["static", "kubernetes"] = _knob(
        "static",
        "where pods come from: the static file (--config), or the Kubernetes API (Pods labelled "
        "model.aibrix.ai/name, LoRA adapters from ModelAdapter status.instances)",
    )
    kubeconfig: Path | None = _knob(
        None,
        "kubeconfig for the Kubernetes API; unset: the pod's service account in a cluster, "
        "else $KUBECONFIG or ~/.kube/config",
    )
    watch_namespaces: str = _knob(
        "",
        "comma-separated namespaces whose model Pods, Deployments and ModelAdapters are watched; "
        "empty watches all namespaces",
    )
    manage_httproutes: bool = _knob(
        False,
        "keep one HTTPRoute per model (from model.aibrix.ai/name labels) in gateway_namespace; "
        "replicas elect one writer through a Lease",
    )
    gateway_namespace: str = _knob(
        "aibrix-system", "namespace of the Gateway, the generated HTTPRoutes and their Lease"
    )
    gateway_name: str = _knob("aibrix-eg", "Gateway the generated HTTPRoutes attach to")
    route_timeout: float = _knob(
        120.0,
        "request timeout of generated HTTPRoutes; per model: annotation "
        "model.aibrix.ai/route-timeout",
    )
    lease_duration: float = _knob(
        15.0,
        "HTTPRoute writer Lease: renewed every third of this; a writer that stops renewing is "
        "replaced after this long",
    )
    scrape_interval: float = _knob(0.1, "how often each pod's /metrics is scraped")
    scrape_timeout: float = _knob(
        0.5, "give up on one scrape after this long (a hung exporter delays only itself)"
    )
    metrics_stale_after: float = _knob(
        1.0, "pod metrics older than this count as missing (strategies fall back)"
    )
    metrics_window: float = _knob(
        30.0, "window over which request rates and mean latencies are derived from scrapes"
    )
    drain_seconds: float = _knob(
        5.0, "on SIGTERM, how long open streams may finish before the process exits"
    )
    tokenizer: Literal["character", "hf", "remote"] = _knob(
        "character",
        "how prompts are tokenised for prefix hashing: UTF-8 bytes, a local tokenizer.json "
        "(hf_tokenizers), or the pod's vLLM /tokenize",
    )
    hf_tokenizers: dict[str, str] = _knob(
        {},
        "with tokenizer: hf, model name -> tokenizer.json path ('*' for any other model)",
    )
    remote_tokenizer_timeout: float = _knob(
        0.2, "with tokenizer: remote, give up on /tokenize after this (character fallback)"
    )
    prefix_block_chars: int = _knob(64, "prefix block size in bytes (character tokenizer)")
    prefix_block_tokens: int = _knob(16, "prefix block size in tokens (hf, remote, token ids)")
    prefix_index_capacity: int = _knob(
        500_000, "prefix index bound in blocks (about 200 bytes each); least recent evicted"
    )
    prefix_index_ttl: float = _knob(
        600.0, "prefix index entries older than this count as evicted from the pod"
    )
    prefix_track_all: bool = _knob(
        False,
        "hash and record every routed request, not only those a prefix strategy routes, so the "
        "index sees all traffic (costs hashing on every request)",
    )
    response_phase: Literal["always", "when-needed", "never"] = _knob(
        "always",
        "always: every routed response passes the server; when-needed: the server asks Envoy "
        "(mode override) to skip the response of requests needing no token usage, one round "
        "trip less; never: Envoy is set to skip it (the one-round-trip full-duplex setup) and "
        "token usage is estimated. Without the response phase Envoy copies the routing headers "
        "onto the response itself (README)",
    )
    event_loop: Literal["auto", "uvloop", "asyncio"] = _knob(
        "auto", "asyncio event loop; auto means uvloop when installed (faster scraping)"
    )
    log_format: Literal["text", "json"] = _knob(
        "text", "log line format: text for people, json (one object per line) for log pipelines"
    )
    log_level: Literal["debug", "info", "warning", "error"] = _knob("info", "log level")
    log_prompts: bool = _knob(
        False,
        "SENSITIVE, for debugging only: add each request's prompt text to its access-log line "
        "(without it no prompt or header value is ever logged)",
    )
    strategy_options: dict[str, dict[str, Any]] = _knob(
        {},
        "per-strategy options, e.g. {least-request: {smoothing: 1}}; on the command line "
        "--strategy-option least-request.smoothing=1 (repeatable)",
        cli=False,
    )

    def __post_init__(self) -> None:
        for name in ("port", "http_port", "users_port"):
            value = getattr(self, name)
            if not 0 < value < 65536:
                raise ConfigError(name, f"must be a TCP port (1-65535), got {value}")
        _check_host(self.host)
        positive = (
            "max_body_bytes",
            "static_reload_interval",
            "scrape_interval",
            "scrape_timeout",
            "metrics_stale_after",
            "metrics_window",
            "drain_seconds",
            "remote_tokenizer_timeout",
            "prefix_block_chars",
            "prefix_block_tokens",
            "prefix_index_capacity",
            "prefix_index_ttl",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(name, f"must be > 0, got {getattr(self, name)}")
        if self.tokenizer == "hf":
            if not self.hf_tokenizers:
                raise ConfigError("hf_tokenizers", "tokenizer: hf needs model -> tokenizer.json")
            for model, path in self.hf_tokenizers.items():
                if not Path(path).is_file():
                    raise ConfigError(f"hf_tokenizers.{model}", f"no such file: {path}")
        self._check_tls()
        if self.retry_after_seconds < 0:
            raise ConfigError("retry_after_seconds", "must be >= 0")
        for name in ("strategy_header", "user_header"):
            if not re.fullmatch(r"[a-z0-9!#$%&'*+.^_`|~-]+", getattr(self, name)):
                raise ConfigError(name, "must be a lower-case HTTP header name")
        self._check_limits()
        _check_kubernetes(self)
        if self.routing_strategy is not None:
            from strategies.selection import PlanSyntaxError, parse_weighted

            try:
                entries = parse_weighted(self.routing_strategy)
            except PlanSyntaxError as exc:
                raise ConfigError("routing_strategy", str(exc)) from None
            for name, _ in entries:
                if name not in registry.STRATEGIES:
                    raise ConfigError(
                        "routing_strategy",
                        f"unknown strategy {name!r}; valid: {', '.join(registry.names())}",
                    )
        for name, options in self.strategy_options.items():
            try:
                registry.build(name, options)
            except registry.OptionError as exc:
                raise ConfigError(f"strategy_options.{exc.key}", str(exc)) from None

    def _check_tls(self) -> None:
        """Which files go together; their contents are checked when the server loads them."""
        if (self.tls_cert is None) != (self.tls_key is None):
            missing = "tls_key" if self.tls_key is None else "tls_cert"
            raise ConfigError(missing, "tls_cert and tls_key must be set together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError("tls_client_ca", "mTLS needs tls_cert and tls_key as well")
        for name in ("tls_cert", "tls_key", "tls_client_ca"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ConfigError(name, f"no such file: {path}")

    def _check_limits(self) -> None:
        """Users and rate-limit settings. Values are not echoed: the URL may hold a password."""
        if self.redis_url is not None and not self.redis_url.startswith(
            ("redis://", "rediss://", "unix://")
        ):
            raise ConfigError("redis_url", "must start with redis://, rediss:// or unix://")
        if self.redis_timeout <= 0:
            raise ConfigError("redis_timeout", f"must be > 0, got {self.redis_timeout}")
        if self.redis_retry_interval < 0:
            raise ConfigError("redis_retry_interval", "must be >= 0")
        for name in ("default_rpm", "default_tpm"):
            if getattr(self, name) < 0:
                raise ConfigError(name, "must be >= 0 (0 means no limit)")
        token = self.users_admin_token
        if token is not None and (not token or any(ch.isspace() for ch in token)):
            raise ConfigError("users_admin_token", "must be non-empty, without whitespace")


def _check_host(host: str) -> None:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise ConfigError("host", f"must be an IP address or localhost, got {host!r}") from None


_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def watched_namespaces(settings: Settings) -> list[str]:
    """``watch_namespaces`` as a list; empty means every namespace."""
    return [n.strip() for n in settings.watch_namespaces.split(",") if n.strip()]


def _check_kubernetes(settings: Settings) -> None:
    names = [("gateway_namespace", settings.gateway_namespace)]
    names += [("gateway_name", settings.gateway_name)]
    names += [("watch_namespaces", n) for n in watched_namespaces(settings)]
    for key, value in names:
        if len(value) > 63 or not _DNS1123_LABEL.fullmatch(value):
            raise ConfigError(key, f"{value!r} is not a Kubernetes name (DNS-1123 label)")
    if not 0 < settings.route_timeout <= 86400:
        raise ConfigError(
            "route_timeout", f"must be > 0 and at most 24h, got {settings.route_timeout}"
        )
    if settings.lease_duration < 1:
        raise ConfigError("lease_duration", f"must be >= 1s, got {settings.lease_duration}")


def fields() -> list[dataclasses.Field[Any]]:
    return list(dataclasses.fields(Settings))


def env_names(f: dataclasses.Field[Any]) -> tuple[str, ...]:
    """``EXTPROC_<NAME>`` plus any legacy names the field accepts (e.g. ``ROUTING_ALGORITHM``)."""
    return (ENV_PREFIX + f.name.upper(), *f.metadata.get("env", ()))


def flag_name(f: dataclasses.Field[Any]) -> str:
    return "--" + f.name.replace("_", "-")


def load(
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    strategy_option_flags: list[str] | None = None,
) -> Settings:
    """Build and validate the settings. ``flags`` maps field names to already-typed CLI values.

    Raises ``ConfigError`` naming the offending key in the form the user wrote it.
    """
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    environ = os.environ if environ is None else environ
    hints = get_type_hints(Settings)
    values: dict[str, Any] = {}

    config_path = flags.get("config")
    if config_path is None:
        for env in env_names(_field("config")):
            if environ.get(env):
                config_path = environ[env]
                break
    if config_path is not None:
        document = read_yaml(Path(config_path))
        known = {f.name for f in fields()}
        for key, raw in document.items():
            if key in YAML_SECTIONS and key != "strategy_options":
                continue
            if key not in known or key == "config":
                raise ConfigError(
                    f"{key} (in {config_path})",
                    "unknown key; see the configuration table in the README",
                )
            values[key] = _convert(key, hints[key], raw, f"{key} (in {config_path})")
        values["config"] = Path(config_path)

    for f in fields():
        if f.name == "config":
            continue
        for env in env_names(f):
            if env in environ and environ[env] != "":
                values[f.name] = _convert(f.name, hints[f.name], environ[env], env)
                break

    for name, raw in flags.items():
        values[name] = _convert(name, hints[name], raw, flag_name(_field(name)))

    if strategy_option_flags:
        options = {k: dict(v) for k, v in values.get("strategy_options", {}).items()}
        for item in strategy_option_flags:
            key, sep, text = item.partition("=")
            strategy, dot, option = key.partition(".")
            if not sep or not dot or not strategy or not option:
                raise ConfigError(
                    "--strategy-option", f"expected STRATEGY.OPTION=VALUE, got {item!r}"
                )
            options.setdefault(strategy, {})[option] = yaml.safe_load(text)
        values["strategy_options"] = options

    return Settings(**values)


def read_yaml(path: Path) -> dict[str, Any]:
    """Read the YAML settings/pods file; an empty file is an empty mapping."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError("config", f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError("config", f"{path} is not valid YAML: {exc}") from None
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise ConfigError("config", f"{path} must hold a mapping at the top level")
    return document


def _field(name: str) -> dataclasses.Field[Any]:
    return next(f for f in fields() if f.name == name)


_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(ms|s|m)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}


def _convert(name: str, hint: Any, raw: Any, where: str) -> Any:
    """Coerce ``raw`` (a YAML value or an env/flag string) to the field's type."""
    origin = get_origin(hint)
    args = get_args(hint)
    if origin is not None and type(None) in args:
        if raw is None or (isinstance(raw, str) and raw.lower() in ("", "none", "null")):
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(name, inner, raw, where)
    converter = _CONVERTERS.get(hint)
    try:
        if origin is Literal:
            if raw not in args:
                choices = ", ".join(map(str, args))
                raise ValueError(f"must be one of {choices}, got {raw!r}")
            return raw
        if converter is not None:
            return converter(raw)
        if origin is dict:
            if isinstance(raw, str):
                raw = yaml.safe_load(raw)
            if not isinstance(raw, dict):
                raise ValueError("must be a mapping")
            return raw
    except (TypeError, ValueError) as exc:
        raise ConfigError(where, str(exc)) from None
    raise ConfigError(where, f"unsupported type {hint}")


def _to_bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"must be true or false, got {raw!r}")


def _to_int(raw: Any) -> int:
    if isinstance(raw, bool):
        raise ValueError("must be an integer")
    if isinstance(raw, int):
        return raw
    text = str(raw).strip()
    multipliers = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3}
    for suffix, factor in multipliers.items():
        if text.endswith(suffix):
            return int(text[: -len(suffix)]) * factor
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"must be an integer, got {raw!r}") from None


def _to_float(raw: Any) -> float:
    """Seconds, as a number or a string with ``ms``, ``s`` or ``m``."""
    if isinstance(raw, bool):
        raise ValueError("must be a number")
    if isinstance(raw, (int, float)):
        return float(raw)
    match = _DURATION.match(str(raw))
    if not match:
        raise ValueError(f"must be a number of seconds (or e.g. 100ms, 2s), got {raw!r}")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def _to_str(raw: Any) -> str:
    if not isinstance(raw, (str, int, float)) or isinstance(raw, bool):
        raise ValueError(f"must be a string, got {raw!r}")
    return str(raw)


_CONVERTERS: dict[Any, Callable[[Any], Any]] = {
    bool: _to_bool,
    int: _to_int,
    float: _to_float,
    str: _to_str,
    Path: lambda raw: Path(_to_str(raw)),
}


def describe() -> list[tuple[str, str, str, str, str]]:
    """``(yaml key, flag, env vars, default, help)`` rows for the README table."""
    defaults = Settings()
    rows = []
    for f in fields():
        rows.append(
            (
                f.name,
                flag_name(f) if f.metadata.get("cli", True) else "--strategy-option",
                ", ".join(env_names(f)),
                repr(getattr(defaults, f.name)),
                f.metadata["help"],
            )
        )
    return rows
