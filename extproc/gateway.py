"""The long-lived services one request's exchange needs, built once per server."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import orjson

from extproc import errors
from extproc.config import Settings
from extproc.openai_request import InferenceRequest
from extproc.pods import PodRegistry
from extproc.prefix.tracker import PrefixTracker
from extproc.router import Plan, Router
from extproc.telemetry import Telemetry
from extproc.users.ratelimit import RateLimiter
from strategies.base import PodView, RequestView

TARGET_POD = "target-pod"
POD_NAME = "x-target-pod-name"
"""With ``response_phase: when-needed``, the chosen pod's name on the upstream request, which
Envoy copies to the client response as ``target-pod`` when the server skips the response."""
DESTINATION_ENDPOINT = "x-gateway-destination-endpoint"
REQUEST_ID = "x-request-id"
MODEL = "model"


@dataclass(slots=True)
class Prepared:
    """What a request is routed on: its model known, its candidates and view ready."""

    pods: Sequence[PodView]
    view: RequestView
    hashes: list[int] | None
    """The prompt's block hashes, when the plan routes on prefixes (or they were asked for)."""
    matches: dict[str, int]
    """Pod name -> leading blocks it is believed to hold (empty when not hashed)."""


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

    async def prepare(
        self,
        request: InferenceRequest,
        plan: Plan | None,
        request_id: str,
        user: str | None,
        *,
        explain: bool = False,
    ) -> Prepared:
        """Check the model, find the candidates, build the request view and look the prefix up:
        the part of routing the exchange and ``Explain`` share, so they cannot drift apart.
        ``explain`` hashes the prompt even when the plan does not need it, and counts nothing."""
        model = request.model
        if not self.registry.knows_model(model):
            raise errors.model_not_found(model)
        pods = self.registry.candidates(model)
        if plan is not None and not pods:
            raise errors.no_ready_pod(model, self.settings.retry_after_seconds)
        view = RequestView(
            request_id=request_id,
            model=model,
            user=user,
            now=time.monotonic(),
            prompt_length=request.prompt_length,
            max_tokens=request.max_tokens,
            stream=request.stream,
        )
        uses_prefix = plan is not None and (plan.needs_prefix or self.settings.prefix_track_all)
        hashes = None
        matches: dict[str, int] = {}
        if uses_prefix or explain:
            hashes = await self.prefix.hashes(model, request, count_fallback=not explain)
            matches = self.prefix.lookup(hashes, pods)
            if uses_prefix:
                view.prefix_blocks = len(hashes)
                view.prefix_matches = matches
        return Prepared(pods, view, hashes, matches)

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
