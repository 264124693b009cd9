"""Decision cost: what one request's routing costs inside the server, without any I/O.

Tokenise (character), hash the prompt's blocks, look the prefix up in the index, score every
candidate with the strategy, pick, and record the pick in the index: the same calls the
exchange makes, timed over many requests on a warmed index.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from typing import Any

from extproc.openai_request import Endpoint, InferenceRequest
from extproc.prefix.index import PrefixIndex
from extproc.prefix.tokenizers import CharacterTokenizer
from extproc.prefix.tracker import PrefixTracker
from extproc.router import Router
from extproc.telemetry import Telemetry
from strategies.base import MetricsWindow, PodMetrics, PodView, RequestView
from tools.bench.workloads import text


def _fleet(pods: int, now: float) -> list[PodView]:
    rng = random.Random(1)
    fleet = []
    for i in range(pods):
        view = PodView(
            name=f"pod-{i}",
            address=f"10.0.{i // 250}.{i % 250}:8000",
            model="m",
            in_flight=rng.randint(0, 8),
            stale_after=60.0,
        )
        view.metrics = PodMetrics(
            running=rng.randint(0, 16),
            waiting=rng.randint(0, 4),
            kv_cache_usage=rng.random(),
            block_size=16,
            num_gpu_blocks=2048,
            window=MetricsWindow(
                seconds=30,
                requests=100,
                prompt_tokens=50_000,
                generation_tokens=20_000,
                queue_seconds=0.05,
                ttft_seconds=0.2,
                e2e_seconds=2.0,
            ),
        )
        view.metrics_at = now
        fleet.append(view)
    return fleet


async def _measure(
    pods: int, chars: int, strategy: str, requests: int, groups: int
) -> dict[str, Any]:
    telemetry = Telemetry()
    router = Router(telemetry, seed=1)
    plan = router.plan(strategy)
    tracker = PrefixTracker(CharacterTokenizer(), PrefixIndex(1_000_000, 600), 64, 16, telemetry)
    now = time.monotonic()
    fleet = _fleet(pods, now)
    rng = random.Random(2)
    prefixes = [text(rng, chars) for _ in range(groups)]
    bodies = [
        InferenceRequest(
            Endpoint.CHAT,
            "m",
            messages=[
                ("system", prefixes[i % groups][: chars - 200]),
                ("user", f"[{i}] " + text(rng, 195)),
            ],
        )
        for i in range(requests)
    ]
    for body in bodies[: groups * 4]:  # warm the index: every prefix cached somewhere
        hashes = await tracker.hashes("m", body)
        tracker.record(hashes, rng.choice(fleet), 0)
    samples = []
    for i, body in enumerate(bodies):
        started = time.perf_counter()
        view = RequestView(request_id=str(i), model="m", now=now, prompt_length=body.prompt_length)
        if plan.needs_prefix:
            hashes = await tracker.hashes("m", body)
            view.prefix_blocks = len(hashes)
            view.prefix_matches = tracker.lookup(hashes, fleet)
        decision = router.decide(plan, view, fleet)
        if plan.needs_prefix:
            tracker.record(hashes, decision.pod, view.prefix_matches.get(decision.pod.name, 0))
        router.routed(view, decision.pod)
        samples.append(time.perf_counter() - started)
    samples.sort()
    return {
        "pods": pods,
        "prompt_chars": chars,
        "strategy": strategy,
        "requests": requests,
        "p50_us": round(1e6 * samples[len(samples) // 2], 1),
        "p99_us": round(1e6 * samples[int(len(samples) * 0.99)], 1),
        "mean_us": round(1e6 * statistics.fmean(samples), 1),
    }


def run(
    pods: list[int], chars: list[int], strategies: list[str], requests: int, groups: int
) -> dict[str, Any]:
    results = [
        asyncio.run(_measure(p, c, s, requests, groups))
        for s in strategies
        for p in pods
        for c in chars
    ]
    return {"benchmark": "decision", "results": results}
