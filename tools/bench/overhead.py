"""Added latency of the routing hop, side by side in one run on the same simulated pods.

Variants, in alternating blocks so machine noise hits all alike:

- ``pod-direct``: the client straight to pod 0 (the floor for any proxy);
- ``envoy-direct``: the same Envoy, a listener with no ext_proc, straight to pod 0;
- ``extproc no-op``: the same Envoy with a Python ext_proc that does nothing but answer
  (``tools/bench/noop_extproc.py``): the floor any Python ``grpc.aio`` ext_proc pays;
- ``extproc <strategy>``: the same Envoy's gateway listener, our server picking the pod;
- ``sglang-<policy>``: the SGLang router (``sglang-router`` from PyPI) in front of the pods;
- ``epp-<shape> <strategy>``: our server as an endpoint picker behind an Envoy configured in
  that gateway's shape (``ai-gateway``: full-duplex bodies, TLS to the picker, ORIGINAL_DST;
  ``istio``: override_host), in its own stack of the same instant pods, alongside.

Our added latency is measured against ``envoy-direct`` (Envoy is there anyway); the SGLang
router's against ``pod-direct`` (it is the proxy). The server's CPU seconds per 1000 routed
requests are read from /proc.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

from extproc.devstack.processes import Managed
from extproc.devstack.stack import LocalStack, StackConfig
from tools.bench.compare import start_sglang
from tools.bench.loadgen import Run, Sample, closed_loop, percentile
from tools.bench.proc import cpu_seconds

BODY = {"model": "bench", "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}
INSTANT_SIM = {"decode_time_base": 0.0, "decode_time_per_seq": 0.0, "prefill_time_per_token": 0.0}
"""Simulated pods that answer at once: latency benchmarks measure the path, not the pod."""


@dataclass
class Variant:
    label: str
    url: str
    headers: dict[str, str]
    baseline: str | None
    """The variant this one's added latency is measured against."""
    routed: bool = False
    samples: list[Sample] | None = None

    def summary(self) -> dict[str, Any]:
        latencies = [s.latency * 1000 for s in self.samples or [] if s.status == 200]
        return {
            "label": self.label,
            "requests": len(self.samples or []),
            "errors": sum(1 for s in self.samples or [] if s.status != 200),
            "p50_ms": round(percentile(latencies, 50), 3),
            "p90_ms": round(percentile(latencies, 90), 3),
            "p99_ms": round(percentile(latencies, 99), 3),
        }


def stack_config(pods: int, server_args: list[str], layout: dict[str, Any]) -> StackConfig:
    return StackConfig(
        pods=pods,
        models=("bench",),
        sim_defaults=INSTANT_SIM,
        server_args=server_args,
        layout=layout,
        direct_listener=True,
        noop_listener=True,
    )


async def measure(
    stack: LocalStack, variants: list[Variant], requests: int, concurrency: int, blocks: int
) -> float:
    """Alternate blocks over the variants; returns server CPU seconds per 1000 routed requests."""
    per_block = max(1, requests // blocks)
    server_pid = stack.server.pid if stack.server else 0
    cpu_before = cpu_seconds(server_pid)
    routed = 0
    for variant in variants:
        variant.samples = []
    for _ in range(blocks):
        for variant in variants:

            def factory(i: int, v: Variant = variant) -> Any:
                return v.url + "/v1/chat/completions", BODY, v.headers

            run: Run = await closed_loop(factory, per_block, concurrency)
            assert variant.samples is not None
            variant.samples.extend(run.samples)
            if variant.routed:
                routed += len(run.samples)
    return (cpu_seconds(server_pid) - cpu_before) / max(routed, 1) * 1000


def run(
    pods: int,
    requests: int,
    concurrency: int,
    blocks: int,
    warmup: int,
    strategies: list[str],
    sglang: list[str],
    server_args: list[str],
    layout: dict[str, Any],
    epp_shapes: list[str] | None = None,
) -> dict[str, Any]:
    with contextlib.ExitStack() as stacks:
        stack = stacks.enter_context(LocalStack(stack_config(pods, server_args, layout)))
        pickers = {
            shape: stacks.enter_context(
                LocalStack(
                    StackConfig(
                        pods=pods,
                        models=("bench",),
                        sim_defaults=INSTANT_SIM,
                        server_args=server_args,
                        mode="epp",
                        epp_shape=shape,  # type: ignore[arg-type]
                    )
                )
            )
            for shape in epp_shapes or []
        }
        routers: list[Managed] = []
        try:
            variants = [
                Variant("pod-direct", stack.pods[0].url, {}, None),
                Variant("envoy-direct", stack.direct_url, {}, None),
            ]
            variants.append(
                Variant("extproc no-op (Python floor)", stack.noop_url, {}, "envoy-direct")
            )
            for strategy in strategies:
                variants.append(
                    Variant(
                        f"extproc {strategy}",
                        stack.gateway_url,
                        {"routing-strategy": strategy},
                        "envoy-direct",
                        routed=True,
                    )
                )
            for shape, picker in pickers.items():
                for strategy in strategies:
                    variants.append(
                        Variant(
                            f"epp-{shape} {strategy}",
                            picker.gateway_url,
                            {"routing-strategy": strategy},
                            "envoy-direct",
                        )
                    )
            for policy in sglang:
                router, url = start_sglang(stack, policy)
                routers.append(router)
                variants.append(Variant(f"sglang-{policy}", url, {}, "pod-direct"))
            asyncio.run(measure(stack, variants, warmup, concurrency, 1))
            cpu_per_1000 = asyncio.run(measure(stack, variants, requests, concurrency, blocks))
        finally:
            for router in routers:
                router.stop()
    summaries = {v.label: v.summary() for v in variants}
    for variant in variants:
        if variant.baseline is not None:
            summary, base = summaries[variant.label], summaries[variant.baseline]
            summary["added_vs"] = variant.baseline
            summary["added_p50_ms"] = round(summary["p50_ms"] - base["p50_ms"], 3)
            summary["added_p99_ms"] = round(summary["p99_ms"] - base["p99_ms"], 3)
    return {
        "benchmark": "overhead",
        "pods": pods,
        "requests_per_variant": requests,
        "concurrency": concurrency,
        "server_cpu_seconds_per_1000_routed": round(cpu_per_1000, 3),
        "results": list(summaries.values()),
    }
