"""The ``extproc`` command: ``serve`` (the server) and ``dev`` (a whole local stack)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Coroutine, Sequence
from typing import Any, get_args, get_origin, get_type_hints

from extproc import config, logs
from extproc.config import ConfigError, Settings

log = logging.getLogger("extproc")


def _add_settings_flags(
    parser: argparse.ArgumentParser, only: tuple[str, ...] | None = None
) -> None:
    hints = get_type_hints(Settings)
    for f in config.fields():
        if not f.metadata.get("cli", True) or (only is not None and f.name not in only):
            continue
        envs = ", ".join(config.env_names(f))
        help_text = f"{f.metadata['help']} (env {envs}; default {f.default!r})"
        kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": help_text}
        hint = hints[f.name]
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif get_origin(hint) is not None and "Literal" in str(get_origin(hint)):
            kwargs["choices"] = get_args(hint)
        else:
            kwargs["metavar"] = f.name.upper()
        parser.add_argument(config.flag_name(f), **kwargs)
    if only is not None:
        return
    parser.add_argument(
        "--strategy-option",
        action="append",
        dest="strategy_option",
        metavar="STRATEGY.OPTION=VALUE",
        help="set one strategy option, e.g. least-request.smoothing=2 (repeatable)",
    )


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
        from tools import devstack

        return devstack.run(args)
    if args.command == "httproutes":
        from extproc.kube import render_command

        return render_command.run(args)
    return 2


def _serve(args: argparse.Namespace) -> int:
    flags = {f.name: getattr(args, f.name, None) for f in config.fields()}
    try:
        settings = config.load(flags, strategy_option_flags=args.strategy_option)
    except ConfigError as exc:
        print(f"extproc: {exc}", file=sys.stderr)
        return 2
    logs.setup(settings.log_format, settings.log_level)
    from extproc.app import Server
    from extproc.discovery.static import PodFileError

    try:
        server = Server(settings)
        run_loop(server.run_until_signalled(), settings.event_loop)
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
