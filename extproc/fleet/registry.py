"""The fleet as discovery reports it: pods by name, and ready candidates by model.

Discovery providers write the pods; the one other writer is the pod's own report of the LoRA
adapters it holds and the path each was loaded from (``report_adapters``, from its
``/v1/models``), which once made replaces the adapters discovery declared for routing: an adapter
unloaded on a pod stops going there, while the name stays known. The routing pipeline asks for
candidates per request; candidate tuples are rebuilt only when the fleet changes, so the hot
path reads a ready-made tuple. What the server measures about a pod (its metrics, its in-flight
requests, what it caches) lives with the component that measures it, keyed by the pod's name.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PodSpec:
    """What discovery knows about a pod; ``address`` is always ``ip:port``."""

    name: str
    address: str
    model: str
    adapters: frozenset[str] = frozenset()
    metrics_url: str = ""
    ready: bool = True
    namespace: str = ""
    kv_events: str = ""
    """Where the pod publishes KV-cache events: ``tcp://ip:port``, ``auto`` (ask its
    ``/kv_event_sources``), or empty when it publishes none."""

    @property
    def effective_metrics_url(self) -> str:
        return self.metrics_url or f"http://{self.address}/metrics"

    @property
    def base_url(self) -> str:
        return f"http://{self.address}"


def check_address(address: str) -> str:
    """Validate ``ip:port`` (``[v6]:port`` for IPv6): Envoy's ORIGINAL_DST needs a literal IP."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"address {address!r} must be ip:port")
    literal = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        parsed = ipaddress.ip_address(literal)
    except ValueError:
        raise ValueError(f"address {address!r} must use an IP literal, not a host name") from None
    if parsed.version == 6 and not host.startswith("["):
        raise ValueError(f"IPv6 address {address!r} must be written [addr]:port")
    return address


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A model name clients may ask for; ``parent`` is set for a LoRA adapter."""

    id: str
    parent: str | None = None


@dataclass(slots=True, eq=False)
class Pod:
    """A registry entry. Replaced (a new object) whenever its spec changes, so a reader that
    took it before an ``await`` can tell it moved (``registry.get(name) is not pod``)."""

    spec: PodSpec
    ready_since: float | None = None
    """When it last became ready (monotonic); ``None`` while not ready."""

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def address(self) -> str:
        return self.spec.address


ANY_MODEL = "*"
"""The candidates key of every ready pod, whatever it serves (an endpoint picker's pool)."""

Listener = Callable[[], None]
RemovalListener = Callable[[str], None]


@dataclass
class PodRegistry:
    """Pods keyed by name; per-model ready candidates kept ready-made for the hot path."""

    loaded: bool = False
    """True once discovery has delivered its first complete pod set."""
    version: int = 0
    """Bumped on every change, so readers can cache what they derive from the fleet."""
    _pods: dict[str, Pod] = field(default_factory=dict)
    _candidates: dict[str, tuple[Pod, ...]] = field(default_factory=dict)
    _models: dict[str, ModelInfo] = field(default_factory=dict)
    _declared: dict[str, frozenset[str]] = field(default_factory=dict)
    """Source -> models it says exist even with no pod (a static ``models:`` list, Deployments
    scaled to zero): requests for them wait for a pod instead of failing as unknown."""
    _reported: dict[str, dict[str, str]] = field(default_factory=dict)
    """Pod -> the adapters it says it holds, each with the path it loaded it from (its
    ``/v1/models``: ``id`` and ``root``), once it has said."""
    _serving: dict[str, frozenset[str]] = field(default_factory=dict)
    """Pod -> the names of ``_reported``, ready-made."""
    _change_listeners: list[Listener] = field(default_factory=list)
    _removal_listeners: list[RemovalListener] = field(default_factory=list)

    # -- subscriptions -------------------------------------------------------------------------

    def on_change(self, listener: Listener) -> None:
        self._change_listeners.append(listener)

    def on_removed(self, listener: RemovalListener) -> None:
        self._removal_listeners.append(listener)

    # -- updates from discovery ----------------------------------------------------------------

    def replace_all(self, specs: Iterable[PodSpec]) -> None:
        """Make the fleet exactly ``specs`` (the static provider's whole-file view)."""
        wanted = {spec.name: spec for spec in specs}
        removed = [name for name in self._pods if name not in wanted]
        for name in removed:
            del self._pods[name]
            self._forget_report(name)
        for spec in wanted.values():
            self._upsert(spec)
        self.loaded = True
        self._changed()
        for name in removed:
            self._notify_removed(name)

    def upsert(self, spec: PodSpec) -> None:
        if self._upsert(spec):
            self._changed()

    def remove(self, name: str) -> None:
        if name in self._pods:
            del self._pods[name]
            self._forget_report(name)
            self._changed()
            self._notify_removed(name)

    def report_adapters(self, name: str, adapters: Mapping[str, str] | None) -> None:
        """What pod ``name`` itself serves besides its model, adapter -> the path it loaded it
        from (``None``: forget its report, and route by what discovery declared)."""
        if name not in self._pods or self._reported.get(name) == adapters:
            return
        if adapters is None:
            self._forget_report(name)
        else:
            self._reported[name] = dict(adapters)
            self._serving[name] = frozenset(adapters)
        self._changed()

    def serving(self, pod: Pod) -> frozenset[str]:
        """The adapters requests may go to ``pod`` for."""
        return self._serving.get(pod.spec.name, pod.spec.adapters)

    def adapter_path(self, pod: str, adapter: str) -> str | None:
        """The path ``pod`` says it loaded ``adapter`` from (vLLM hashes it into every block of
        the adapter's requests); ``None`` until it has said, or when it said none."""
        return self._reported.get(pod, {}).get(adapter) or None

    def _forget_report(self, name: str) -> None:
        self._reported.pop(name, None)
        self._serving.pop(name, None)

    def mark_loaded(self) -> None:
        self.loaded = True

    def declare(self, source: str, models: Iterable[str]) -> None:
        """Make ``models`` known on behalf of ``source`` (replacing what it declared before)."""
        declared = frozenset(models)
        if self._declared.get(source) != declared:
            self._declared[source] = declared
            self._changed()

    def _upsert(self, spec: PodSpec) -> bool:
        current = self._pods.get(spec.name)
        if current is not None and current.spec == spec:
            return False
        now = time.monotonic()
        if current is None or spec.address != current.spec.address:
            # A new address is a new process: it became ready now, if it is ready.
            ready_since = now if spec.ready else None
        elif spec.ready:
            ready_since = current.ready_since if current.ready_since is not None else now
        else:
            ready_since = None
        self._pods[spec.name] = Pod(spec, ready_since)
        return True

    def _changed(self) -> None:
        candidates: dict[str, list[Pod]] = {}
        models: dict[str, ModelInfo] = {}
        for pod in self._pods.values():
            spec = pod.spec
            models.setdefault(spec.model, ModelInfo(spec.model))
            serving = self.serving(pod)
            for adapter in spec.adapters | serving:
                models.setdefault(adapter, ModelInfo(adapter, parent=spec.model))
            if not spec.ready:
                continue
            candidates.setdefault(ANY_MODEL, []).append(pod)
            candidates.setdefault(spec.model, []).append(pod)
            for adapter in serving:
                candidates.setdefault(adapter, []).append(pod)
        for declared in self._declared.values():
            for model in declared:
                models.setdefault(model, ModelInfo(model))
        self._candidates = {model: tuple(pods) for model, pods in candidates.items()}
        self._models = dict(sorted(models.items()))
        self.version += 1
        for listener in self._change_listeners:
            listener()

    def _notify_removed(self, name: str) -> None:
        for listener in self._removal_listeners:
            try:
                listener(name)
            except Exception:
                log.exception("pod removal listener failed", extra={"pod": name})

    # -- reads ---------------------------------------------------------------------------------

    def candidates(self, model: str) -> tuple[Pod, ...]:
        """Ready pods serving ``model`` (a base model or a LoRA adapter); empty when none."""
        return self._candidates.get(model, ())

    def knows_model(self, model: str) -> bool:
        return model in self._models

    def model(self, model: str) -> ModelInfo | None:
        return self._models.get(model)

    def models(self) -> Sequence[ModelInfo]:
        return tuple(self._models.values())

    def pods(self) -> Sequence[Pod]:
        return tuple(self._pods.values())

    def get(self, name: str) -> Pod | None:
        return self._pods.get(name)
