"""The ``extproc`` command: ``serve`` (the server), ``dev`` (a whole local stack),
``envoy-config`` (an Envoy bootstrap for it) and ``httproutes``."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import sys
from collections.abc import Coroutine, Sequence
from typing import Any, Literal, get_args, get_origin

from extproc import config, logs
from extproc.config import ConfigError

log = logging.getLogger("extproc")


def _add_settings_flags(
    parser: argparse.ArgumentParser, only: tuple[str, ...] | None = None
) -> None:
    for knob in config.knobs():
        if not knob.on_cli or (only is not None and knob.flat not in only):
            continue
        envs = ", ".join(knob.envs)
        default = knob.field.default if knob.field.default is not dataclasses.MISSING else None
        help_text = f"{knob.help} (env {envs}; default {default!r})"
        kwargs: dict[str, Any] = {"dest": knob.flat, "default": None, "help": help_text}
        hint = knob.hint
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif get_origin(hint) is Literal:
            kwargs["choices"] = get_args(hint)
        else:
            kwargs["metavar"] = knob.flat.upper()
        parser.add_argument(knob.flag, **kwargs)
    if only is not None:
        return
    parser.add_argument(
        "--strategy-option",
        action="append",
        dest="strategy_option",
        metavar="NAME.OPTION=VALUE",
        help="set one option of a strategy instance, e.g. least-request.smoothing=2, or add an "
        "instance: sticky.algorithm=prefix-cache (repeatable)",
    )


def settings_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given on the command line, by flat name."""
    return {k.flat: getattr(args, k.flat, None) for k in config.knobs()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="extproc", description="LLM routing ext_proc server for Envoy."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the ext_proc server")
    _add_settings_flags(serve)

    dev = commands.add_parser(
        "dev", help="start simulated vLLM pods, the server and a real Envoy on loopback"
    )
    dev.add_argument("--pods", type=int, default=3, help="number of simulated pods")
    dev.add_argument("--models", default="llama-3-8b", help="comma-separated model names")
    dev.add_argument("--gateway-port", type=int, default=8888, help="Envoy's listener port")
    dev.add_argument("--base-pod-port", type=int, default=8001, help="first simulated pod port")
    dev.add_argument("--grpc-port", type=int, default=50052, help="the server's gRPC port")
    dev.add_argument("--http-port", type=int, default=8080, help="the server's metrics port")
    dev.add_argument("--users-port", type=int, default=8090, help="the server's users API port")
    dev.add_argument("--admin-port", type=int, default=9901, help="Envoy's admin port")
    dev.add_argument("--routing-strategy", default=None, help="server default strategy")
    dev.add_argument("--workdir", default=None, help="where generated configs go")
    dev.add_argument(
        "--mode",
        choices=("aibrix", "epp"),
        default="aibrix",
        help="aibrix: Envoy routes on target-pod (default); epp: the server is an InferencePool's "
        "endpoint picker behind Envoy configured as --epp-shape generates it",
    )
    dev.add_argument(
        "--epp-shape",
        choices=("ai-gateway", "istio"),
        default="ai-gateway",
        help="with --mode epp: Envoy AI Gateway's wiring (ORIGINAL_DST on the destination header, "
        "TLS to the picker) or Istio's (override_host on envoy.lb metadata, plaintext)",
    )

    envoy = commands.add_parser(
        "envoy-config", help="print a complete Envoy bootstrap (YAML) for a plain Envoy"
    )
    from extproc.envoy_config import command as envoy_command

    envoy_command.add_arguments(envoy)

    routes = commands.add_parser("httproutes", help="HTTPRoutes generated from model labels")
    routes_commands = routes.add_subparsers(dest="httproutes_command", required=True)
    render = routes_commands.add_parser(
        "render",
        help="print the HTTPRoutes (and ReferenceGrants) for the models in files or the cluster",
    )
    from extproc.kube import render_command

    render_command.add_arguments(render)
    _add_settings_flags(render, only=render_command.SETTINGS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "dev":
        from extproc.devstack import stack as devstack

        return devstack.run(args)
    if args.command == "envoy-config":
        from extproc.envoy_config import command as envoy_command

        return envoy_command.run(args, list(sys.argv[1:] if argv is None else argv)[1:])
    if args.command == "httproutes":
        from extproc.kube import render_command

        return render_command.run(args)
    return 2


def _serve(args: argparse.Namespace) -> int:
    try:
        settings = config.load(settings_flags(args), strategy_option_flags=args.strategy_option)
    except ConfigError as exc:
        print(f"extproc: {exc}", file=sys.stderr)
        return 2
    logs.setup(settings.logging.format, settings.logging.level)
    from extproc.app import Server
    from extproc.discovery.static import PodFileError

    try:
        server = Server(settings)
        run_loop(server.run_until_signalled(), settings.server.event_loop)
    except (ConfigError, PodFileError) as exc:
        print(f"extproc: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"extproc: {exc}", file=sys.stderr)
        return 1
    return 0


def run_loop(main: Coroutine[Any, Any, None], choice: str) -> None:
    """Run ``main`` on the configured event loop (uvloop when ``auto`` finds it)."""
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise ConfigError("event_loop", "uvloop is not installed") from None
        else:
            uvloop.run(main)
            return
    asyncio.run(main)


if __name__ == "__main__":
    sys.exit(main())
