"""The interface of a data producer: what fills a data key strategies consume.

The pipeline runs a producer only when the plan in use consumes its key (or the producer asks
to see every request). Its work comes in two parts, because the candidates are read again after
every ``await``: ``prepare`` may wait (a tokenizer on the network) and sees only the request;
``fill`` runs after the last ``await`` on the final candidates and must not wait. ``claimed``
tells it where the request went (a producer may learn from that, e.g. a prefix index).
"""

from __future__ import annotations

from typing import Protocol

from extproc.routing.openai_request import InferenceRequest
from extproc.routing.plans import Plan
from strategies.context import RoutingContext


class Producer(Protocol):
    key: str

    def wanted(self, plan: Plan) -> bool:
        """Whether to run for a request routed by ``plan``."""
        ...

    async def prepare(self, request: InferenceRequest, *, dry_run: bool) -> object:
        """The part that may wait; its result is handed back to ``fill`` and ``claimed``."""
        ...

    def fill(self, prepared: object, ctx: RoutingContext) -> None:
        """Put the data into ``ctx`` for ``ctx.pods``; no waiting, no state change."""
        ...

    def claimed(self, prepared: object, ctx: RoutingContext, index: int) -> None:
        """The request went to ``ctx.pods[index]`` (never called in a dry run)."""
        ...

    async def close(self) -> None: ...
