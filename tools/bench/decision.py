"""Decision cost: what one request's routing costs inside the server, without any I/O.

Through the routing pipeline itself: admit (no user), model check, candidates, tokenise
(character) and hash the prompt, look the prefix up, snapshot the candidates, score, pick,
claim, run the hooks and record the pick in the index. Body parsing and the release are left
out, as they were in the measurement before the pipeline, so the two compare.

``--against REF`` measures a git revision's own decision benchmark side by side in the same
run (a temporary worktree, rounds alternating), and reports new/old ratios.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from extproc.config import (
    AutoscalingSettings,
    HealthSettings,
    PrefixSettings,
    RoutingSettings,
    UsersSettings,
)
from extproc.fleet.health import PodHealth
from extproc.fleet.registry import PodRegistry, PodSpec
from extproc.prefix.index import PrefixIndex
from extproc.prefix.producer import PrefixProducer
from extproc.prefix.tokenizers import CharacterTokenizer
from extproc.routing.access_log import AccessLog
from extproc.routing.accounting import Accounting
from extproc.routing.holds import Holds
from extproc.routing.openai_request import Endpoint, InferenceRequest
from extproc.routing.pipeline import Outcome, Pipeline, RequestHead
from extproc.routing.plans import Plans
from extproc.scraping.readings import Reading, Readings
from extproc.telemetry import Telemetry
from extproc.users.ratelimit import RateLimiter
from extproc.users.store import MemoryUserStore
from strategies.context import MetricsWindow, PodMetrics
from tools.bench.workloads import text

REPO = Path(__file__).resolve().parents[2]


def _pipeline(pods: int, now: float) -> tuple[Pipeline, PrefixProducer]:
    telemetry = Telemetry()
    registry = PodRegistry()
    registry.replace_all(
        PodSpec(name=f"pod-{i}", address=f"10.0.{i // 250}.{i % 250}:8000", model="m")
        for i in range(pods)
    )
    readings = Readings(stale_after=60.0)
    accounting = Accounting()
    rng = random.Random(1)
    for i in range(pods):
        name = f"pod-{i}"
        for _ in range(rng.randint(0, 8)):
            accounting.claim(name, None, 0)
        metrics = PodMetrics(
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
        readings.publish(name, Reading(metrics, now, now))
    prefix = PrefixProducer(
        PrefixSettings(),
        CharacterTokenizer(),
        PrefixIndex(1_000_000, 600),
        telemetry,
        registry,
        readings,
    )
    pipeline = Pipeline(
        RoutingSettings(),
        registry=registry,
        readings=readings,
        accounting=accounting,
        plans=Plans(RoutingSettings()),
        producers=[prefix],
        limiter=RateLimiter(UsersSettings(), MemoryUserStore(), telemetry, "user"),
        holds=Holds(AutoscalingSettings(), registry, 2),
        health=PodHealth(HealthSettings(), registry, telemetry),
        telemetry=telemetry,
        access_log=AccessLog(False),
        seed=1,
    )
    return pipeline, prefix


async def _measure(
    pods: int, chars: int, strategy: str, requests: int, groups: int
) -> dict[str, Any]:
    now = time.monotonic()
    pipeline, prefix = _pipeline(pods, now)
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
    names = [f"pod-{i}" for i in range(pods)]
    for body in bodies[: groups * 4]:  # warm the index: every prefix cached somewhere
        hashed = await prefix.prepare(body, dry_run=True)
        prefix.index.record(hashed.hashes, rng.choice(names))
    head = RequestHead("r", Endpoint.CHAT, None, strategy)
    samples = []
    done = Outcome("200")
    for body in bodies:
        started = time.perf_counter()
        ticket = pipeline.open(head)
        await ticket.admit()
        await ticket.route_request(body)
        samples.append(time.perf_counter() - started)
        ticket.release(done)
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


def _subprocess_run(root: Path, arguments: dict[str, Any]) -> list[dict[str, Any]]:
    """The decision benchmark of the checkout at ``root``, in its own interpreter."""
    code = (
        "import json, sys; from tools.bench import decision; "
        "a = json.loads(sys.argv[1]); "
        "print(json.dumps(decision.run(a['pods'], a['chars'], a['strategies'], "
        "a['requests'], a['groups'])))"
    )
    output = subprocess.run(
        [sys.executable, "-c", code, json.dumps(arguments)],
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    results: list[dict[str, Any]] = json.loads(output.strip().splitlines()[-1])["results"]
    return results


def against(
    ref: str,
    pods: list[int],
    chars: list[int],
    strategies: list[str],
    requests: int,
    groups: int,
    rounds: int = 3,
) -> dict[str, Any]:
    """This checkout against ``ref`` in one run: rounds alternate, the best round counts."""
    arguments = {
        "pods": pods,
        "chars": chars,
        "strategies": strategies,
        "requests": requests,
        "groups": groups,
    }
    with tempfile.TemporaryDirectory(prefix="extproc-bench-") as tmp:
        old_root = Path(tmp) / "old"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(old_root), ref],
            cwd=REPO,
            check=True,
            capture_output=True,
        )
        try:
            new: list[list[dict[str, Any]]] = []
            old: list[list[dict[str, Any]]] = []
            for _ in range(rounds):
                old.append(_subprocess_run(old_root, arguments))
                new.append(_subprocess_run(REPO, arguments))
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(old_root)],
                cwd=REPO,
                check=False,
                capture_output=True,
            )
    results = []
    for index, first in enumerate(new[0]):
        best_new = min(r[index]["p50_us"] for r in new)
        best_old = min(r[index]["p50_us"] for r in old)
        results.append(
            {
                **{k: first[k] for k in ("pods", "prompt_chars", "strategy", "requests")},
                "new_p50_us": best_new,
                "old_p50_us": best_old,
                "new_p99_us": min(r[index]["p99_us"] for r in new),
                "old_p99_us": min(r[index]["p99_us"] for r in old),
                "new_over_old_p50": round(best_new / best_old, 3),
            }
        )
    return {"benchmark": "decision", "against": ref, "rounds": rounds, "results": results}
