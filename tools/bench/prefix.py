"""``python -m tools.bench prefix``: prefix-aware routing under KV-cache pressure.

Named scenarios on four simulated pods, sized so the shared prefixes need a chosen multiple of
the cluster's KV cache (``pressure``: the prefixes' blocks over all pods' blocks). Every target
gets a fresh stack (empty caches). A target is

- a strategy, matched ``@approx`` (the default: pods publish nothing, the server's own index of
  what it sent where, character tokenizer) or ``@exact`` (pods publish KV-cache events, the
  server tokenises with the pod's ``/tokenize`` and matches the pods' own block names), with
  ``-x2`` for two server replicas behind one Envoy (each with its own state);
- ``sglang-<policy>``: the SGLang router in front of the same pods (``sglang-cache_aware``);
- ``envoy-rr``: Envoy's own round robin, no server.

The hit rate is the pods' own: ``vllm:prefix_cache_hits_total / queries`` over the run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from extproc.devstack.processes import Managed
from extproc.devstack.stack import LocalStack, StackConfig
from extproc.vllm_sim.tokenizer import Tokenizer, render_chat
from tools.bench.compare import MODEL, make_target, prefix_counters, start_sglang
from tools.bench.report import summarize
from tools.bench.runner import run
from tools.bench.workloads import Session, shared_prefix

PODS = 4
BLOCK_SIZE = 16
POD_SIM: dict[str, Any] = {
    "block_size": BLOCK_SIZE,
    "max_num_seqs": 16,
    "decode_time_base": 0.01,
    "decode_time_per_seq": 0.001,
    "prefill_time_per_token": 0.0001,
}
"""Every pod: prefill 0.1 ms a token (a 2,000-token miss costs 0.2 s), 10 ms decode steps."""

EXACT_ARGS = ("--tokenizer", "remote", "--remote-tokenizer-timeout", "1")


@dataclass(frozen=True)
class Scenario:
    about: str
    groups: int
    prompts: int
    system_chars: int
    pressure: float
    """The groups' shared prefixes over the cluster's KV cache, in blocks."""
    rate: float
    question_chars: int = 200
    output_tokens: int = 16
    pod_params: dict[int, dict[str, Any]] = field(default_factory=dict)

    def sessions(self, seed: int) -> list[Session]:
        return shared_prefix(
            self.groups,
            self.prompts,
            self.system_chars,
            self.question_chars,
            self.output_tokens,
            seed,
        )

    def num_gpu_blocks(self, sessions: list[Session]) -> int:
        return math.ceil(prefix_blocks(sessions) / (PODS * self.pressure))


SCENARIOS: dict[str, Scenario] = {
    "pressure-0.7": Scenario(
        "16 groups x 20 prompts, 2,000-token shared prefixes at 0.7x the cluster's cache",
        groups=16,
        prompts=20,
        system_chars=8000,
        pressure=0.7,
        rate=8,
    ),
    "pressure-1.1": Scenario(
        "the same prompts, the cache cut to 1/1.1 of the prefixes",
        groups=16,
        prompts=20,
        system_chars=8000,
        pressure=1.1,
        rate=8,
    ),
    "pressure-1.5": Scenario(
        "the same prompts, the cache cut to 1/1.5 of the prefixes",
        groups=16,
        prompts=20,
        system_chars=8000,
        pressure=1.5,
        rate=8,
    ),
    "llm-d": Scenario(
        "llm-d's 150 groups x 6,000-token contexts scaled down: 40 groups x 1,500 tokens, "
        "8 prompts each, prefixes at 0.75x the cluster's cache",
        groups=40,
        prompts=8,
        system_chars=6000,
        pressure=0.75,
        rate=8,
    ),
    "uneven": Scenario(
        "pressure-0.7's prompts, one pod (sim-0) three times slower",
        groups=16,
        prompts=20,
        system_chars=8000,
        pressure=0.7,
        rate=8,
        pod_params={0: {"slow_factor": 3.0}},
    ),
}


def prefix_blocks(sessions: list[Session]) -> int:
    """The full KV blocks each group's prompts share (as the pods tokenise them), summed."""
    tokenizer = Tokenizer()
    first: dict[Any, list[int]] = {}
    shared: dict[Any, int] = {}
    for session in sessions:
        group = session.meta.get("group", session.id)
        messages = session.body(0, MODEL, [])["messages"]
        ids = tokenizer.encode_prompt(render_chat(messages))
        if group not in first:
            first[group] = ids
            continue
        other = first[group]
        common = 0
        for a, b in zip(ids, other, strict=False):
            if a != b:
                break
            common += 1
        shared[group] = min(shared.get(group, common), common)
    return sum(tokens // BLOCK_SIZE for tokens in shared.values())


@dataclass(frozen=True)
class TargetSpec:
    name: str
    base: str
    exact: bool
    replicas: int


_TARGET = re.compile(r"^(?P<base>[^@]+?)(?:@(?P<index>exact|approx))?(?:-x(?P<replicas>\d+))?$")


def parse_target(name: str) -> TargetSpec:
    match = _TARGET.match(name)
    if match is None:
        raise ValueError(f"bad target {name!r}")
    base = match.group("base")
    replicas = int(match.group("replicas") or 1)
    peer = base.startswith("sglang-") or base == "envoy-rr"
    if peer and (match.group("index") or replicas != 1):
        raise ValueError(f"{name}: @exact and -xN are for our server's strategies")
    return TargetSpec(name, base, match.group("index") == "exact", replicas)


def _server_counter(stack: LocalStack, family: str) -> list[float]:
    """The sum of one counter family on each replica's /metrics."""
    totals = []
    pattern = re.compile(rf"^{re.escape(family)}(?:\{{[^}}]*\}})? (\S+)$")
    for url in stack.metrics_urls:
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        totals.append(
            sum(float(m.group(1)) for line in text.splitlines() if (m := pattern.match(line)))
        )
    return totals


def _pod_stats(stack: LocalStack) -> list[dict[str, Any]]:
    stats = []
    for pod in stack.pods:
        with urllib.request.urlopen(f"{pod.url}/sim/stats", timeout=5) as response:
            stats.append(json.loads(response.read()))
    return stats


def run_target(
    scenario: Scenario,
    spec: TargetSpec,
    sessions: list[Session],
    sim: dict[str, Any],
    server_args: list[str],
    seed: int,
) -> dict[str, Any]:
    from tqdm import tqdm

    args = [*EXACT_ARGS] if spec.exact else []
    config = StackConfig(
        pods=PODS,
        models=(MODEL,),
        sim_defaults=sim,
        pod_params=scenario.pod_params,
        server_args=[*args, *server_args],
        replicas=spec.replicas,
        kv_events=spec.exact,
    )
    turns = sum(len(s.questions) for s in sessions)
    with LocalStack(config) as stack:
        if spec.exact:
            stack.wait_kv_events()
        sglang: Managed | None = None
        sglang_url = None
        if spec.base.startswith("sglang-"):
            sglang, sglang_url = start_sglang(stack, spec.base.removeprefix("sglang-"))
        try:
            target = make_target(spec.base, stack, sglang_url)
            target.name = spec.name
            queries0, hits0 = prefix_counters(stack)
            with tqdm(total=turns, desc=f"{spec.name:>32}", unit="req", mininterval=2.0) as bar:
                records, wall = asyncio.run(
                    run(target, sessions, MODEL, rate=scenario.rate, seed=seed, progress=bar.update)
                )
            queries1, hits1 = prefix_counters(stack)
            routed = _server_counter(stack, "extproc_requests_total")
            fallbacks = _server_counter(stack, "extproc_tokenizer_fallbacks_total")
            stats = _pod_stats(stack)
        finally:
            if sglang is not None:
                sglang.stop()
        result = summarize(
            spec.name,
            records,
            wall,
            queries1 - queries0,
            hits1 - hits0,
            [pod.name for pod in stack.pods],
        )
    fair = result["requests"] / PODS
    shares = result["pod_share"].values()
    result.update(
        {
            "min_share_over_fair": round(min(shares) / fair, 2) if fair else 0.0,
            "exact": spec.exact,
            "replicas": spec.replicas,
            "requests_per_replica": [int(r) for r in routed],
            "tokenizer_fallbacks": int(sum(fallbacks)),
            "preemptions": sum(s["preemptions"] for s in stats),
            "step_lag_seconds": round(max(s["step_lag_seconds"] for s in stats), 2),
        }
    )
    return result


def markdown(results: list[dict[str, Any]]) -> str:
    lines = [
        "| target | TTFT p50 | TTFT p90 | TTFT p99 | hit rate | max share / fair | req/s "
        "| latency p99 | errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        t = r["ttft_ms"]
        lines.append(
            f"| {r['target']} | {t['p50']} | {t['p90']} | {t['p99']} | "
            f"{r['prefix_hit_rate']:.1%} | {r['max_share_over_fair']} | {r['throughput_rps']} | "
            f"{r['latency_ms']['p99']} | {r['errors']} |"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scenario", required=True, choices=sorted(SCENARIOS))
    parser.add_argument(
        "--targets",
        required=True,
        help="comma-separated: <strategy>[@approx|@exact][-x2], sglang-<policy>, envoy-rr",
    )
    parser.add_argument("--rate", type=float, help="sessions per second (the scenario's)")
    parser.add_argument("--prompts", type=int, help="prompts per group (the scenario's)")
    parser.add_argument(
        "--server-arg", action="append", default=[], help="extra `extproc serve` argument"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="path stem for the .json and .png results")


def command(args: argparse.Namespace, command_line: str) -> None:
    from tools.bench.report import chart

    scenario = SCENARIOS[args.scenario]
    if args.rate is not None or args.prompts is not None:
        scenario = Scenario(
            scenario.about,
            scenario.groups,
            args.prompts or scenario.prompts,
            scenario.system_chars,
            scenario.pressure,
            args.rate or scenario.rate,
            scenario.question_chars,
            scenario.output_tokens,
            scenario.pod_params,
        )
    sessions = scenario.sessions(args.seed)
    blocks = prefix_blocks(sessions)
    sim = {**POD_SIM, "num_gpu_blocks": scenario.num_gpu_blocks(sessions)}
    specs = [parse_target(t.strip()) for t in args.targets.split(",") if t.strip()]
    results = []
    for spec in specs:
        results.append(run_target(scenario, spec, sessions, sim, args.server_arg, args.seed))
        print(markdown(results[-1:]).splitlines()[-1], flush=True)
    meta = {
        "benchmark": "prefix",
        "scenario": args.scenario,
        "about": scenario.about,
        "command": command_line,
        "title": f"{args.scenario}: {scenario.about}",
        "pods": PODS,
        "sim": sim,
        "pod_params": {str(k): v for k, v in scenario.pod_params.items()},
        "prefix_blocks": blocks,
        "cluster_blocks": PODS * sim["num_gpu_blocks"],
        "pressure": round(blocks / (PODS * sim["num_gpu_blocks"]), 3),
        "requests": len(sessions),
        "rate": scenario.rate,
    }
    print(markdown(results))
    if args.out:
        # Scenario names hold dots (pressure-0.7): append the suffixes rather than replace one.
        stem = Path(args.out)
        stem.parent.mkdir(parents=True, exist_ok=True)
        json_path, png_path = Path(f"{stem}.json"), Path(f"{stem}.png")
        json_path.write_text(json.dumps({**meta, "results": results}, indent=2) + "\n")
        chart(results, meta["title"], png_path)
        print(f"wrote {json_path} and {png_path}")
