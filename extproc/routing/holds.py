"""Requests waiting for a model's first ready pod: scale from zero.

A request for a model the server knows (it has a route or a Deployment, or the static file
lists it) but that has no ready pod is held instead of failing: bounded per model in number
(``hold_requests``) and in time (``hold_timeout``), and released to the first pod that becomes
ready. A client that goes away while held is dropped at once (its task is cancelled, and the
hold with it). Listeners hear every change of a model's held count, so an autoscaler sees a
model become wanted the moment a request arrives for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from extproc import errors
from extproc.config import AutoscalingSettings
from extproc.fleet.registry import PodRegistry

Listener = Callable[[str], None]


class Holds:
    def __init__(
        self, settings: AutoscalingSettings, registry: PodRegistry, retry_after: int
    ) -> None:
        self._limit = settings.hold_requests
        self.timeout = settings.hold_timeout
        self._registry = registry
        self._retry_after = retry_after
        self._waiting: dict[str, list[asyncio.Future[None]]] = {}
        self._listeners: list[Listener] = []
        registry.on_change(self._fleet_changed)

    def on_change(self, listener: Listener) -> None:
        """Call ``listener(model)`` whenever the number of requests held for it changes."""
        self._listeners.append(listener)

    def held(self, model: str) -> int:
        return len(self._waiting.get(model, ()))

    def held_by_model(self) -> dict[str, int]:
        return {model: len(futures) for model, futures in self._waiting.items() if futures}

    def may_hold(self, model: str) -> bool:
        """Whether a request for ``model`` (known, no ready pod) would be held now."""
        return self._limit > 0 and self.held(model) < self._limit

    async def wait(self, model: str) -> None:
        """Until ``model`` has a ready pod; ``GatewayError`` 503 past either bound."""
        if not self.may_hold(model):
            raise errors.no_ready_pod(model, self._retry_after)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiting = self._waiting.setdefault(model, [])
        waiting.append(future)
        self._notify(model)
        try:
            await asyncio.wait_for(future, self.timeout)
        except TimeoutError:
            raise errors.no_ready_pod(model, self._retry_after) from None
        finally:
            waiting.remove(future)
            if not waiting:
                del self._waiting[model]
            self._notify(model)

    def _fleet_changed(self) -> None:
        for model, futures in self._waiting.items():
            if futures and self._registry.candidates(model):
                for future in futures:
                    if not future.done():
                        future.set_result(None)

    def _notify(self, model: str) -> None:
        for listener in self._listeners:
            listener(model)
