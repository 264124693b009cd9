"""The named strategy instances and the plans a ``routing-strategy`` value names.

A plan is a parsed header value (one instance, or a weighted list), cached by that value. This
module owns the instances, so it also dispatches the hooks every instance may implement.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

from extproc import errors
from extproc.config import RoutingSettings
from strategies import registry
from strategies.base import Strategy, overrides
from strategies.context import USAGE, Finished, PodSnapshot, RoutingContext
from strategies.selection import PlanSyntaxError, parse_weighted

log = logging.getLogger(__name__)

PLAN_CACHE_SIZE = 256


@dataclass(frozen=True, slots=True)
class Plan:
    label: str
    """Normalised form, e.g. ``prefix-cache:2,least-kv-cache:1``; a bare name for one strategy."""
    metric_label: str
    """The strategy name, or ``weighted`` for a list, so metric labels stay bounded."""
    strategies: tuple[Strategy, ...]
    weights: tuple[float, ...]
    consumes: frozenset[str]
    """Every data key a strategy of the plan consumes."""
    header_value: bytes

    @property
    def needs_usage(self) -> bool:
        return USAGE in self.consumes


class Plans:
    def __init__(self, settings: RoutingSettings, default: str | None = None) -> None:
        """``default`` stands in when ``settings`` names no default strategy."""
        self._header = settings.strategy_header
        self.strategies = registry.build_all(settings.strategies)
        self.fallback = self.strategies[registry.FALLBACK]
        instances = self.strategies.values()
        self._routed_hooks = [s for s in instances if overrides(s, "on_routed")]
        self._finished_hooks = [s for s in instances if overrides(s, "on_finished")]
        self._forget_hooks = [s for s in instances if overrides(s, "forget_pod")]
        self._cache: OrderedDict[str, Plan] = OrderedDict()
        value = settings.default_strategy or default
        self.default = self.parse(value) if value else None

    def parse(self, value: str, *, remember: bool = True) -> Plan:
        """The plan for a header value; a 400 ``GatewayError`` names a bad or unknown strategy.
        ``remember=False`` (dry runs) leaves the cache as it was."""
        cached = self._cache.get(value)
        if cached is not None:
            if remember:
                self._cache.move_to_end(value)
            return cached
        try:
            entries = parse_weighted(value)
        except PlanSyntaxError as exc:
            raise errors.invalid_strategy(str(exc), self._header) from None
        for name, _ in entries:
            if name not in self.strategies:
                raise errors.unknown_strategy(name, list(self.strategies), self._header)
        chosen = tuple(self.strategies[name] for name, _ in entries)
        single = len(entries) == 1
        label = entries[0][0] if single else ",".join(f"{n}:{w:g}" for n, w in entries)
        consumes: frozenset[str] = frozenset().union(*(s.consumes for s in chosen))
        plan = Plan(
            label=label,
            metric_label=entries[0][0] if single else "weighted",
            strategies=chosen,
            weights=tuple(w for _, w in entries),
            consumes=consumes,
            header_value=label.encode(),
        )
        if remember:
            self._cache[value] = plan
            if len(self._cache) > PLAN_CACHE_SIZE:
                self._cache.popitem(last=False)
        return plan

    # -- hooks ---------------------------------------------------------------------------------

    def routed(self, ctx: RoutingContext, pod: PodSnapshot) -> None:
        for strategy in self._routed_hooks:
            try:
                strategy.on_routed(ctx, pod)
            except Exception:
                log.exception("on_routed hook failed", extra={"strategy": strategy.name})

    def finished(self, done: Finished) -> None:
        for strategy in self._finished_hooks:
            try:
                strategy.on_finished(done)
            except Exception:
                log.exception("on_finished hook failed", extra={"strategy": strategy.name})

    def forget_pod(self, name: str) -> None:
        for strategy in self._forget_hooks:
            strategy.forget_pod(name)
