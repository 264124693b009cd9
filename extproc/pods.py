"""The fleet as the server knows it: pods by name, and ready candidates by model.

Discovery providers push specs in; the exchange asks for candidates per request. Candidate lists
are rebuilt only when the fleet changes, so the hot path reads a ready-made tuple.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from strategies.base import PodView

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

    @property
    def effective_metrics_url(self) -> str:
        return self.metrics_url or f"http://{self.address}/metrics"


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


@dataclass(slots=True)
class Pod:
    """A registry entry: the spec discovery gave, and the view strategies read."""

    spec: PodSpec
    view: PodView
    became_ready_at: float | None = None
    first_metrics_at: float | None = None
    """When the scraper first published metrics for this pod (cold start ends)."""


Listener = Callable[[], None]
RemovalListener = Callable[[str], None]


@dataclass
class PodRegistry:
    """Pods keyed by name; per-model ready candidates kept ready-made for the hot path."""

    stale_after: float = 2.0
    loaded: bool = False
    """True once discovery has delivered its first complete pod set."""
    _pods: dict[str, Pod] = field(default_factory=dict)
    _candidates: dict[str, tuple[PodView, ...]] = field(default_factory=dict)
    _models: dict[str, ModelInfo] = field(default_factory=dict)
    _change_listeners: list[Listener] = field(default_factory=list)
    _removal_listeners: list[RemovalListener] = field(default_factory=list)
    version: int = 0

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
            self._remove(name)
        for spec in wanted.values():
            self._upsert(spec)
        self.loaded = True
        self._changed()
        for name in removed:
            self._notify_removed(name)

    def upsert(self, spec: PodSpec) -> None:
        self._upsert(spec)
        self._changed()

    def remove(self, name: str) -> None:
        if name in self._pods:
            self._remove(name)
            self._changed()
            self._notify_removed(name)

    def mark_loaded(self) -> None:
        self.loaded = True

    def _upsert(self, spec: PodSpec) -> None:
        now = time.monotonic()
        current = self._pods.get(spec.name)
        if current is None:
            view = PodView(
                name=spec.name,
                address=spec.address,
                model=spec.model,
                adapters=spec.adapters,
                ready=spec.ready,
                ready_since=now if spec.ready else 0.0,
                stale_after=self.stale_after,
            )
            self._pods[spec.name] = Pod(spec, view, now if spec.ready else None)
            return
        if current.spec == spec:
            return
        view = current.view
        if spec.address != view.address:
            # A new address is a new process: its old metrics and counters say nothing about it.
            view.metrics = None
            view.sent_since_scrape = 0
            current.first_metrics_at = None
            current.became_ready_at = now if spec.ready else None
        view.address, view.model, view.adapters = spec.address, spec.model, spec.adapters
        if spec.ready and not view.ready:
            view.ready_since = now
            current.became_ready_at = now
        view.ready = spec.ready
        current.spec = spec

    def _remove(self, name: str) -> None:
        del self._pods[name]

    def _changed(self) -> None:
        candidates: dict[str, list[PodView]] = {}
        models: dict[str, ModelInfo] = {}
        for pod in self._pods.values():
            view = pod.view
            models.setdefault(view.model, ModelInfo(view.model))
            for adapter in view.adapters:
                models.setdefault(adapter, ModelInfo(adapter, parent=view.model))
            if not view.ready:
                continue
            candidates.setdefault(view.model, []).append(view)
            for adapter in view.adapters:
                candidates.setdefault(adapter, []).append(view)
        self._candidates = {model: tuple(views) for model, views in candidates.items()}
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

    def candidates(self, model: str) -> Sequence[PodView]:
        """Ready pods serving ``model`` (a base model or a LoRA adapter); empty when none."""
        return self._candidates.get(model, ())

    def knows_model(self, model: str) -> bool:
        return model in self._models

    def models(self) -> Sequence[ModelInfo]:
        return tuple(self._models.values())

    def pods(self) -> Sequence[Pod]:
        return tuple(self._pods.values())

    def get(self, name: str) -> Pod | None:
        return self._pods.get(name)
