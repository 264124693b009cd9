"""The interface every strategy implements.

A strategy scores the candidates of one request (higher is better, each score in 0..1, or
``Unknown`` for a pod it has no data about) and may keep state through hooks. It declares the
data it consumes (``consumes``, keys from ``strategies.context``) so the server produces only
what the plan in use needs. Strategies are named instances: the registry builds one per
algorithm under the algorithm's name, plus any the configuration adds with its own options.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from strategies.context import Finished, PodSnapshot, RoutingContext, Score


class CannotDecide(Exception):
    """Raised by a strategy that has no basis for any choice; the server falls back and counts
    it. ``reason`` becomes a metric label, so it must come from a small fixed set."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Strategy:
    """A routing algorithm. Subclasses set ``algorithm`` (the name its default instance answers
    to in a ``routing-strategy`` header) and are dataclasses whose fields are their options.

    The server calls the hooks of every strategy instance that overrides them, for every routed
    request, whichever strategy chose the pod: state such as a per-pod token window describes
    the pods, not one strategy's own decisions. ``score`` must not change any state: the debug
    API runs it as a dry run.
    """

    algorithm: ClassVar[str]
    consumes: ClassVar[frozenset[str]] = frozenset()
    name: str
    """The instance's name (``algorithm`` unless the configuration named it otherwise)."""

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "algorithm" in cls.__dict__:
            cls.name = cls.algorithm

    def score(self, ctx: RoutingContext) -> Sequence[Score]:
        """One score per pod of ``ctx.pods``, in order. Raise ``CannotDecide`` to fall back."""
        raise NotImplementedError

    def on_routed(self, ctx: RoutingContext, pod: PodSnapshot) -> None:
        """Called once the request has been sent to ``pod``."""

    def on_finished(self, done: Finished) -> None:
        """Called exactly once when a routed request ends, however it ends."""

    def forget_pod(self, name: str) -> None:
        """Called when a pod leaves the fleet, so per-pod state does not outlive it."""


def overrides(strategy: Strategy, hook: str) -> bool:
    """Whether ``strategy`` implements ``hook`` itself, so the server can skip no-op calls."""
    return getattr(type(strategy), hook) is not getattr(Strategy, hook)


def scores_or_unknown(values: Sequence[float | None], pods: Sequence[PodSnapshot]) -> list[Score]:
    """``values`` with each ``None`` replaced by why that pod's metrics are unknown."""
    return [pod.unknown if v is None else v for v, pod in zip(values, pods, strict=True)]
