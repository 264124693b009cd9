"""``GET /v1/models`` answered by the server from the fleet, in OpenAI's list format."""

from __future__ import annotations

import time

import orjson

from extproc.fleet.registry import ModelInfo, PodRegistry


class ModelsList:
    def __init__(self, registry: PodRegistry) -> None:
        self._registry = registry
        self._version = -1
        self._body = b""
        self._created = 0

    def body(self) -> bytes:
        """The list, rebuilt only when the fleet changes."""
        if self._version != self._registry.version:
            self._created = int(time.time())
            data = [self._entry(info) for info in self._registry.models()]
            self._body = orjson.dumps({"object": "list", "data": data})
            self._version = self._registry.version
        return self._body

    def model(self, model_id: str) -> bytes | None:
        """One model's object, or ``None`` when the fleet does not know it."""
        for info in self._registry.models():
            if info.id == model_id:
                return orjson.dumps(self._entry(info))
        return None

    def _entry(self, info: ModelInfo) -> dict[str, object]:
        entry: dict[str, object] = {
            "id": info.id,
            "object": "model",
            "created": self._created or int(time.time()),
            "owned_by": "extproc",
        }
        if info.parent is not None:
            entry["parent"] = info.parent
        return entry
