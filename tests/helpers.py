"""What many tests share: one ``eventually`` for waiting on a condition, and one factory for
the pods and contexts strategies see."""

from __future__ import annotations

import asyncio
import inspect
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from strategies.context import (
    PodMetrics,
    PodSnapshot,
    PrefixMatches,
    RoutingContext,
    Score,
    load_estimate,
)

if TYPE_CHECKING:
    from extproc.app import Server

NOW = 1000.0


async def eventually(
    check: Callable[[], bool] | Callable[[], Awaitable[bool]],
    timeout: float = 5.0,
    interval: float = 0.02,
    what: str = "condition",
) -> None:
    """Poll ``check`` (plain or async) until it holds; fail after ``timeout`` seconds. Tests
    wait on a condition instead of sleeping a fixed time, before positive and negative checks
    alike."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError(f"{what} not reached within {timeout:.1f}s")
        await asyncio.sleep(interval)


def snapshot(
    name: str,
    metrics: PodMetrics | None = None,
    *,
    in_flight: int = 0,
    sent: int = 0,
    sent_tokens: int = 0,
    stale: bool = False,
    address: str | None = None,
) -> PodSnapshot:
    """A candidate as a strategy sees it. ``stale`` keeps the metrics from the strategy (they
    exist but are too old), like the pipeline does."""
    fresh = None if stale else metrics
    return PodSnapshot(
        name=name,
        address=address or f"10.0.0.{abs(hash(name)) % 250 + 1}:8000",
        in_flight=in_flight,
        sent_since_scrape=sent,
        sent_prompt_tokens=sent_tokens,
        metrics=fresh,
        metrics_missing=metrics is None,
        load=load_estimate(in_flight, sent, fresh),
    )


def fleet(*loads: int) -> list[PodSnapshot]:
    """Pods ``p0, p1, ...`` with these in-flight counts and no metrics."""
    return [snapshot(f"p{i}", in_flight=load) for i, load in enumerate(loads)]


def prefix(
    matched: Sequence[int],
    held: Sequence[int] | None = None,
    blocks: int = 40,
    block_tokens: int = 16,
) -> PrefixMatches:
    """Prefix data given in blocks (``matched``, ``held`` per pod; ``blocks`` in the prompt)."""
    return PrefixMatches(
        block_tokens=block_tokens,
        prompt_tokens=blocks * block_tokens,
        matched=tuple(m * block_tokens for m in matched),
        held=tuple(h * block_tokens for h in (held if held is not None else [0] * len(matched))),
        precise=(False,) * len(matched),
    )


def context(
    pods: Sequence[PodSnapshot],
    *,
    user: str | None = None,
    prompt_tokens: int = 0,
    max_tokens: int | None = None,
    prefix: PrefixMatches | None = None,
    now: float = NOW,
    key: int = 1,
    seed: int = 0,
) -> RoutingContext:
    return RoutingContext(
        key=key,
        model="m",
        user=user,
        now=now,
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
        pods=tuple(pods),
        rng=random.Random(seed),
        prefix=prefix,
    )


def best(scores: Sequence[Score], pods: Sequence[PodSnapshot]) -> str:
    """The name of the pod with the highest (known) score."""
    known = [(s, p) for s, p in zip(scores, pods, strict=True) if isinstance(s, float | int)]
    return max(known, key=lambda pair: pair[0])[1].name


def in_flight(server: Server) -> int:
    """Requests the server counts against its pods."""
    return sum(server.accounting.counters(p.name).in_flight for p in server.registry.pods())
