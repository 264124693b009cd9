"""``python -m tools.bench soak``: the server's resident memory over a long run.

Drives ``extproc serve`` (the local stack's, in front of simulated pods) straight over gRPC, as
Envoy would, with a mix that touches every growing structure: prefix routing on distinct and
shared prompts (the prefix index fills to its cap), many users under limits (the users store),
several strategies, request ids never repeated. Samples the server's VmRSS every ``--every``
requests. Each request is a whole ext_proc exchange: headers, body, response headers, a response
body with usage, end of stream.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from pathlib import Path
from typing import Any

import orjson

from extproc.devstack.stack import LocalStack, StackConfig


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


STRATEGIES = ("prefix-cache-and-load", "prefix-cache", "least-request", "random")
USAGE = b'{"usage": {"prompt_tokens": 40, "completion_tokens": 8, "total_tokens": 48}}'


def exchange(headers: dict[str, str], body: bytes) -> list[Any]:
    """The messages Envoy sends for one buffered request and its answer."""
    from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue
    from envoy.service.ext_proc.v3.external_processor_pb2 import (
        HttpBody,
        HttpHeaders,
        ProcessingRequest,
    )

    request = [(":path", "/v1/chat/completions"), (":method", "POST"), *headers.items()]
    return [
        ProcessingRequest(
            request_headers=HttpHeaders(
                headers=HeaderMap(
                    headers=[HeaderValue(key=k, raw_value=v.encode()) for k, v in request]
                )
            )
        ),
        ProcessingRequest(request_body=HttpBody(body=body, end_of_stream=True)),
        ProcessingRequest(
            response_headers=HttpHeaders(
                headers=HeaderMap(headers=[HeaderValue(key=":status", raw_value=b"200")])
            )
        ),
        ProcessingRequest(response_body=HttpBody(body=USAGE, end_of_stream=True)),
    ]


async def run_stream(channel: Any, messages: list[Any]) -> None:
    from envoy.service.ext_proc.v3.external_processor_pb2_grpc import ExternalProcessorStub

    async def send() -> Any:
        for message in messages:
            yield message

    async for _ in ExternalProcessorStub(channel).Process(send()):
        pass


async def one(channel: Any, rng: random.Random, n: int, users: int, shared: list[str]) -> None:
    if rng.random() < 0.5:
        prompt = rng.choice(shared) + f" question {n}"
    else:
        prompt = f"unique {n} " + "".join(rng.choices("abcdefgh ", k=600))
    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": prompt}]})
    headers = {
        "x-request-id": f"soak-{n}",
        "routing-strategy": STRATEGIES[n % len(STRATEGIES)],
        "user": f"user-{rng.randrange(users)}",
    }
    await run_stream(channel, exchange(headers, body))


async def drive(stack: LocalStack, args: argparse.Namespace) -> list[dict[str, Any]]:
    import grpc

    channel = grpc.aio.insecure_channel(f"127.0.0.1:{stack.grpc_port}")
    try:
        return await _drive(stack, args, channel)
    finally:
        await channel.close()


async def _drive(stack: LocalStack, args: argparse.Namespace, channel: Any) -> list[dict[str, Any]]:
    rng = random.Random(0)
    shared = ["".join(rng.choices("abcdefgh ", k=2000)) for _ in range(args.groups)]
    pid = stack.servers[0].pid
    samples = [{"requests": 0, "rss_kib": rss_kib(pid), "seconds": 0.0}]
    started = time.monotonic()
    done = 0
    while done < args.requests:
        batch = min(args.concurrency, args.requests - done)
        await asyncio.gather(
            *(one(channel, rng, done + i, args.users, shared) for i in range(batch))
        )
        done += batch
        if done % args.every < batch:
            samples.append(
                {
                    "requests": done,
                    "rss_kib": rss_kib(pid),
                    "seconds": round(time.monotonic() - started, 1),
                }
            )
            print(f"{done:>8} requests  RSS {samples[-1]['rss_kib'] / 1024:.1f} MiB", flush=True)
    return samples


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--every", type=int, default=10_000, help="sample RSS every N requests")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--users", type=int, default=2_000)
    parser.add_argument("--groups", type=int, default=200, help="shared prompts")
    parser.add_argument("--index-capacity", type=int, default=50_000, help="prefix index cap")
    parser.add_argument("--out", help="write the JSON result here")


def command(args: argparse.Namespace, command_line: str) -> None:
    config = StackConfig(
        pods=4,
        models=("m",),
        sim_defaults={"decode_time_base": 0.002},
        server_args=[
            "--unknown-user-policy",
            "default-limits",
            "--default-rpm",
            "100000000",
            "--default-tpm",
            "1000000000",
            "--prefix-index-capacity",
            str(args.index_capacity),
        ],
    )
    with LocalStack(config) as stack:
        samples = asyncio.run(drive(stack, args))
    plateau = samples[len(samples) // 2]
    end = samples[-1]
    per_request = (
        (end["rss_kib"] - plateau["rss_kib"]) * 1024 / max(1, end["requests"] - plateau["requests"])
    )
    result = {
        "benchmark": "soak",
        "command": command_line,
        "requests": args.requests,
        "samples": samples,
        "start_mib": round(samples[0]["rss_kib"] / 1024, 1),
        "plateau_mib": round(plateau["rss_kib"] / 1024, 1),
        "end_mib": round(end["rss_kib"] / 1024, 1),
        "bytes_per_request_second_half": round(per_request, 2),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
