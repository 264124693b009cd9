"""The long-lived services one request's exchange needs, built once per server."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import orjson

from extproc.config import Settings
from extproc.pods import PodRegistry
from extproc.prefix.tracker import PrefixTracker
from extproc.router import Plan, Router
from extproc.telemetry import Telemetry
from extproc.users.ratelimit import RateLimiter

TARGET_POD = "target-pod"
POD_NAME = "x-target-pod-name"
"""With ``response_phase: when-needed``, the chosen pod's name on the upstream request, which
Envoy copies to the client response as ``target-pod`` when the server skips the response."""
DESTINATION_ENDPOINT = "x-gateway-destination-endpoint"
REQUEST_ID = "x-request-id"
MODEL = "model"


@dataclass
class Gateway:
    settings: Settings
    registry: PodRegistry
    router: Router
    telemetry: Telemetry
    limiter: RateLimiter
    prefix: PrefixTracker
    draining: bool = False
    default_plan: Plan | None = field(init=False)
    _models_body: tuple[int, bytes] = field(init=False, default=(-1, b""))

    def __post_init__(self) -> None:
        strategy = self.settings.routing_strategy
        self.default_plan = self.router.plan(strategy) if strategy else None

    def models_body(self) -> bytes:
        """``GET /v1/models`` in OpenAI's list format, rebuilt only when the fleet changes."""
        version, body = self._models_body
        if version != self.registry.version:
            created = int(time.time())
            data = []
            for info in self.registry.models():
                entry: dict[str, object] = {
                    "id": info.id,
                    "object": "model",
                    "created": created,
                    "owned_by": "extproc",
                }
                if info.parent is not None:
                    entry["parent"] = info.parent
                data.append(entry)
            body = orjson.dumps({"object": "list", "data": data})
            self._models_body = (self.registry.version, body)
        return body
