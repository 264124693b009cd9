"""Every algorithm by its exact name, and the named instances a configuration builds.

A new strategy is one module plus one line in ``ALGORITHMS``. The configuration
(``routing.strategies``) may give a built-in instance options (``least-request: {smoothing:
2}``) or add an instance under a new name (``sticky: {algorithm: prefix-cache,
min_match_blocks: 4}``), so one algorithm can appear twice in a weighted list with different
options.
"""

from __future__ import annotations

import dataclasses
import re
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

ALGORITHMS: dict[str, type[Strategy]] = {
    cls.algorithm: cls
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

FALLBACK = LeastRequest.algorithm
"""What the server uses for a strategy (or a pod) that cannot be scored."""
ALGORITHM_KEY = "algorithm"
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")


class OptionError(ValueError):
    """A strategy instance or option that does not exist or has a bad value; ``key`` names it
    (``instance`` or ``instance.option``)."""

    def __init__(self, key: str, detail: str) -> None:
        super().__init__(f"{key}: {detail}")
        self.key = key
        self.detail = detail


def names() -> list[str]:
    """The algorithms, which are also the names of their default instances."""
    return list(ALGORITHMS)


def instance_names(config: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Every instance name ``config`` yields (built-ins first), after validating it all."""
    return list(build_all(config))


def build_all(config: Mapping[str, Mapping[str, Any]]) -> dict[str, Strategy]:
    """One instance per algorithm under its own name, plus each instance ``config`` adds."""
    instances = {name: build(name, config.get(name)) for name in ALGORITHMS}
    for name, options in config.items():
        if name not in ALGORITHMS:
            instances[name] = build(name, options)
    return instances


def build(name: str, options: Mapping[str, Any] | None = None) -> Strategy:
    """The instance ``name``: a built-in algorithm, or ``options["algorithm"]`` under a new
    name, with the remaining options as the algorithm's fields."""
    options = dict(options or {})
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise OptionError(
            str(name), "a strategy name is lower-case letters, digits, '.', '_' and '-'"
        )
    algorithm = options.pop(ALGORITHM_KEY, name)
    cls = ALGORITHMS.get(algorithm)
    if cls is None:
        valid = ", ".join(ALGORITHMS)
        if algorithm == name:
            raise OptionError(name, f"unknown strategy; give it an algorithm: one of {valid}")
        raise OptionError(f"{name}.{ALGORITHM_KEY}", f"unknown algorithm; valid: {valid}")
    if name in ALGORITHMS and algorithm != name:
        raise OptionError(f"{name}.{ALGORITHM_KEY}", "a built-in strategy keeps its algorithm")
    allowed = option_defaults(algorithm)
    for key in options:
        if key not in allowed:
            valid = ", ".join(sorted(allowed)) or "none"
            raise OptionError(f"{name}.{key}", f"unknown option; valid options: {valid}")
    try:
        strategy = cls(**options)
    except (TypeError, ValueError) as exc:
        raise OptionError(name, str(exc)) from exc
    strategy.name = name
    return strategy


def option_defaults(algorithm: str) -> dict[str, Any]:
    """An algorithm's options and their defaults, for documentation and validation."""
    cls = ALGORITHMS[algorithm]
    if not dataclasses.is_dataclass(cls):
        return {}
    return {f.name: f.default for f in dataclasses.fields(cls) if f.init}
