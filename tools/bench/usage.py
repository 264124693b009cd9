"""What exact token usage costs per request inside the server: reading a stream that carries
its usage, against asking the pod for it and taking the event out again (the request rewritten,
every chunk passed through the stripper). Envoy's extra round trip per response chunk, which
both pay whenever usage is needed at all, is not counted here."""

from __future__ import annotations

import json
import statistics
import time
from typing import Any

from extproc.routing.openai_request import Endpoint, parse, with_usage_requested
from extproc.routing.usage import UsageReader, UsageStripper

USAGE = {"prompt_tokens": 900, "completion_tokens": 256, "total_tokens": 1156}


def _stream(tokens: int, per_event: int, with_usage: bool) -> bytes:
    def chunk(choices: list[Any], **extra: Any) -> bytes:
        body = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1}
        document = {**body, "model": "m", "choices": choices, **extra}
        return b"data: " + json.dumps(document, separators=(",", ":")).encode() + b"\n\n"

    parts = [
        chunk([{"index": 0, "delta": {"content": "tok " * per_event}}])
        for _ in range(tokens // per_event)
    ]
    if with_usage:
        parts.append(chunk([], usage=USAGE))
    return b"".join(parts) + b"data: [DONE]\n\n"


def _chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def run(requests: int, tokens: int, per_event: int, chunk_bytes: int) -> dict[str, Any]:
    body = json.dumps(
        {
            "model": "m",
            "stream": True,
            "messages": [{"role": "user", "content": "hello " * 400}],
        }
    ).encode()
    request = parse(Endpoint.CHAT, body)
    carried = _chunks(_stream(tokens, per_event, True), chunk_bytes)
    samples: dict[str, list[float]] = {"client-asked": [], "server-asked": []}
    for _ in range(requests):
        started = time.perf_counter()
        reader = UsageReader(streaming=True)
        for piece in carried:
            reader.feed(piece)
        assert not reader.result(100).estimated  # type: ignore[union-attr]
        samples["client-asked"].append(time.perf_counter() - started)

        started = time.perf_counter()
        rewritten = with_usage_requested(body, request)
        assert rewritten is not None
        reader = UsageReader(streaming=True)
        stripper = UsageStripper()
        for i, piece in enumerate(carried):
            reader.feed(piece)
            stripper.feed(piece, i == len(carried) - 1)
        assert stripper.found and not reader.result(100).estimated  # type: ignore[union-attr]
        samples["server-asked"].append(time.perf_counter() - started)
    results = {
        name: {
            "p50_us": round(1e6 * statistics.median(values), 1),
            "mean_us": round(1e6 * statistics.fmean(values), 1),
        }
        for name, values in samples.items()
    }
    return {
        "benchmark": "usage",
        "requests": requests,
        "completion_tokens": tokens,
        "tokens_per_event": per_event,
        "chunk_bytes": chunk_bytes,
        "response_chunks": len(carried),
        "results": results,
    }
