"""The ``model.aibrix.ai/*`` keys on Deployments, Pods and ModelAdapters, and where each belongs.

Identity (which model an object serves, on which ports) lives in labels, because the API server
selects by labels. Behaviour (how the generated HTTPRoute treats the model, how AIBrix's
autoscaler scales it) lives in annotations. Users have put behaviour keys under labels and seen
them silently ignored (a ``kpa.autoscaling.aibrix.ai/scale-down-delay`` label left the default
delay in force), so a key found in the wrong place is reported: logged once when it appears and
counted in a gauge while it stays.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from prometheus_client import Gauge

log = logging.getLogger(__name__)

NAME = "model.aibrix.ai/name"
PORT = "model.aibrix.ai/port"
METRIC_PORT = "model.aibrix.ai/metric-port"
IDENTITY_KEYS = (NAME, PORT, METRIC_PORT)
"""Label keys: they say what a pod is, so the API server can select on them."""

ROUTE_TIMEOUT = "model.aibrix.ai/route-timeout"
SERVICE_NAME = "model.aibrix.ai/service-name"
SCALE_DOWN_DELAY = "kpa.autoscaling.aibrix.ai/scale-down-delay"
AUTOSCALING_KEYS = (
    SCALE_DOWN_DELAY,
    "kpa.autoscaling.aibrix.ai/stable-window",
    "kpa.autoscaling.aibrix.ai/panic-window",
    "kpa.autoscaling.aibrix.ai/panic-threshold",
    "kpa.autoscaling.aibrix.ai/target-burst-capacity",
    "kpa.autoscaling.aibrix.ai/activation-scale",
    "kpa.autoscaling.aibrix.ai/scale-up-cooldown",
    "apa.autoscaling.aibrix.ai/window",
    "apa.autoscaling.aibrix.ai/up-fluctuation-tolerance",
    "apa.autoscaling.aibrix.ai/down-fluctuation-tolerance",
    "autoscaling.aibrix.ai/max-scale-up-rate",
    "autoscaling.aibrix.ai/max-scale-down-rate",
    "autoscaling.aibrix.ai/up-fluctuation-tolerance",
    "autoscaling.aibrix.ai/down-fluctuation-tolerance",
    "autoscaling.aibrix.ai/scale-down-cooldown-window",
    "autoscaling.aibrix.ai/scale-up-cooldown-window",
)
"""AIBrix autoscaler settings: read from annotations only. A fixed list, so the gauge's ``key``
label stays bounded whatever labels objects carry."""
BEHAVIOUR_KEYS = (ROUTE_TIMEOUT, SERVICE_NAME, *AUTOSCALING_KEYS)
"""Annotation keys: they change what the generated HTTPRoute does or how the model is scaled,
never what a pod is."""

DEFAULT_PORT = 8000
SELECTOR = NAME
"""Label selector for every object that belongs to a model: the name label exists."""

_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


@dataclass(frozen=True, order=True)
class ObjectRef:
    """A Kubernetes object by kind, namespace and name, for messages and bookkeeping."""

    kind: str
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


@dataclass(frozen=True, order=True)
class MisplacedKey:
    key: str
    found_in: Literal["labels", "annotations"]

    @property
    def belongs_in(self) -> str:
        return "annotations" if self.found_in == "labels" else "labels"


def metadata(obj: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
    """``(labels, annotations)`` of an object, empty mappings when absent."""
    meta = obj.get("metadata") or {}
    return dict(meta.get("labels") or {}), dict(meta.get("annotations") or {})


def ref_of(obj: Mapping[str, Any], default_namespace: str = "default") -> ObjectRef:
    meta = obj.get("metadata") or {}
    return ObjectRef(
        str(obj.get("kind", "")), str(meta.get("namespace") or default_namespace), meta["name"]
    )


def misplaced_keys(labels: Mapping[str, str], annotations: Mapping[str, str]) -> list[MisplacedKey]:
    """Behaviour keys under labels (ignored there), identity keys only under annotations."""
    found = [MisplacedKey(key, "labels") for key in BEHAVIOUR_KEYS if key in labels]
    found += [
        MisplacedKey(key, "annotations")
        for key in IDENTITY_KEYS
        if key in annotations and key not in labels
    ]
    return found


def parse_port(value: str | None, key: str, default: int | None) -> int | None:
    """A port label's value; ``default`` when the label is absent. Raises ``ValueError``."""
    if value is None:
        return default
    text = str(value).strip()
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"label {key}={value!r} is not a TCP port (1-65535)")
    return int(text)


def is_label_value(text: str) -> bool:
    return len(text) <= 63 and bool(_LABEL_VALUE.match(text))


class MisplacedKeyReport:
    """Objects currently carrying a model key in the wrong place, exported as a gauge.

    Several watchers may see the same object (discovery and the HTTPRoute controller share the Pod
    watch); keying by object makes their reports idempotent, so each problem is logged once.
    """

    def __init__(self, gauge: Gauge) -> None:
        self._gauge = gauge
        self._by_object: dict[ObjectRef, frozenset[MisplacedKey]] = {}

    def report(self, ref: ObjectRef, found: Iterable[MisplacedKey]) -> None:
        current = frozenset(found)
        previous = self._by_object.get(ref, frozenset())
        if current == previous:
            return
        for item in sorted(current - previous):
            log.warning(
                "%s has %s under %s, where it is ignored; move it to %s",
                ref,
                item.key,
                item.found_in,
                item.belongs_in,
                extra={"object": str(ref), "key": item.key, "found_in": item.found_in},
            )
        for item in sorted(previous - current):
            log.info(
                "%s no longer has %s under %s",
                ref,
                item.key,
                item.found_in,
                extra={"object": str(ref), "key": item.key, "found_in": item.found_in},
            )
        if current:
            self._by_object[ref] = current
        else:
            self._by_object.pop(ref, None)
        self._export()

    def forget(self, ref: ObjectRef) -> None:
        self.report(ref, ())

    def refs(self) -> set[ObjectRef]:
        return set(self._by_object)

    def _export(self) -> None:
        counts: dict[tuple[str, str, str], int] = {}
        for ref, items in self._by_object.items():
            for item in items:
                labels = (ref.kind, item.key, item.found_in)
                counts[labels] = counts.get(labels, 0) + 1
        self._gauge.clear()
        for (kind, key, found_in), count in counts.items():
            self._gauge.labels(kind, key, found_in).set(count)
