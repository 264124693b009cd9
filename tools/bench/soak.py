"""``python -m tools.bench soak``: the server's resident memory over a long run.

Drives ``extproc serve`` (the local stack's, in front of simulated pods) straight over gRPC, as
Envoy would, with a mix that touches every growing structure: prefix routing on distinct and
shared prompts (the prefix index fills to its cap), many users under limits (the users store),
several strategies, request ids never repeated. Samples the server's VmRSS every ``--every``
requests. Each request is a whole ext_proc exchange: headers, body, response headers, a response
body with usage, end of stream.

``--in-process`` runs the server in this process instead (same settings, same pods) and adds to
each sample the live object count, the blocks Python's allocator holds, and the RSS after a full
collection and ``malloc_trim(0)``: memory that a trim gives back was free already, held by the
allocator, not by live objects.
``--tracemalloc`` (in process too) traces allocations from the start and reports the sites that
grew between the middle of the run and its end: a leak is a site that keeps growing with the
number of requests.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import json
import logging
import os
import random
import sys
import time
import tracemalloc
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


STRATEGIES = "prefix-cache-and-load,prefix-cache,least-request,random"
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


async def one(
    channel: Any, rng: random.Random, n: int, args: argparse.Namespace, shared: list[str]
) -> None:
    if rng.random() < 0.5:
        prompt = rng.choice(shared) + f" question {n}"
    else:
        prompt = f"unique {n} " + "".join(rng.choices("abcdefgh ", k=600))
    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": prompt}]})
    headers = {
        "x-request-id": f"soak-{n}",
        "routing-strategy": args.strategy_list[n % len(args.strategy_list)],
        "user": f"user-{rng.randrange(args.users)}",
    }
    await run_stream(channel, exchange(headers, body))


async def drive(port: int, pid: int, args: argparse.Namespace) -> dict[str, Any]:
    import grpc

    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        return await _drive(pid, args, channel)
    finally:
        await channel.close()


def sample(pid: int, done: int, started: float, in_process: bool) -> dict[str, Any]:
    taken: dict[str, Any] = {
        "requests": done,
        "rss_kib": rss_kib(pid),
        "seconds": round(time.monotonic() - started, 1),
    }
    if in_process:
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        taken["rss_trimmed_kib"] = rss_kib(pid)
        taken["objects"] = len(gc.get_objects())
        taken["python_blocks"] = sys.getallocatedblocks()
    return taken


async def _drive(pid: int, args: argparse.Namespace, channel: Any) -> dict[str, Any]:
    rng = random.Random(0)
    shared = ["".join(rng.choices("abcdefgh ", k=2000)) for _ in range(args.groups)]
    started = time.monotonic()
    samples = [sample(pid, 0, started, args.in_process)]
    middle: tracemalloc.Snapshot | None = None
    result: dict[str, Any] = {}
    done = 0
    while done < args.requests:
        batch = min(args.concurrency, args.requests - done)
        await asyncio.gather(*(one(channel, rng, done + i, args, shared) for i in range(batch)))
        done += batch
        if done % args.every < batch:
            samples.append(sample(pid, done, started, args.in_process))
            print(f"{done:>8} requests  RSS {samples[-1]['rss_kib'] / 1024:.1f} MiB", flush=True)
        if tracemalloc.is_tracing() and middle is None and done >= args.requests // 2:
            gc.collect()
            middle = tracemalloc.take_snapshot()
            result["middle"] = {"requests": done, **heap_state()}
    result["samples"] = samples
    if middle is not None:
        gc.collect()
        end = tracemalloc.take_snapshot()
        result["end"] = {"requests": done, **heap_state()}
        result["grew"] = [
            {
                "site": str(stat.traceback[0]),
                "size_diff_kib": round(stat.size_diff / 1024, 1),
                "count_diff": stat.count_diff,
            }
            for stat in end.compare_to(middle, "lineno")[: args.top]
        ]
    return result


def heap_state() -> dict[str, Any]:
    current, _ = tracemalloc.get_traced_memory()
    return {
        "traced_kib": round(current / 1024),
        "objects": len(gc.get_objects()),
        "gc_counts": list(gc.get_count()),
        "gc_collections": [generation["collections"] for generation in gc.get_stats()],
    }


async def in_process(stack: LocalStack, args: argparse.Namespace) -> dict[str, Any]:
    """The server of ``command`` started in this process (``--tracemalloc``: traced from its
    first allocation)."""
    from extproc import config, logs
    from extproc.app import Server
    from extproc.devstack.processes import free_port

    logs.setup("text", "info")
    (handler,) = logging.getLogger().handlers
    log_file = (stack.workdir / "logs" / "soak-in-process.log").open("w")
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(log_file)
    if args.tracemalloc:
        tracemalloc.start(args.frames)
    server = Server(
        config.load(
            {
                "config": str(stack.pods_file),
                "host": "127.0.0.1",
                "port": free_port(),
                "http_port": free_port(),
                "users_port": free_port(),
                **server_settings(args),
            },
            {},
        )
    )
    await server.start()
    try:
        return await drive(server.grpc_port, os.getpid(), args)
    finally:
        await server.stop(grace=0.5)
        tracemalloc.stop()
        log_file.close()


def server_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "unknown_user_policy": "default-limits",
        "default_rpm": 100_000_000,
        "default_tpm": 1_000_000_000,
        "prefix_index_capacity": args.index_capacity,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--every", type=int, default=10_000, help="sample RSS every N requests")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--users", type=int, default=2_000)
    parser.add_argument("--groups", type=int, default=200, help="shared prompts")
    parser.add_argument("--index-capacity", type=int, default=50_000, help="prefix index cap")
    parser.add_argument("--strategies", default=STRATEGIES, help="comma-separated, in turn")
    parser.add_argument("--in-process", action="store_true", help="server in this process")
    parser.add_argument(
        "--tracemalloc", action="store_true", help="server in this process, allocations traced"
    )
    parser.add_argument("--frames", type=int, default=1, help="tracemalloc frames kept")
    parser.add_argument("--top", type=int, default=25, help="allocation sites reported")
    parser.add_argument("--out", help="write the JSON result here")


def command(args: argparse.Namespace, command_line: str) -> None:
    args.strategy_list = args.strategies.split(",")
    args.in_process = args.in_process or args.tracemalloc
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in server_settings(args).items()]
    config = StackConfig(
        pods=4,
        models=("m",),
        sim_defaults={"decode_time_base": 0.002},
        server_args=flags,
    )
    with LocalStack(config) as stack:
        if args.in_process:
            run = asyncio.run(in_process(stack, args))
        else:
            run = asyncio.run(drive(stack.grpc_port, stack.servers[0].pid, args))
    samples = run.pop("samples")
    plateau = samples[len(samples) // 2]
    end = samples[-1]
    per_request = (
        (end["rss_kib"] - plateau["rss_kib"]) * 1024 / max(1, end["requests"] - plateau["requests"])
    )
    result = {
        "benchmark": "soak",
        "command": command_line,
        "requests": args.requests,
        "strategies": args.strategy_list,
        "start_mib": round(samples[0]["rss_kib"] / 1024, 1),
        "plateau_mib": round(plateau["rss_kib"] / 1024, 1),
        "end_mib": round(end["rss_kib"] / 1024, 1),
        "bytes_per_request_second_half": round(per_request, 2),
        **run,
        "samples": samples,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
