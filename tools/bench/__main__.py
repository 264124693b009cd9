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
        "--body-mode", default="BUFFERED", choices=["BUFFERED", "STREAMED", "FULL_DUPLEX_STREAMED"]
    )
    overhead.add_argument("--response-header-mode", default="SEND", choices=["SEND", "SKIP"])
    overhead.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra `extproc serve` argument (repeatable)",
    )
    overhead.add_argument("--out", help="write the JSON result here")

    args = parser.parse_args(argv)
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
            args.server_arg,
            layout,
        )
        result["command"] = "python -m tools.bench " + " ".join(argv or sys.argv[1:])
        _write(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
