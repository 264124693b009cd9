"""The static provider: pods listed in the YAML file, re-read whenever the file changes.

A broken file never empties the fleet: the last good pod set stays, the error is logged and
counted, and the next good write is picked up.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

from extproc.config import ConfigError, read_yaml
from extproc.fleet.registry import PodRegistry, PodSpec, check_address
from extproc.telemetry import Telemetry

log = logging.getLogger(__name__)

POD_KEYS = frozenset({"name", "address", "model", "adapters", "metrics_url", "ready", "kv_events"})


class PodFileError(ValueError):
    """A bad pod list; the message names the entry and key, e.g. ``pods[1].address``."""


def parse_pods(document: dict[str, Any], source: str) -> list[PodSpec]:
    pods = document.get("pods")
    if pods is None and "models" in document:
        pods = []  # models to scale from zero, no pod yet
    if pods is None:
        raise PodFileError(f"{source}: no 'pods' list (static discovery needs one)")
    if not isinstance(pods, list):
        raise PodFileError(f"{source}: 'pods' must be a list")
    specs: list[PodSpec] = []
    names: set[str] = set()
    for index, entry in enumerate(pods):
        where = f"{source}: pods[{index}]"
        if not isinstance(entry, dict):
            raise PodFileError(f"{where} must be a mapping")
        unknown = set(entry) - POD_KEYS
        if unknown:
            raise PodFileError(
                f"{where}: unknown key(s) {', '.join(sorted(unknown))}; "
                f"valid keys: {', '.join(sorted(POD_KEYS))}"
            )
        for key in ("name", "address", "model"):
            value = entry.get(key)
            if not isinstance(value, str) or not value:
                raise PodFileError(f"{where}.{key} is required and must be a non-empty string")
        name = entry["name"]
        if name in names:
            raise PodFileError(f"{where}.name {name!r} is listed twice")
        names.add(name)
        try:
            address = check_address(entry["address"])
        except ValueError as exc:
            raise PodFileError(f"{where}.address: {exc}") from None
        adapters = entry.get("adapters", [])
        if not isinstance(adapters, list) or not all(isinstance(a, str) and a for a in adapters):
            raise PodFileError(f"{where}.adapters must be a list of names")
        metrics_url = entry.get("metrics_url", "")
        if not isinstance(metrics_url, str) or (
            metrics_url and not metrics_url.startswith(("http://", "https://"))
        ):
            raise PodFileError(f"{where}.metrics_url must be an http(s) URL")
        kv_events = entry.get("kv_events", "")
        if not isinstance(kv_events, str) or (
            kv_events and kv_events != "auto" and not kv_events.startswith("tcp://")
        ):
            raise PodFileError(f"{where}.kv_events must be tcp://host:port or auto")
        ready = entry.get("ready", True)
        if not isinstance(ready, bool):
            raise PodFileError(f"{where}.ready must be true or false")
        specs.append(
            PodSpec(
                name=name,
                address=address,
                model=entry["model"],
                adapters=frozenset(adapters),
                metrics_url=metrics_url,
                ready=ready,
                kv_events=kv_events,
            )
        )
    return specs


def parse_models(document: dict[str, Any], source: str) -> list[str]:
    """The top-level ``models:`` list: models known with or without pods (scale from zero)."""
    models = document.get("models", [])
    if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
        raise PodFileError(f"{source}: 'models' must be a list of model names")
    return models


def load_pods(path: Path) -> tuple[list[PodSpec], list[str]]:
    """The file's pods and its declared models."""
    try:
        document = read_yaml(path)
    except ConfigError as exc:
        raise PodFileError(str(exc).removeprefix("invalid setting config: ")) from None
    return parse_pods(document, str(path)), parse_models(document, str(path))


class StaticDiscovery:
    def __init__(
        self, path: Path, registry: PodRegistry, telemetry: Telemetry, interval: float
    ) -> None:
        self._path = path
        self._registry = registry
        self._telemetry = telemetry
        self._interval = interval
        self._signature: tuple[int, int, int] | None = None

    def load_initial(self) -> None:
        """Load the file once at start-up; a bad file here is a start-up error."""
        self._signature = self._stat()
        self._apply(*load_pods(self._path))
        log.info(
            "loaded %d pods from %s",
            len(self._registry.pods()),
            self._path,
            extra={"provider": "static"},
        )

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            self.check()

    def check(self) -> bool:
        """Reload if the file changed; True when a new pod set was applied."""
        signature = self._stat()
        if signature == self._signature:
            return False
        self._signature = signature
        try:
            specs, models = load_pods(self._path)
        except PodFileError as exc:
            self._telemetry.discovery_errors.labels("static").inc()
            log.error("keeping the last good pod set: %s", exc, extra={"provider": "static"})
            return False
        self._apply(specs, models)
        log.info("reloaded %d pods from %s", len(specs), self._path, extra={"provider": "static"})
        return True

    def _apply(self, specs: list[PodSpec], models: list[str]) -> None:
        self._registry.declare("static", models)
        self._registry.replace_all(specs)

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self._path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)
