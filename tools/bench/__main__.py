"""``python -m tools.bench <benchmark> [options]``: each writes JSON (and a chart where useful)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _write(result: dict[str, Any], out: str | None) -> None:
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")


def _run(args: argparse.Namespace, argv: list[str] | None) -> None:
    import yaml

    from extproc.devstack.stack import StackConfig
    from tools.bench import compare, workloads

    if args.workload == "shared-prefix":
        sessions = workloads.shared_prefix(
            args.groups,
            args.prompts,
            args.system_chars,
            args.question_chars,
            args.output_tokens,
            args.seed,
        )
    elif args.workload == "multi-turn":
        sessions = workloads.multi_turn(
            args.users,
            args.rounds,
            args.system_chars,
            args.question_chars,
            args.output_tokens,
            args.seed,
        )
    elif args.workload == "unique":
        sessions = workloads.unique(args.count, args.question_chars, args.output_tokens, args.seed)
    else:
        sessions = workloads.mixed(args.count, args.seed)
    sim = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.sim)}
    config = StackConfig(
        pods=args.pods, models=(compare.MODEL,), sim_defaults=sim, server_args=args.server_arg
    )
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    results = compare.compare(
        sessions, targets, config, rate=args.rate, concurrency=args.concurrency, seed=args.seed
    )
    command = "python -m tools.bench " + " ".join(argv or sys.argv[1:])
    meta = {
        "benchmark": "run",
        "workload": args.workload,
        "command": command,
        "title": f"{args.workload}: {args.pods} pods",
        "sim": sim,
    }
    compare.write(results, meta, Path(args.out) if args.out else None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench")
    commands = parser.add_subparsers(dest="benchmark", required=True)

    overhead = commands.add_parser(
        "overhead", help="added latency: Envoy straight to a pod vs Envoy + ext_proc"
    )
    overhead.add_argument("--pods", type=int, default=2)
    overhead.add_argument("--requests", type=int, default=2000, help="per variant")
    overhead.add_argument("--concurrency", type=int, default=1)
    overhead.add_argument("--blocks", type=int, default=10, help="alternating blocks")
    overhead.add_argument("--warmup", type=int, default=200)
    overhead.add_argument("--strategies", default="least-request")
    overhead.add_argument(
        "--sglang",
        default="round_robin",
        help="comma-separated SGLang router policies to compare ('' for none)",
    )
    overhead.add_argument(
        "--body-mode", default="BUFFERED", choices=["BUFFERED", "STREAMED", "FULL_DUPLEX_STREAMED"]
    )
    overhead.add_argument("--response-header-mode", default="SEND", choices=["SEND", "SKIP"])
    overhead.add_argument(
        "--epp",
        default="",
        help="comma-separated endpoint-picker shapes to measure alongside (ai-gateway, istio)",
    )
    overhead.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra `extproc serve` argument (repeatable)",
    )
    overhead.add_argument("--out", help="write the JSON result here")

    scraper = commands.add_parser("scraper", help="scraper CPU against many pods")
    scraper.add_argument("--pods", type=int, default=200)
    scraper.add_argument("--interval", type=float, default=0.1)
    scraper.add_argument("--seconds", type=float, default=20.0)
    scraper.add_argument(
        "--loop",
        default="uvloop",
        choices=["uvloop", "asyncio"],
        help="event loop (the server uses uvloop when installed)",
    )
    scraper.add_argument("--out", help="write the JSON result here")

    ratelimit = commands.add_parser(
        "ratelimit", help="added latency of the rate-limit check, users in memory vs Redis"
    )
    ratelimit.add_argument("--requests", type=int, default=1000, help="per variant")
    ratelimit.add_argument("--checks", type=int, default=5000, help="in-process, per store")
    ratelimit.add_argument("--blocks", type=int, default=10, help="alternating blocks")
    ratelimit.add_argument("--warmup", type=int, default=100)
    ratelimit.add_argument("--out", help="write the JSON result here")

    throughput = commands.add_parser(
        "throughput", help="routed requests/s one server process sustains (needs wrk)"
    )
    throughput.add_argument(
        "--response-phase", default="always", choices=["always", "when-needed", "never"]
    )
    throughput.add_argument("--connections", default="1,2,4,8,16")
    throughput.add_argument("--seconds", type=int, default=8)
    throughput.add_argument("--pods", type=int, default=8)
    throughput.add_argument("--out", help="write the JSON result here")

    memory = commands.add_parser("index-memory", help="prefix index memory at capacity")
    memory.add_argument("--blocks", type=int, default=1_000_000)
    memory.add_argument("--pods", type=int, default=64)
    memory.add_argument("--prompt-blocks", type=int, default=64)
    memory.add_argument("--shared", type=float, default=0.3)
    memory.add_argument(
        "--index",
        choices=("approx", "exact"),
        default="approx",
        help="the server's own index (approx) or the KV-event index (exact)",
    )
    memory.add_argument("--out", help="write the JSON result here")

    decision = commands.add_parser("decision", help="in-process routing decision cost")
    decision.add_argument("--pods", default="64", help="comma-separated pod counts")
    decision.add_argument("--chars", default="32000", help="comma-separated prompt lengths")
    decision.add_argument("--strategies", default="prefix-cache-and-load,prefix-cache")
    decision.add_argument("--requests", type=int, default=2000)
    decision.add_argument("--groups", type=int, default=16, help="distinct shared prefixes")
    decision.add_argument(
        "--against", metavar="REF", help="also measure this git revision, side by side"
    )
    decision.add_argument("--out", help="write the JSON result here")

    usage = commands.add_parser("usage", help="per-request cost of exact token usage")
    usage.add_argument("--requests", type=int, default=2000)
    usage.add_argument("--tokens", type=int, default=256, help="completion tokens per answer")
    usage.add_argument("--per-event", type=int, default=4, help="tokens per SSE event")
    usage.add_argument("--chunk-bytes", type=int, default=1024, help="response chunk size")
    usage.add_argument("--out", help="write the JSON result here")

    runner = commands.add_parser(
        "run", help="one workload against several targets on identical simulated pods"
    )
    runner.add_argument(
        "--workload", required=True, choices=["shared-prefix", "multi-turn", "unique", "mixed"]
    )
    runner.add_argument(
        "--targets",
        required=True,
        help="comma-separated: strategies, envoy-rr, sglang-<policy>, session-sticky",
    )
    runner.add_argument("--pods", type=int, default=4)
    runner.add_argument(
        "--sim",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="simulator parameter for every pod (repeatable)",
    )
    runner.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra `extproc serve` argument (repeatable)",
    )
    arrivals = runner.add_mutually_exclusive_group(required=True)
    arrivals.add_argument("--rate", type=float, help="Poisson session arrivals per second")
    arrivals.add_argument("--concurrency", type=int, help="closed-loop workers")
    runner.add_argument("--groups", type=int, default=8, help="shared-prefix: groups")
    runner.add_argument("--prompts", type=int, default=16, help="shared-prefix: prompts/group")
    runner.add_argument("--users", type=int, default=16, help="multi-turn: users")
    runner.add_argument("--rounds", type=int, default=6, help="multi-turn: rounds per user")
    runner.add_argument("--count", type=int, default=300, help="unique/mixed: requests")
    runner.add_argument("--system-chars", type=int, default=4000)
    runner.add_argument("--question-chars", type=int, default=200)
    runner.add_argument("--output-tokens", type=int, default=32)
    runner.add_argument("--seed", type=int, default=0)
    runner.add_argument("--out", help="path stem for the .json and .png results")

    from tools.bench import prefix, scaling, soak

    prefix.add_arguments(
        commands.add_parser(
            "prefix", help="prefix-aware routing under KV-cache pressure, approximate vs exact"
        )
    )
    soak.add_arguments(
        commands.add_parser("soak", help="the server's resident memory over a long run")
    )
    scaling.add_arguments(
        commands.add_parser(
            "scaling", help="replicas, TTFT and GPU time of autoscaling on each signal (simulated)"
        )
    )

    args = parser.parse_args(argv)
    if args.benchmark == "ratelimit":
        from tools.bench import ratelimit as ratelimit_bench

        result = ratelimit_bench.run(args.requests, args.checks, args.blocks, args.warmup)
        result["command"] = "python -m tools.bench " + " ".join(argv or sys.argv[1:])
        _write(result, args.out)
    if args.benchmark == "overhead":
        from tools.bench import overhead as bench

        layout = {
            "request_body_mode": args.body_mode,
            "response_header_mode": args.response_header_mode,
        }
        result = bench.run(
            args.pods,
            args.requests,
            args.concurrency,
            args.blocks,
            args.warmup,
            [s for s in args.strategies.split(",") if s],
            [p for p in args.sglang.split(",") if p],
            args.server_arg,
            layout,
            [s for s in args.epp.split(",") if s],
        )
        result["command"] = "python -m tools.bench " + " ".join(argv or sys.argv[1:])
        _write(result, args.out)
    elif args.benchmark == "throughput":
        from tools.bench import throughput as throughput_bench

        result = throughput_bench.run(
            args.response_phase,
            [int(c) for c in args.connections.split(",")],
            args.seconds,
            args.pods,
        )
        result["command"] = "python -m tools.bench " + " ".join(argv or sys.argv[1:])
        _write(result, args.out)
    elif args.benchmark == "index-memory":
        from tools.bench import index_memory

        result = index_memory.run(
            args.blocks, args.pods, args.prompt_blocks, args.shared, args.index
        )
        result["command"] = "python -m tools.bench " + " ".join(argv or sys.argv[1:])
        _write(result, args.out)
    elif args.benchmark == "decision":
        from tools.bench import decision as decision_bench

        shape = (
            [int(p) for p in args.pods.split(",")],
            [int(c) for c in args.chars.split(",")],
            [s for s in args.strategies.split(",") if s],
            args.requests,
            args.groups,
        )
        if args.against:
            result = decision_bench.against(args.against, *shape)
        else:
            result = decision_bench.run(*shape)
        result["command"] = "python -m tools.bench " + " ".join(argv or sys.argv[1:])
        _write(result, args.out)
    elif args.benchmark == "usage":
        from tools.bench import usage as usage_bench

        result = usage_bench.run(args.requests, args.tokens, args.per_event, args.chunk_bytes)
        result["command"] = "python -m tools.bench " + " ".join(argv or sys.argv[1:])
        _write(result, args.out)
    elif args.benchmark == "run":
        _run(args, argv)
    elif args.benchmark == "prefix":
        prefix.command(args, "python -m tools.bench " + " ".join(argv or sys.argv[1:]))
    elif args.benchmark == "soak":
        soak.command(args, "python -m tools.bench " + " ".join(argv or sys.argv[1:]))
    elif args.benchmark == "scaling":
        scaling.command(args, "python -m tools.bench " + " ".join(argv or sys.argv[1:]))
    elif args.benchmark == "scraper":
        from tools.bench import scraper as scraper_bench

        result = scraper_bench.run(args.pods, args.interval, args.seconds, args.loop)
        result["command"] = "python -m tools.bench " + " ".join(argv or sys.argv[1:])
        _write(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
