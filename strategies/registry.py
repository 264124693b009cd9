"""Every strategy by its exact name. A new strategy is one module plus one line here."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from strategies.base import Strategy
from strategies.least_busy_time import LeastBusyTime
from strategies.least_kv_cache import LeastKvCache
from strategies.least_latency import LeastLatency
from strategies.least_request import LeastRequest
from strategies.prefix_cache import PrefixCache
from strategies.prefix_cache_and_load import PrefixCacheAndLoad
from strategies.random_choice import RandomChoice
from strategies.throughput import Throughput
from strategies.vtc_basic import VtcBasic

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (
        RandomChoice,
        LeastRequest,
        Throughput,
        LeastBusyTime,
        LeastKvCache,
        LeastLatency,
        PrefixCache,
        PrefixCacheAndLoad,
        VtcBasic,
    )
}

FALLBACK = LeastRequest.name
"""What the router uses when a strategy cannot decide."""


class OptionError(ValueError):
    """A strategy option that does not exist or has a bad value; ``key`` names it."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


def names() -> list[str]:
    return list(STRATEGIES)


def build(name: str, options: Mapping[str, Any] | None = None) -> Strategy:
    """Instantiate strategy ``name`` with ``options`` (its dataclass fields), validating both."""
    cls = STRATEGIES.get(name)
    if cls is None:
        raise OptionError(name, f"unknown strategy; valid strategies: {', '.join(STRATEGIES)}")
    options = dict(options or {})
    allowed = _option_names(cls)
    for key in options:
        if key not in allowed:
            valid = ", ".join(sorted(allowed)) or "none"
            raise OptionError(f"{name}.{key}", f"unknown option; valid options: {valid}")
    try:
        return cls(**options)
    except (TypeError, ValueError) as exc:
        raise OptionError(name, str(exc)) from exc


def option_defaults(name: str) -> dict[str, Any]:
    """A strategy's options and their defaults, for documentation and the debug API."""
    cls = STRATEGIES[name]
    if not dataclasses.is_dataclass(cls):
        return {}
    return {f.name: f.default for f in dataclasses.fields(cls) if f.init}


def _option_names(cls: type[Strategy]) -> list[str]:
    if not dataclasses.is_dataclass(cls):
        return []
    return [f.name for f in dataclasses.fields(cls) if f.init]
