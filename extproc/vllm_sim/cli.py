"""``python -m extproc.vllm_sim``: serve a fleet of simulated vLLM pods until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any

from .config import (
    PodSpec,
    SimParams,
    homogeneous_specs,
    load_fleet_config,
    param_types,
    parse_lora_modules,
)
from .fleet import SimulatorFleet


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m extproc.vllm_sim",
        description="Simulated vLLM pods (OpenAI API, vLLM metrics, prefix cache, batching).",
    )
    fleet = parser.add_argument_group("fleet")
    fleet.add_argument("--config", help="YAML file: {defaults: {...}, pods: [{name, port, ...}]}")
    fleet.add_argument("--pods", type=int, default=1, help="number of pods (without --config)")
    fleet.add_argument(
        "--base-port",
        type=int,
        default=8000,
        help="first port; pod i listens on base-port+i (0 = any free port)",
    )
    fleet.add_argument("--model", help="served model name")
    fleet.add_argument("--name-prefix", default="sim", help="pods are named <prefix>-<i>")
    fleet.add_argument("--host", default="127.0.0.1", help="address to bind")
    fleet.add_argument(
        "--lora-modules",
        nargs="*",
        default=None,
        metavar="NAME=PATH",
        help="LoRA adapters loaded at start on every pod",
    )
    fleet.add_argument("--log-level", default="warning")
    params = parser.add_argument_group("per-pod parameters (defaults for every pod)")
    defaults = SimParams()
    for name, kind in param_types().items():
        flag = "--" + name.replace("_", "-")
        default = getattr(defaults, name)
        if kind is bool:
            params.add_argument(
                flag,
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=f"(default: {default})",
            )
        else:
            params.add_argument(
                flag, dest=name, type=kind, default=None, help=f"(default: {default})"
            )
    params.add_argument(
        "--per-token-delay",
        dest="decode_time_base",
        type=float,
        default=None,
        metavar="SECONDS",
        help="legacy alias of --decode-time-base",
    )
    return parser


def specs_from_args(args: argparse.Namespace) -> list[PodSpec]:
    overrides: dict[str, Any] = {
        name: getattr(args, name) for name in param_types() if getattr(args, name, None) is not None
    }
    loras = parse_lora_modules(args.lora_modules)
    if args.config:
        specs = load_fleet_config(
            args.config,
            overrides=overrides,
            default_model=args.model,
            base_port=args.base_port,
        )
        for spec in specs:
            spec.lora_modules = {**loras, **spec.lora_modules}
        return specs
    if not args.model:
        raise SystemExit("--model is required without --config")
    if args.pods < 1:
        raise SystemExit("--pods must be >= 1")
    return homogeneous_specs(
        args.pods,
        args.model,
        base_port=args.base_port,
        name_prefix=args.name_prefix,
        params=SimParams().replace(overrides),
        lora_modules=loras,
    )


async def serve(specs: Sequence[PodSpec], host: str = "127.0.0.1") -> None:
    """Run the fleet until SIGINT or SIGTERM, printing one line per pod once it listens."""
    fleet = SimulatorFleet(specs, host)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await fleet.start()
    try:
        for pod in fleet:
            print(f"pod {pod.name} serving {pod.model} on {pod.url}", flush=True)
        await stop.wait()
    finally:
        await fleet.stop()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        specs = specs_from_args(args)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(specs, args.host))
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
