"""Added latency of the ext_proc hop: the same Envoy, the same pod, with and without routing.

Blocks of requests alternate between Envoy's plain listener (straight to pod 0) and its gateway
listener (ext_proc picks among the pods), so machine noise hits both sides alike.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from tools.bench.loadgen import Run, Sample, closed_loop, percentile
from tools.bench.proc import cpu_seconds
from tools.devstack import LocalStack, StackConfig

BODY = {"model": "bench", "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}


@dataclass
class OverheadResult:
    label: str
    samples: list[Sample]

    def summary(self) -> dict[str, Any]:
        latencies = [s.latency * 1000 for s in self.samples if s.status == 200]
        return {
            "label": self.label,
            "requests": len(self.samples),
            "errors": sum(1 for s in self.samples if s.status != 200),
            "p50_ms": round(percentile(latencies, 50), 3),
            "p90_ms": round(percentile(latencies, 90), 3),
            "p99_ms": round(percentile(latencies, 99), 3),
        }


def stack_config(pods: int, server_args: list[str], layout: dict[str, Any]) -> StackConfig:
    return StackConfig(
        pods=pods,
        models=("bench",),
        sim_defaults={
            "decode_time_base": 0.0,
            "decode_time_per_seq": 0.0,
            "prefill_time_per_token": 0.0,
        },
        server_args=server_args,
        layout=layout,
        direct_listener=True,
    )


async def measure(
    stack: LocalStack,
    variants: dict[str, dict[str, str] | None],
    requests: int,
    concurrency: int,
    blocks: int,
) -> tuple[dict[str, OverheadResult], float]:
    """Alternate blocks over ``variants`` (label -> routing headers, None = direct listener)."""
    results = {label: OverheadResult(label, []) for label in variants}
    per_block = max(1, requests // blocks)
    server_pid = stack.server.pid if stack.server else 0
    cpu_before = cpu_seconds(server_pid)
    routed = 0
    for _ in range(blocks):
        for label, headers in variants.items():
            base = stack.direct_url if headers is None else stack.gateway_url
            url = base + "/v1/chat/completions"

            def factory(i: int, url: str = url, headers: dict[str, str] | None = headers) -> Any:
                return url, BODY, headers or {}

            run: Run = await closed_loop(factory, per_block, concurrency)
            results[label].samples.extend(run.samples)
            if headers is not None:
                routed += len(run.samples)
    cpu_per_1000 = (cpu_seconds(server_pid) - cpu_before) / max(routed, 1) * 1000
    return results, cpu_per_1000


def run(
    pods: int,
    requests: int,
    concurrency: int,
    blocks: int,
    warmup: int,
    strategies: list[str],
    server_args: list[str],
    layout: dict[str, Any],
) -> dict[str, Any]:
    variants: dict[str, dict[str, str] | None] = {"envoy-direct": None}
    for strategy in strategies:
        variants[f"extproc {strategy}"] = {"routing-strategy": strategy}
    with LocalStack(stack_config(pods, server_args, layout)) as stack:
        asyncio.run(measure(stack, variants, warmup, concurrency, 1))
        results, cpu_per_1000 = asyncio.run(measure(stack, variants, requests, concurrency, blocks))
    summaries = [r.summary() for r in results.values()]
    baseline = summaries[0]
    for summary in summaries[1:]:
        summary["added_p50_ms"] = round(summary["p50_ms"] - baseline["p50_ms"], 3)
        summary["added_p99_ms"] = round(summary["p99_ms"] - baseline["p99_ms"], 3)
    return {
        "benchmark": "overhead",
        "pods": pods,
        "requests_per_variant": requests,
        "concurrency": concurrency,
        "server_cpu_seconds_per_1000_routed": round(cpu_per_1000, 3),
        "results": summaries,
    }
