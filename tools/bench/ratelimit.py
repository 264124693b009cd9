"""Added latency of the rate-limit check, users in memory vs in Redis, and how exact the limit
stays under a burst, measured in one run.

- ``check``: the check alone, in this process: ``RateLimiter.admit`` against the in-memory store
  and against a real ``redis-server`` on loopback (one Lua script call), alternating blocks.
- ``requests``: whole requests through Envoy to two local stacks (users in memory, users in
  Redis), alternating blocks of: no user header (not checked: the baseline), a user with an RPM
  limit (the check), a user with RPM and TPM limits (the check, plus reading the response body
  for ``usage`` and charging it). Limits are high enough never to reject.
- ``burst_checks``: N checks at once of one user with an RPM of ``BURST_RPM``, split between two
  rate limiters (two replicas' worth, default settings) on one real Redis, in this process: how
  many were admitted (exactly ``BURST_RPM`` is right), how many failed, and each check's latency.
- ``burst_requests``: the same through Envoy: N requests at once split between two local stacks
  sharing one Redis, under each failure policy: statuses counted, and request latency.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

from extproc import config
from extproc.devstack.stack import LocalStack, StackConfig
from extproc.errors import GatewayError
from extproc.telemetry import Telemetry
from extproc.users.ratelimit import RateLimiter
from extproc.users.store import MemoryUserStore, RedisUserStore, User, UserStore
from tools.bench.loadgen import closed_loop, percentile
from tools.bench.overhead import INSTANT_SIM, Variant
from tools.redis_server import RedisServer

BODY = {"model": "bench", "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}
HIGH = 10**12
CHECK_USER = User("bench-check", rpm=HIGH)
USERS = {"none": None, "rpm": User("bench-rpm", rpm=HIGH), "rpm+tpm": User("bench-tpm", HIGH, HIGH)}
BURST_RPM = 10
BURSTS = (50, 300, 600, 1000)
POLICIES = ("fail-open", "fail-closed")


async def _check_latencies(
    limiters: dict[str, RateLimiter], checks: int, blocks: int
) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {label: [] for label in limiters}
    per_block = max(1, checks // blocks)
    for _ in range(blocks):
        for label, limiter in limiters.items():
            times = samples[label]
            for _ in range(per_block):
                started = time.perf_counter()
                await limiter.admit(CHECK_USER.name)
                times.append(time.perf_counter() - started)
    return samples


async def measure_checks(redis_url: str, checks: int, blocks: int) -> list[dict[str, Any]]:
    stores: dict[str, UserStore] = {
        "memory": MemoryUserStore(),
        "redis": RedisUserStore(redis_url, timeout=1.0, max_wait=1.0),
    }
    settings = config.load({"redis_timeout": "1s"}, {}).users
    limiters = {}
    for label, store in stores.items():
        await store.create(CHECK_USER)
        limiters[label] = RateLimiter(settings, store, Telemetry(), "user")
    await _check_latencies(limiters, max(1, checks // 10), 1)
    samples = await _check_latencies(limiters, checks, blocks)
    for store in stores.values():
        await store.close()
    results = []
    for label, times in samples.items():
        micros = [t * 1e6 for t in times]
        results.append(
            {
                "store": label,
                "checks": len(micros),
                "p50_us": round(percentile(micros, 50), 1),
                "p99_us": round(percentile(micros, 99), 1),
            }
        )
    return results


def _stack(server_args: list[str]) -> StackConfig:
    return StackConfig(
        pods=1,
        models=("bench",),
        sim_defaults=INSTANT_SIM,
        server_args=server_args,
    )


async def _create_users(stack: LocalStack) -> None:
    async with aiohttp.ClientSession() as session:
        for user in USERS.values():
            if user is not None:
                url = f"{stack.users_url}/CreateUser"
                async with session.post(url, json=user.to_json()) as response:
                    response.raise_for_status()


async def measure_requests(
    stacks: dict[str, LocalStack], requests: int, blocks: int
) -> dict[str, Variant]:
    results: dict[str, Variant] = {}
    per_block = max(1, requests // blocks)
    for _ in range(blocks):
        for store, stack in stacks.items():
            url = stack.gateway_url + "/v1/chat/completions"
            for variant, user in USERS.items():
                label = f"{store} / {variant}"
                headers = {"user": user.name} if user is not None else {}

                def factory(i: int, url: str = url, headers: dict[str, str] = headers) -> Any:
                    return url, BODY, headers

                run = await closed_loop(factory, per_block, 1)
                result = results.setdefault(label, Variant(label, url, headers, None, samples=[]))
                assert result.samples is not None
                result.samples.extend(run.samples)
    return results


def _latency_ms(seconds: list[float]) -> dict[str, float]:
    millis = [t * 1000 for t in seconds]
    return {"p50_ms": round(percentile(millis, 50), 3), "p99_ms": round(percentile(millis, 99), 3)}


async def _burst_of_checks(
    limiters: list[RateLimiter], user: str, n: int
) -> tuple[Counter[str], list[float]]:
    outcomes: Counter[str] = Counter()
    latencies: list[float] = []

    async def one(i: int) -> None:
        started = time.perf_counter()
        try:
            await limiters[i % len(limiters)].admit(user)
            outcomes["admitted"] += 1
        except GatewayError as err:
            outcomes[str(err.status)] += 1
        latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(one(i) for i in range(n)))
    return outcomes, latencies


async def measure_burst_checks(redis_url: str, sizes: tuple[int, ...]) -> list[dict[str, Any]]:
    """Per size and policy: N concurrent ``admit`` calls over two limiters, default settings."""
    results = []
    for policy in POLICIES:
        settings = config.load({"redis_failure_policy": policy}, {}).users
        stores = [
            RedisUserStore(redis_url, settings.redis_timeout, settings.redis_max_wait)
            for _ in range(2)
        ]
        limiters = [RateLimiter(settings, store, Telemetry(), "user") for store in stores]
        for n in sizes:
            user = f"checks-{policy}-{n}"
            await stores[0].create(User(user, rpm=BURST_RPM))
            outcomes, latencies = await _burst_of_checks(limiters, user, n)
            results.append(
                {"policy": policy, "concurrent": n, **dict(outcomes), **_latency_ms(latencies)}
            )
        for store in stores:
            await store.close()
    return results


async def measure_burst_requests(
    stacks: list[LocalStack], policy: str, sizes: tuple[int, ...]
) -> list[dict[str, Any]]:
    results = []
    urls = [stack.gateway_url + "/v1/chat/completions" for stack in stacks]
    for n in sizes:
        user = User(f"requests-{policy}-{n}", rpm=BURST_RPM)
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{stacks[0].users_url}/CreateUser", json=user.to_json()) as response,
        ):
            response.raise_for_status()

        def factory(i: int, name: str = user.name) -> Any:
            return urls[i % len(urls)], BODY, {"user": name}

        run = await closed_loop(factory, n, n)
        statuses = Counter(str(sample.status) for sample in run.samples)
        results.append(
            {
                "policy": policy,
                "concurrent": n,
                **dict(sorted(statuses.items())),
                **_latency_ms([sample.latency for sample in run.samples]),
            }
        )
    return results


def run_bursts(redis: RedisServer, sizes: tuple[int, ...] = BURSTS) -> dict[str, Any]:
    checks = asyncio.run(measure_burst_checks(redis.url, sizes))
    requests = []
    for policy in POLICIES:
        args = ["--redis-url", redis.url, "--redis-failure-policy", policy]
        stacks = [LocalStack(_stack(args)) for _ in range(2)]
        try:
            for stack in stacks:
                stack.start()
            requests += asyncio.run(measure_burst_requests(stacks, policy, sizes))
        finally:
            for stack in stacks:
                stack.stop()
    return {"rpm": BURST_RPM, "burst_checks": checks, "burst_requests": requests}


def run(requests: int, checks: int, blocks: int, warmup: int) -> dict[str, Any]:
    with (
        tempfile.TemporaryDirectory(prefix="bench-ratelimit-") as tmp,
        RedisServer(Path(tmp) / "redis") as redis,
    ):
        check_results = asyncio.run(measure_checks(redis.url, checks, blocks))
        configs = {"memory": _stack([]), "redis": _stack(["--redis-url", redis.url])}
        stacks = {label: LocalStack(c) for label, c in configs.items()}
        try:
            for stack in stacks.values():
                stack.start()
                asyncio.run(_create_users(stack))
            asyncio.run(measure_requests(stacks, warmup, 1))
            results = asyncio.run(measure_requests(stacks, requests, blocks))
        finally:
            for stack in stacks.values():
                stack.stop()
        bursts = run_bursts(redis)
    summaries = [r.summary() for r in results.values()]
    baselines = {s["label"].split(" / ")[0]: s for s in summaries if s["label"].endswith("none")}
    for summary in summaries:
        base = baselines[summary["label"].split(" / ")[0]]
        for q in ("p50", "p99"):
            summary[f"added_{q}_ms"] = round(summary[f"{q}_ms"] - base[f"{q}_ms"], 3)
            summary[f"{q}_ratio"] = round(summary[f"{q}_ms"] / base[f"{q}_ms"], 3)
    by_store = {c["store"]: c for c in check_results}
    return {
        "benchmark": "ratelimit",
        "check": check_results,
        "check_redis_over_memory_p50": round(
            by_store["redis"]["p50_us"] / by_store["memory"]["p50_us"], 1
        ),
        "requests_per_variant": requests,
        "concurrency": 1,
        "requests": summaries,
        "bursts": bursts,
    }
