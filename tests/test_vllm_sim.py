"""Tests for the vLLM simulator (extproc/vllm_sim): API shapes, engine fidelity, metrics, KV events.

Timing checks compare two measurements with wide margins (never absolute latencies), so a
loaded 2-core machine does not make them flaky.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import orjson
import pytest
import zmq
import zmq.asyncio
from prometheus_client.parser import text_string_to_metric_families

from extproc.kvevents.block_hash import block_hashes
from extproc.vllm_sim import PodSpec, SimParams, SimulatorFleet, homogeneous_specs
from extproc.vllm_sim.config import load_fleet_config
from extproc.vllm_sim.kv_cache import KVCacheManager
from extproc.vllm_sim.sequence import Sequence
from extproc.vllm_sim.tokenizer import BOS_TOKEN_ID, Tokenizer, render_chat

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
MODEL = "sim/llama-test"

#: Quick steps so most tests finish in tens of milliseconds.
FAST = {"decode_time_base": 0.002, "decode_time_per_seq": 0.0001, "prefill_time_per_token": 1e-5}

StartFleet = Callable[..., Awaitable[SimulatorFleet]]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


@pytest.fixture
async def start_fleet() -> AsyncIterator[StartFleet]:
    fleets: list[SimulatorFleet] = []

    async def start(
        count: int = 1, lora_modules: dict[str, str] | None = None, **params: Any
    ) -> SimulatorFleet:
        base = SimParams().replace({**FAST, **params})
        fleet = SimulatorFleet(
            homogeneous_specs(count, MODEL, params=base, lora_modules=lora_modules)
        )
        await fleet.start()
        fleets.append(fleet)
        return fleet

    yield start
    for fleet in fleets:
        await fleet.stop()


# -- helpers -----------------------------------------------------------------------------------


async def post(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any]
) -> tuple[int, Any, Any]:
    async with session.post(url, json=body) as resp:
        raw = await resp.read()
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            data = raw.decode()
        return resp.status, resp.headers, data


async def get_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as resp:
        assert resp.status == 200
        return await resp.json()


async def stream(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any]
) -> tuple[Any, list[Any], list[float]]:
    """POST with stream=true; returns headers, the parsed ``data:`` payloads and arrival times."""
    events: list[Any] = []
    times: list[float] = []
    async with session.post(url, json={**body, "stream": True}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        buffer = b""
        async for piece in resp.content.iter_any():
            buffer += piece
            while b"\n\n" in buffer:
                frame, buffer = buffer.split(b"\n\n", 1)
                assert frame.startswith(b"data: "), frame
                payload = frame[len(b"data: ") :]
                events.append("[DONE]" if payload == b"[DONE]" else orjson.loads(payload))
                times.append(time.monotonic())
        assert buffer == b""
        return resp.headers, events, times


async def scrape(session: aiohttp.ClientSession, url: str) -> dict[str, list[Any]]:
    """Parse /metrics with prometheus_client; samples grouped by sample name."""
    async with session.get(f"{url}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    out: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def value(samples: dict[str, list[Any]], name: str) -> float:
    return float(samples[name][0].value)


def chat_body(text: str, max_tokens: int = 4, model: str = MODEL) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_port_pair() -> int:
    """A port P with P and P+1 both free now (the CLI's --base-port takes consecutive ports)."""
    for _ in range(100):
        port = free_port()
        with socket.socket() as first, socket.socket() as second:
            try:
                first.bind(("127.0.0.1", port))
                second.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two consecutive free ports")


def kv_source(body: Any) -> dict[str, Any]:
    """Data-parallel rank 0's publisher config in a ``/kv_event_sources`` answer."""
    assert set(body) == {"0"}
    source: dict[str, Any] = body["0"]
    assert set(source) == {
        "enable_kv_cache_events",
        "publisher",
        "endpoint",
        "replay_endpoint",
        "buffer_steps",
        "hwm",
        "max_queue_size",
        "topic",
    }
    assert source["enable_kv_cache_events"] is True and source["publisher"] == "zmq"
    return source


async def stats(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    result: dict[str, Any] = await get_json(session, f"{url}/sim/stats")
    return result


# -- unit level --------------------------------------------------------------------------------


def test_tokenizer_is_deterministic_and_chunks_bytes() -> None:
    tok = Tokenizer(chars_per_token=4, vocab_size=1000)
    assert tok.encode("abcdefgh") == tok.encode("abcdefgh")
    assert len(tok.encode("abcdefghi")) == 3
    assert tok.encode("abcdXXXX")[0] == tok.encode("abcdYYYY")[0]
    assert all(0 <= t < 1000 for t in tok.encode("héllo wörld " * 10))
    text = render_chat(
        [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url"}]},
        ]
    )
    assert text == "<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n"


def test_kv_cache_prefix_sharing_and_lru_order() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = Sequence(list(range(10)), 1)
    assert kv.allocate(a, kv.lookup(a))
    assert kv.num_used_blocks == 3 and kv.num_cached_blocks == 2
    b = Sequence([*range(8), 99, 98, 97], 1)  # shares two full blocks with a
    found = kv.lookup(b)
    assert found.num_cached_tokens == 8
    assert kv.allocate(b, found)
    assert kv.num_used_blocks == 4  # two shared + one new
    kv.free(a)
    kv.free(b)
    assert kv.num_used_blocks == 0 and kv.usage == 0.0
    assert kv.num_cached_blocks == 2  # still cached after finishing
    whole = Sequence(list(range(8)), 1)  # fully cached: the last block is recomputed
    assert kv.lookup(whole).num_cached_tokens == 4


# -- API shapes --------------------------------------------------------------------------------


async def test_chat_completion_non_streaming(start_fleet: StartFleet, http: Any) -> None:
    fleet = await start_fleet()
    pod = fleet[0]
    messages = [{"role": "user", "content": "Tell me about routing " * 5}]
    status, headers, data = await post(
        http,
        f"{pod.url}/v1/chat/completions",
        {"model": MODEL, "messages": messages, "max_tokens": 5},
    )
    assert status == 200, data
    assert headers["x-pod-name"] == "sim-0"
    assert data["object"] == "chat.completion"
    assert data["id"].startswith("chatcmpl-") and isinstance(data["created"], int)
    assert data["model"] == MODEL
    choice = data["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] == "length"
    assert len(choice["message"]["content"]) == 5 * 4
    _, _, tokenized = await post(
        http, f"{pod.url}/tokenize", {"model": MODEL, "messages": messages}
    )
    usage = data["usage"]
    assert usage["prompt_tokens"] == tokenized["count"]
    assert usage["completion_tokens"] == 5
    assert usage["total_tokens"] == usage["prompt_tokens"] + 5


async def test_completion_prompt_forms_and_defaults(start_fleet: StartFleet, http: Any) -> None:
    fleet = await start_fleet(default_max_tokens=7)
    url = f"{fleet[0].url}/v1/completions"
    for prompt, expected in [
        ("abcdefgh", 3),  # BOS + two pieces
        (["abcdefghijkl", "ignored"], 4),
        ([5, 6, 7, 8, 9], 5),
        ([[1, 2], [3, 4, 5]], 2),
    ]:
        status, headers, data = await post(http, url, {"model": MODEL, "prompt": prompt})
        assert status == 200, data
        assert data["object"] == "text_completion"
        assert data["usage"]["prompt_tokens"] == expected
        assert data["usage"]["completion_tokens"] == 7  # default_max_tokens
        assert headers["x-pod-name"] == "sim-0"
    status, _, data = await post(
        http,
        f"{fleet[0].url}/v1/chat/completions",
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "x"}],
            "max_completion_tokens": 3,
        },
    )
    assert status == 200 and data["usage"]["completion_tokens"] == 3
    status, _, data = await post(http, url, {"model": MODEL, "prompt": {"bad": 1}})
    assert status == 400 and data["error"]["type"] == "BadRequestError"


async def test_streaming_chat_chunks_and_usage(start_fleet: StartFleet, http: Any) -> None:
    fleet = await start_fleet()
    url = f"{fleet[0].url}/v1/chat/completions"
    headers, events, _ = await stream(http, url, chat_body("hello world", max_tokens=6))
    assert headers["x-pod-name"] == "sim-0"
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    tokens = chunks[1:]
    assert len(tokens) == 6  # one chunk per generated token
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert all("usage" not in c for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in tokens] == [None] * 5 + ["length"]
    # include_usage: one extra chunk with empty choices, just before [DONE].
    body = {**chat_body("hello world", max_tokens=6), "stream_options": {"include_usage": True}}
    _, events, _ = await stream(http, url, body)
    assert events[-1] == "[DONE]"
    final = events[-2]
    assert final["choices"] == []
    assert final["usage"]["completion_tokens"] == 6
    assert all("usage" not in c for c in events[:-2])


async def test_streaming_completion(start_fleet: StartFleet, http: Any) -> None:
    fleet = await start_fleet()
    url = f"{fleet[0].url}/v1/completions"
    body = {
        "model": MODEL,
        "prompt": "once upon a time",
        "max_tokens": 4,
        "stream_options": {"include_usage": True},
    }
    headers, events, _ = await stream(http, url, body)
    assert headers["x-pod-name"] == "sim-0"
    assert events[-1] == "[DONE]"
    assert [e["object"] for e in events[:-1]] == ["text_completion"] * 5
    assert all(len(e["choices"][0]["text"]) == 4 for e in events[:4])
    assert events[-2]["choices"] == [] and events[-2]["usage"]["prompt_tokens"] == 5


async def test_streaming_really_streams(start_fleet: StartFleet, http: Any) -> None:
    fleet = await start_fleet(decode_time_base=0.03)
    _, events, times = await stream(
        http, f"{fleet[0].url}/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 8}
    )
    assert len(events) == 9
    # 8 tokens 30 ms apart: the first and last chunk cannot arrive together.
    assert times[-2] - times[0] > 0.1


async def test_client_disconnect_aborts_request(start_fleet: StartFleet, http: Any) -> None:
    fleet = await start_fleet(decode_time_base=0.02)
    pod = fleet[0]
    async with http.post(
        f"{pod.url}/v1/completions",
        json={"model": MODEL, "prompt": "x", "max_tokens": 500, "stream": True},
    ) as resp:
        await resp.content.readuntil(b"\n\n")
    for _ in range(100):
        if (await stats(http, pod.url))["running"] == 0:
            break
        await asyncio.sleep(0.02)
    assert (await stats(http, pod.url))["running"] == 0


async def test_models_and_lora_adapters(start_fleet: StartFleet, http: Any) -> None:
    fleet = await start_fleet(lora_modules={"preloaded": "/adapters/pre"})
    url = fleet[0].url
    models = await get_json(http, f"{url}/v1/models")
    assert [m["id"] for m in models["data"]] == [MODEL, "preloaded"]
    status, _, _ = await post(
        http, f"{url}/v1/load_lora_adapter", {"lora_name": "sql", "lora_path": "/adapters/sql"}
    )
    assert status == 200
    status, _, data = await post(
        http, f"{url}/v1/load_lora_adapter", {"lora_name": "sql", "lora_path": "/adapters/sql"}
    )
    assert status == 400 and data["error"]["type"] == "InvalidUserInput"
    models = await get_json(http, f"{url}/v1/models")
    cards = {m["id"]: m for m in models["data"]}
    assert cards["sql"]["parent"] == MODEL and cards["sql"]["root"] == "/adapters/sql"
    assert cards[MODEL]["parent"] is None
    status, headers, data = await post(http, f"{url}/v1/chat/completions", chat_body("q", 2, "sql"))
    assert status == 200 and data["model"] == "sql"
    status, _, _ = await post(http, f"{url}/v1/unload_lora_adapter", {"lora_name": "sql"})
    assert status == 200
    status, _, _ = await post(http, f"{url}/v1/unload_lora_adapter", {"lora_name": "sql"})
    assert status == 404
    models = await get_json(http, f"{url}/v1/models")
    assert "sql" not in [m["id"] for m in models["data"]]
    status, headers, data = await post(http, f"{url}/v1/chat/completions", chat_body("q", 2, "sql"))
    assert status == 404
    assert headers["x-pod-name"] == "sim-0"
    assert set(data["error"]) == {"message", "type", "code", "param"}
    assert data["error"]["code"] == 404


async def test_tokenize_and_embeddings_and_limits(start_fleet: StartFleet, http: Any) -> None:
    fleet = await start_fleet(max_model_len=64)
    url = fleet[0].url
    status, _, data = await post(http, f"{url}/tokenize", {"model": MODEL, "prompt": "abcdefghij"})
    assert status == 200
    assert data["count"] == 4 and len(data["tokens"]) == 4 and data["max_model_len"] == 64
    assert data["tokens"][0] == BOS_TOKEN_ID and data["token_strs"] is None
    status, _, emb = await post(
        http, f"{url}/v1/embeddings", {"model": MODEL, "input": ["ab", "c"]}
    )
    assert status == 200
    assert len(emb["data"]) == 2 and len(emb["data"][0]["embedding"]) == 16
    assert emb["usage"]["prompt_tokens"] == 4  # BOS each
    status, headers, data = await post(
        http, f"{url}/v1/completions", {"model": MODEL, "prompt": "x" * 400, "max_tokens": 4}
    )
    assert status == 400 and "maximum context length" in data["error"]["message"]
    assert headers["x-pod-name"] == "sim-0"


# -- engine fidelity ---------------------------------------------------------------------------


async def test_metrics_queue_running_and_kv_under_load(start_fleet: StartFleet, http: Any) -> None:
    fleet = await start_fleet(max_num_seqs=2, decode_time_base=0.02)
    pod = fleet[0]
    idle = await scrape(http, pod.url)
    assert value(idle, "vllm:num_requests_running") == 0
    assert value(idle, "vllm:kv_cache_usage_perc") == 0
    tasks = [
        asyncio.create_task(
            post(
                http,
                f"{pod.url}/v1/completions",
                {"model": MODEL, "prompt": f"request {i} " * 20, "max_tokens": 12},
            )
        )
        for i in range(6)
    ]
    seen_running = seen_waiting = 0.0
    seen_kv = 0.0
    while not all(t.done() for t in tasks):
        now = await scrape(http, pod.url)
        seen_running = max(seen_running, value(now, "vllm:num_requests_running"))
        seen_waiting = max(seen_waiting, value(now, "vllm:num_requests_waiting"))
        seen_kv = max(seen_kv, value(now, "vllm:kv_cache_usage_perc"))
        assert value(now, "vllm:num_requests_running") <= 2  # max_num_seqs holds
        await asyncio.sleep(0.01)
    results = await asyncio.gather(*tasks)
    assert all(status == 200 for status, _, _ in results)
    assert seen_running == 2
    assert seen_waiting >= 1  # a queue formed beyond max_num_seqs
    assert 0 < seen_kv <= 1
    after = await scrape(http, pod.url)
    assert value(after, "vllm:num_requests_running") == 0
    assert value(after, "vllm:num_requests_waiting") == 0
    assert value(after, "vllm:kv_cache_usage_perc") == 0
    assert value(after, "vllm:generation_tokens_total") == 6 * 12
    success = {s.labels["finished_reason"]: s.value for s in after["vllm:request_success_total"]}
    assert success == {"stop": 0, "length": 6, "abort": 0, "error": 0, "repetition": 0}
    for hist in ("time_to_first_token", "e2e_request_latency", "request_queue_time"):
        assert value(after, f"vllm:{hist}_seconds_count") == 6
        buckets = after[f"vllm:{hist}_seconds_bucket"]
        assert buckets[-1].labels["le"] == "+Inf" and buckets[-1].value == 6
        assert value(after, f"vllm:{hist}_seconds_sum") > 0
    assert after["vllm:time_to_first_token_seconds_count"][0].labels["model_name"] == MODEL
    info = after["vllm:cache_config_info"][0].labels
    assert info["block_size"] == "16" and info["num_gpu_blocks"] == "2048"
    assert info["enable_prefix_caching"] == "True"
    assert "vllm:lora_requests_info" not in after  # only with LoRA enabled, as vLLM
    queued = after["vllm:request_queue_time_seconds_sum"][0].value
    assert queued > 0  # the later requests did wait


async def test_lora_requests_info_lists_adapters(start_fleet: StartFleet, http: Any) -> None:
    fleet = await start_fleet(
        lora_modules={"a": "/a", "b": "/b"}, max_loras=1, decode_time_base=0.02
    )
    url = fleet[0].url
    tasks = [
        asyncio.create_task(post(http, f"{url}/v1/chat/completions", chat_body("q", 10, name)))
        for name in ("a", "b")
    ]
    seen: set[tuple[str, str]] = set()
    while not all(t.done() for t in tasks):
        series = (await scrape(http, url)).get("vllm:lora_requests_info")
        if not series:  # no series before the first engine step, as in vLLM
            continue
        labels = max(series, key=lambda sample: sample.value).labels  # the newest
        assert labels["max_lora"] == "1"
        seen.add((labels["running_lora_adapters"], labels["waiting_lora_adapters"]))
        await asyncio.sleep(0.01)
    await asyncio.gather(*tasks)
    assert ("a", "b") in seen  # max_loras=1: b waits while a runs


async def test_prefix_cache_hits_and_ttft(start_fleet: StartFleet, http: Any) -> None:
    fleet = await start_fleet(prefill_time_per_token=1e-4, prompt_tokens_details=True)
    url = f"{fleet[0].url}/v1/completions"

    async def ttft(prompt: str) -> tuple[float, Any]:
        started = time.monotonic()
        _, events, times = await stream(
            http,
            url,
            {
                "model": MODEL,
                "prompt": prompt,
                "max_tokens": 2,
                "stream_options": {"include_usage": True},
            },
        )
        return times[0] - started, events[-2]["usage"]

    long_a = "A shared system prompt with plenty of context. " * 250  # ~3000 tokens
    long_b = "B" + long_a[1:]  # differs in the first block, so nothing is shared
    assert len(long_a) == len(long_b)
    before = await scrape(http, fleet[0].url)
    first, usage_first = await ttft(long_a)
    repeat, usage_repeat = await ttft(long_a)
    fresh, _ = await ttft(long_b)
    after = await scrape(http, fleet[0].url)
    hits = value(after, "vllm:prefix_cache_hits_total") - value(
        before, "vllm:prefix_cache_hits_total"
    )
    queries = value(after, "vllm:prefix_cache_queries_total")
    assert hits >= usage_first["prompt_tokens"] - 16  # the repeat hit all full blocks
    assert queries >= 3 * usage_first["prompt_tokens"]
    assert usage_first["prompt_tokens_details"]["cached_tokens"] == 0
    assert usage_repeat["prompt_tokens_details"]["cached_tokens"] == hits
    assert repeat < fresh / 2
    assert repeat < first / 2


async def test_decode_slows_with_batch_size(start_fleet: StartFleet, http: Any) -> None:
    fleet = await start_fleet(decode_time_base=0.002, decode_time_per_seq=0.002)
    url = f"{fleet[0].url}/v1/completions"

    async def tpot(index: int) -> float:
        _, _, times = await stream(
            http, url, {"model": MODEL, "prompt": f"prompt {index}", "max_tokens": 12}
        )
        return (times[-2] - times[0]) / 11

    alone = min([await tpot(0), await tpot(1)])
    batched = await asyncio.gather(*(tpot(i) for i in range(2, 22)))
    # Batch of 20: ~42 ms per step against ~4 ms alone.
    assert sum(batched) / len(batched) > 3 * alone


async def test_lru_eviction_when_cache_is_full(start_fleet: StartFleet, http: Any) -> None:
    fleet = await start_fleet(num_gpu_blocks=16)
    url = fleet[0].url
    prompts = {name: [1000 * k + i for i in range(70)] for k, name in enumerate("ABCD", 1)}

    async def hits_for(name: str) -> int:
        before = (await stats(http, url))["prefix_cache_hit_tokens"]
        status, _, _ = await post(
            http,
            f"{url}/v1/completions",
            {"model": MODEL, "prompt": prompts[name], "max_tokens": 1},
        )
        assert status == 200
        after = await stats(http, url)
        assert after["blocks_cached"] <= 16 and after["blocks_used"] == 0
        return int(after["prefix_cache_hit_tokens"] - before)

    # 70 tokens = 5 blocks each; A, B, C fill 15 of 16 blocks.
    assert [await hits_for(n) for n in "ABC"] == [0, 0, 0]
    assert await hits_for("D") == 0  # D evicts the least recently used blocks: A's tail
    assert await hits_for("A") == 16  # only A's first block survived
    assert await hits_for("C") == 64  # the most recent prompt is still fully cached


async def test_preemption_when_kv_runs_out(start_fleet: StartFleet, http: Any) -> None:
    fleet = await start_fleet(num_gpu_blocks=8)
    url = fleet[0].url
    body = {"model": MODEL, "max_tokens": 60}
    results = await asyncio.gather(
        post(http, f"{url}/v1/completions", {**body, "prompt": list(range(1, 41))}),
        post(http, f"{url}/v1/completions", {**body, "prompt": list(range(101, 141))}),
    )
    assert [r[2]["usage"]["completion_tokens"] for r in results] == [60, 60]
    after = await scrape(http, url)
    assert value(after, "vllm:num_preemptions_total") >= 1
    assert (await stats(http, url))["blocks_used"] == 0


# -- faults and switches -----------------------------------------------------------------------


async def test_metrics_delay(start_fleet: StartFleet, http: Any) -> None:
    fleet = await start_fleet(count=2, metrics_delay=0.4)
    cold, warm = fleet[0], fleet[1]
    async with http.get(f"{cold.url}/metrics") as resp:
        assert resp.status == 503
        assert resp.headers["x-pod-name"] == "sim-0"
    async with http.get(f"{cold.url}/health") as resp:
        assert resp.status == 200  # ready, but metrics not yet there
    warm.set_params(metrics_delay=0)
    assert "vllm:num_requests_running" in await scrape(http, warm.url)
    deadline = time.monotonic() + 10
    while True:
        async with http.get(f"{cold.url}/metrics") as resp:
            if resp.status == 200:
                break
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)


async def test_metrics_hang_and_error(start_fleet: StartFleet, http: Any) -> None:
    fleet = await start_fleet()
    url = fleet[0].url
    status, _, params = await post(http, f"{url}/sim/params", {"metrics_hang": True})
    assert status == 200 and params["metrics_hang"] is True
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(http.get(f"{url}/metrics"), 0.3)
    async with http.get(f"{url}/health") as resp:
        assert resp.status == 200  # only the exporter is wedged
    await post(http, f"{url}/sim/params", {"metrics_hang": False, "metrics_error": True})
    async with http.get(f"{url}/metrics") as resp:
        assert resp.status == 500
        assert resp.headers["x-pod-name"] == "sim-0"
    await post(http, f"{url}/sim/params", {"metrics_error": False})
    assert await scrape(http, url)


async def test_error_rate(start_fleet: StartFleet, http: Any) -> None:
    fleet = await start_fleet(error_rate=1.0)
    url = fleet[0].url
    status, headers, data = await post(http, f"{url}/v1/chat/completions", chat_body("x", 1))
    assert status == 500
    assert headers["x-pod-name"] == "sim-0"
    assert set(data["error"]) == {"message", "type", "code", "param"}
    fleet[0].set_params(error_rate=0.5)
    statuses = [
        (
            await post(
                http, f"{url}/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1}
            )
        )[0]
        for _ in range(40)
    ]
    assert 0 < statuses.count(500) < 40 and statuses.count(200) + statuses.count(500) == 40
    fleet[0].set_params(error_rate=0.0)
    status, _, _ = await post(http, f"{url}/v1/chat/completions", chat_body("x", 1))
    assert status == 200
    assert (await stats(http, url))["requests_errored"] >= 2


async def test_slow_factor(start_fleet: StartFleet, http: Any) -> None:
    fleet = await start_fleet(decode_time_base=0.003)
    url = fleet[0].url
    body = {"model": MODEL, "prompt": "x", "max_tokens": 20}

    async def e2e() -> float:
        started = time.monotonic()
        status, _, _ = await post(http, f"{url}/v1/completions", body)
        assert status == 200
        return time.monotonic() - started

    normal = min([await e2e(), await e2e()])
    fleet[0].set_params(slow_factor=5.0)
    slow = await e2e()
    assert slow > 2 * normal


async def test_old_metric_names_and_percent_units(start_fleet: StartFleet, http: Any) -> None:
    fleet = await start_fleet(num_gpu_blocks=10, decode_time_base=0.01, old_metric_names=True)
    url = fleet[0].url
    task = asyncio.create_task(
        post(
            http,
            f"{url}/v1/completions",
            {"model": MODEL, "prompt": list(range(1, 101)), "max_tokens": 40},
        )
    )
    while (await stats(http, url))["running"] == 0:
        await asyncio.sleep(0.005)
    fraction = await scrape(http, url)
    assert "vllm:kv_cache_usage_perc" not in fraction
    assert "vllm:gpu_prefix_cache_queries_total" in fraction
    assert 0.6 <= value(fraction, "vllm:gpu_cache_usage_perc") <= 1.0  # 7..10 of 10 blocks
    fleet[0].set_params(percent_units=True)
    percent = await scrape(http, url)
    assert 60 <= value(percent, "vllm:gpu_cache_usage_perc") <= 100
    fleet[0].set_params(old_metric_names=False)
    current = await scrape(http, url)
    assert "vllm:gpu_cache_usage_perc" not in current
    assert 60 <= value(current, "vllm:kv_cache_usage_perc") <= 100
    status, _, _ = await task
    assert status == 200


async def test_runtime_params_endpoint(start_fleet: StartFleet, http: Any) -> None:
    fleet = await start_fleet()
    pod = fleet[0]
    url = pod.url
    status, headers, params = await post(
        http, f"{url}/sim/params", {"max_num_seqs": 3, "per_token_delay": 0.001}
    )
    assert status == 200 and headers["x-pod-name"] == "sim-0"
    assert params["max_num_seqs"] == 3 and params["decode_time_base"] == 0.001
    assert (await get_json(http, f"{url}/sim/params"))["max_num_seqs"] == 3
    assert pod.params.max_num_seqs == 3
    for bad in ({"nope": 1}, {"num_gpu_blocks": 5}, {"error_rate": 2}, {"max_num_seqs": "x"}):
        status, _, data = await post(http, f"{url}/sim/params", bad)
        assert status == 400, bad
        assert data["error"]["type"] == "BadRequestError"
    assert fleet.set_params("sim-0", time_scale=2.0).time_scale == 2.0
    snapshot = await stats(http, url)
    assert {
        "running",
        "waiting",
        "blocks_used",
        "blocks_cached",
        "prefix_cache_hit_tokens",
        "prefix_cache_query_tokens",
        "requests_served",
    } <= set(snapshot)


# -- CLI and config ----------------------------------------------------------------------------


def _spawn(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [PYTHON, "-m", "extproc.vllm_sim", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _ready_lines(proc: subprocess.Popen[str], count: int) -> list[str]:
    assert proc.stdout is not None
    lines = [proc.stdout.readline().strip() for _ in range(count)]
    if not all(lines):
        proc.kill()
        raise AssertionError(f"simulator did not start: {proc.communicate()[1]}")
    return lines


async def test_cli_pods_and_signals(http: Any) -> None:
    port = free_port_pair()
    proc = _spawn(
        [
            "--pods",
            "2",
            "--base-port",
            str(port),
            "--model",
            "m1",
            "--name-prefix",
            "cli",
            "--max-num-seqs",
            "4",
        ]
    )
    try:
        lines = await asyncio.to_thread(_ready_lines, proc, 2)
        assert lines[0] == f"pod cli-0 serving m1 on http://127.0.0.1:{port}"
        assert lines[1] == f"pod cli-1 serving m1 on http://127.0.0.1:{port + 1}"
        params = await get_json(http, f"http://127.0.0.1:{port + 1}/sim/params")
        assert params["max_num_seqs"] == 4
        status, headers, _ = await post(
            http,
            f"http://127.0.0.1:{port + 1}/v1/completions",
            {"model": "m1", "prompt": "x", "max_tokens": 1},
        )
        assert status == 200 and headers["x-pod-name"] == "cli-1"
    finally:
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 10)
    assert code == 0


async def test_cli_yaml_config(tmp_path: Path, http: Any) -> None:
    port = free_port_pair()
    config = tmp_path / "sim.yaml"
    config.write_text(
        "defaults:\n"
        "  model: base-model\n"
        "  max_num_seqs: 8\n"
        "pods:\n"
        f"  - {{name: big, port: {port}, num_gpu_blocks: 4096}}\n"
        "  - name: small\n"
        f"    port: {port + 1}\n"
        "    model: other-model\n"
        "    lora_modules: {ad: /p}\n"
        "    metrics_error: true\n"
    )
    specs = load_fleet_config(config)
    assert [s.params.max_num_seqs for s in specs] == [8, 8]
    assert specs[0].params.num_gpu_blocks == 4096 and specs[1].params.metrics_error
    proc = _spawn(["--config", str(config)])
    try:
        lines = await asyncio.to_thread(_ready_lines, proc, 2)
        assert lines[1] == f"pod small serving other-model on http://127.0.0.1:{port + 1}"
        models = await get_json(http, f"http://127.0.0.1:{port + 1}/v1/models")
        assert [m["id"] for m in models["data"]] == ["other-model", "ad"]
        async with http.get(f"http://127.0.0.1:{port + 1}/metrics") as resp:
            assert resp.status == 500
    finally:
        proc.send_signal(signal.SIGINT)
        code = await asyncio.to_thread(proc.wait, 10)
    assert code == 0


def test_fleet_spec_helpers() -> None:
    specs = homogeneous_specs(3, "m", base_port=9000, name_prefix="x")
    assert [(s.name, s.port) for s in specs] == [("x-0", 9000), ("x-1", 9001), ("x-2", 9002)]
    specs[0].params.max_num_seqs = 1
    assert specs[1].params.max_num_seqs == 256  # each pod owns its params
    assert isinstance(PodSpec("p", "m").params, SimParams)


# -- SGLang router in front of the simulator ---------------------------------------------------


async def test_sglang_router_routes_to_simulated_pods(start_fleet: StartFleet, http: Any) -> None:
    pytest.importorskip(
        "sglang_router.sglang_router_rs", reason="sglang-router's native module cannot load here"
    )
    fleet = await start_fleet(count=2)
    port = free_port()
    router = subprocess.Popen(
        [
            PYTHON,
            "-m",
            "sglang_router.launch_router",
            "--worker-urls",
            *fleet.urls,
            "--policy",
            "cache_aware",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--prometheus-port",
            str(free_port()),
            "--log-level",
            "warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if router.poll() is not None:
                pytest.fail(f"sglang router exited: {router.communicate()[1][-2000:]}")
            try:
                status, headers, data = await post(
                    http, f"{base}/v1/chat/completions", chat_body("hello router", 3)
                )
                if status == 200:
                    break
            except aiohttp.ClientError:
                pass
            assert time.monotonic() < deadline, "router never routed a request"
            await asyncio.sleep(0.2)
        assert headers["x-pod-name"] in {"sim-0", "sim-1"}
        assert data["usage"]["completion_tokens"] == 3
        headers, events, _ = await stream(
            http, f"{base}/v1/chat/completions", chat_body("hello router", 3)
        )
        assert events[-1] == "[DONE]" and headers["x-pod-name"] in {"sim-0", "sim-1"}
        assert len(events) == 5  # role + 3 tokens + [DONE]
        status, headers, data = await post(
            http, f"{base}/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2}
        )
        assert status == 200 and data["object"] == "text_completion"
        _, events, _ = await stream(
            http, f"{base}/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2}
        )
        assert events[-1] == "[DONE]" and len(events) == 3
        served = [(await stats(http, url))["requests_served"] for url in fleet.urls]
        assert sum(served) >= 4
    finally:
        router.terminate()
        try:
            await asyncio.to_thread(router.wait, 10)
        except subprocess.TimeoutExpired:
            router.kill()
            await asyncio.to_thread(router.wait, 5)


# -- KV-cache events ---------------------------------------------------------------------------


class Subscriber:
    """A ZMQ SUB socket on a pod's publisher, decoding vLLM's three-frame messages."""

    def __init__(self, endpoint: str, topic: bytes = b"kv-events") -> None:
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SUBSCRIBE, topic)
        self.sock.connect(endpoint)
        self.topic = topic

    async def recv(self, timeout: float = 5.0) -> tuple[int, list[Any], float, int]:
        """(seq, events, ts, data_parallel_rank) of the next message."""
        frames = await asyncio.wait_for(self.sock.recv_multipart(), timeout)
        assert len(frames) == 3 and frames[0] == self.topic and len(frames[1]) == 8
        ts, events, rank = msgpack.unpackb(frames[2])
        return int.from_bytes(frames[1], "big"), events, ts, rank

    async def ready(self, session: aiohttp.ClientSession, url: str) -> int:
        """Wait until the subscription is live (PUB drops what a late subscriber misses):
        reset the idle pod's cache, then run a one-token request (the clear goes out with
        the next engine step, as in vLLM), until an ``AllBlocksCleared`` arrives; its
        sequence number."""
        body = {"model": MODEL, "prompt": [7], "max_tokens": 1}
        for _ in range(200):
            async with session.post(f"{url}/reset_prefix_cache") as resp:
                assert resp.status == 200 and await resp.json() == {"success": True}
            async with session.post(f"{url}/v1/completions", json=body) as resp:
                assert resp.status == 200
            try:
                seq, events, _, _ = await self.recv(0.05)
            except TimeoutError:
                continue
            assert events == [{"type": "AllBlocksCleared"}]
            while True:  # drain the other probes' clears
                try:
                    seq, events, _, _ = await self.recv(0.2)
                except TimeoutError:
                    return seq
        raise AssertionError("the subscription never became live")

    async def events_until(self, done: Callable[[list[Any]], bool]) -> list[tuple[int, Any]]:
        """(seq, event) pairs received until ``done(all events so far)``."""
        out: list[tuple[int, Any]] = []
        while not done([event for _, event in out]):
            seq, events, _, _ = await self.recv()
            out.extend((seq, event) for event in events)
        return out

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


@pytest.fixture
async def subscribers() -> AsyncIterator[Callable[[str], Subscriber]]:
    made: list[Subscriber] = []

    def make(endpoint: str) -> Subscriber:
        made.append(Subscriber(endpoint))
        return made[-1]

    yield make
    for sub in made:
        sub.close()


def stored(events: list[Any]) -> list[Any]:
    return [e for e in events if e["type"] == "BlockStored"]


async def test_kv_events_wire_format_and_hashes(
    start_fleet: StartFleet, http: Any, subscribers: Callable[[str], Subscriber]
) -> None:
    fleet = await start_fleet(kv_events=True)
    pod = fleet[0]
    source = kv_source(await get_json(http, f"{pod.url}/kv_event_sources"))
    # A port chosen at bind time is reported as bound (vLLM's tcp://*:0 resolution).
    assert pod.publisher is not None and source["endpoint"] == pod.publisher.endpoint
    assert source["topic"] == "kv-events" and source["replay_endpoint"] is None
    assert source["buffer_steps"] == 10000
    sub = subscribers(source["endpoint"])
    first = await sub.ready(http, pod.url)
    prompt = list(range(100, 140))  # 40 tokens: two full blocks of 16
    status, _, _ = await post(
        http, f"{pod.url}/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 10}
    )
    assert status == 200
    received = await sub.events_until(lambda ev: len(stored(ev)) >= 2)
    seqs = [seq for seq, _ in received]
    assert seqs[0] == first + 1 and seqs == sorted(seqs)
    prompt_event, decode_event = stored([event for _, event in received])[:2]
    hashes = block_hashes(prompt, 16)
    assert prompt_event == {
        "type": "BlockStored",
        "block_hashes": hashes,
        "parent_block_hash": None,
        "token_ids": prompt[:32],
        "block_size": 16,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": None,
        "extra_keys": [None, None],
        "group_idx": 0,
        "kv_cache_spec_kind": "full_attention",
    }
    # The third block fills with generated tokens (40 + 8): published too, chained.
    assert decode_event["parent_block_hash"] == hashes[-1]
    assert decode_event["token_ids"][:8] == prompt[32:]
    full = prompt + decode_event["token_ids"][8:]
    assert decode_event["block_hashes"] == block_hashes(full, 16)[2:]
    # A repeat hits the cache and stores nothing new for the prompt.
    await post(
        http, f"{pod.url}/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 1}
    )
    metrics = await scrape(http, pod.url)
    assert value(metrics, "vllm:prefix_cache_hits_total") == 32  # whole blocks only
    assert (await stats(http, pod.url))["kv_events_sent"] >= first + 3


async def test_kv_events_evictions_reset_and_lora(
    start_fleet: StartFleet, http: Any, subscribers: Callable[[str], Subscriber]
) -> None:
    fleet = await start_fleet(
        kv_events=True, num_gpu_blocks=6, lora_modules={"sql": "/adapters/sql"}
    )
    pod = fleet[0]
    assert pod.publisher is not None
    sub = subscribers(pod.publisher.endpoint)
    await sub.ready(http, pod.url)
    url = f"{pod.url}/v1/completions"
    a, b = list(range(1, 49)), list(range(1001, 1049))  # 3 blocks each, cache holds 6
    for prompt in (a, b):
        await post(http, url, {"model": MODEL, "prompt": prompt, "max_tokens": 1})
    events = await sub.events_until(lambda ev: len(stored(ev)) >= 2)
    assert [e["type"] for _, e in events] == ["BlockStored", "BlockStored"]
    # An adapter's blocks: LoRA extra keys on every block, id and name in the event; the
    # cache is full, so the least recently used blocks (a's) are evicted first, one by one.
    await post(http, url, {"model": "sql", "prompt": a[:32], "max_tokens": 1})
    received = [e for _, e in await sub.events_until(lambda ev: bool(stored(ev)))]
    removed = [e for e in received if e["type"] == "BlockRemoved"]
    a_hashes = block_hashes(a, 16)
    assert removed == [
        {"type": "BlockRemoved", "block_hashes": [a_hashes[2]], "medium": "GPU", "group_idx": 0},
        {"type": "BlockRemoved", "block_hashes": [a_hashes[1]], "medium": "GPU", "group_idx": 0},
    ]  # a's tail first: a request's blocks are freed last block first, as in vLLM
    (lora_event,) = stored(received)
    assert lora_event["lora_id"] == 1 and lora_event["lora_name"] == "sql"
    assert lora_event["extra_keys"] == [["sql"], ["sql"]]  # untagged, as vLLM publishes them
    assert lora_event["block_hashes"] == block_hashes(a[:32], 16, lora=("sql", "/adapters/sql"))
    assert lora_event["block_hashes"] != block_hashes(a[:32], 16)
    # A reset clears everything; the clear goes out with the next engine step's events.
    async with http.post(f"{pod.url}/reset_prefix_cache") as resp:
        assert await resp.json() == {"success": True}
    assert (await stats(http, pod.url))["blocks_cached"] == 0
    await post(http, url, {"model": MODEL, "prompt": b, "max_tokens": 1})
    _, events, _, _ = await sub.recv()
    assert [e["type"] for e in events] == ["AllBlocksCleared", "BlockStored"]
    assert events[1]["block_hashes"] == block_hashes(b, 16)


async def test_kv_events_hash_the_pods_own_chat_tokens(
    start_fleet: StartFleet, http: Any, subscribers: Callable[[str], Subscriber]
) -> None:
    fleet = await start_fleet(kv_events=True, block_size=8)
    pod = fleet[0]
    assert pod.publisher is not None
    sub = subscribers(pod.publisher.endpoint)
    await sub.ready(http, pod.url)
    messages = [{"role": "system", "content": "You route. " * 6}, {"role": "user", "content": "hi"}]
    _, _, tokens = await post(http, f"{pod.url}/tokenize", {"model": MODEL, "messages": messages})
    body = {"model": MODEL, "messages": messages, "max_tokens": 1}
    status, _, done = await post(http, f"{pod.url}/v1/chat/completions", body)
    assert status == 200 and done["usage"]["prompt_tokens"] == tokens["count"]
    (event,) = stored([e for _, e in await sub.events_until(lambda ev: bool(stored(ev)))])
    full = tokens["count"] // 8 * 8
    assert event["token_ids"] == tokens["tokens"][:full]  # BOS and template included
    assert event["block_hashes"] == block_hashes(tokens["tokens"], 8)
    # A cache_salt keys block 0 (and so the whole chain), shown untagged on block 0 only.
    body = {**body, "cache_salt": "tenant-a"}
    await post(http, f"{pod.url}/v1/chat/completions", body)
    (salted,) = stored([e for _, e in await sub.events_until(lambda ev: bool(stored(ev)))])
    assert salted["block_hashes"] == block_hashes(tokens["tokens"], 8, cache_salt="tenant-a")
    assert salted["extra_keys"] == [["tenant-a"]] + [None] * (full // 8 - 1)


async def test_kv_events_replay_and_restart(
    start_fleet: StartFleet, http: Any, subscribers: Callable[[str], Subscriber]
) -> None:
    fleet = await start_fleet(
        kv_events=True,
        kv_events_replay_port=0,
        kv_events_topic="cache",
        prefix_caching_hash_algo="sha256_cbor",
        hash_seed="42",
        block_size=32,
    )
    pod = fleet[0]
    publisher = pod.publisher
    assert publisher is not None and publisher.replay_endpoint is not None
    source = kv_source(await get_json(http, f"{pod.url}/kv_event_sources"))
    assert source["replay_endpoint"] == publisher.replay_endpoint
    assert source["topic"] == "cache"
    sub = Subscriber(publisher.endpoint, b"cache")
    try:
        await sub.ready(http, pod.url)
        prompt = list(range(500, 600))
        await post(
            http, f"{pod.url}/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 1}
        )
        received = await sub.events_until(lambda ev: bool(stored(ev)))
    finally:
        sub.close()
    (event,) = stored([e for _, e in received])
    assert event["block_size"] == 32
    assert event["block_hashes"] == block_hashes(prompt, 32, "sha256_cbor", seed="42")
    info = (await scrape(http, pod.url))["vllm:cache_config_info"][0].labels
    assert info["prefix_caching_hash_algo"] == "sha256_cbor" and info["block_size"] == "32"
    # Replay from sequence 1: every buffered message from there on, then the end marker.
    ctx = zmq.asyncio.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(publisher.replay_endpoint)
    try:
        await dealer.send_multipart([b"", (1).to_bytes(8, "big")])
        replayed: list[int] = []
        while True:
            frames = await asyncio.wait_for(dealer.recv_multipart(), 5)
            empty, topic, seq_bytes, payload = frames
            assert empty == b""
            seq = int.from_bytes(seq_bytes, "big", signed=True)
            if seq == -1:
                assert topic == payload == b""
                break
            assert topic == b"cache"
            replayed.append(seq)
            assert msgpack.unpackb(payload)[2] == 0
    finally:
        dealer.close(0)
        ctx.term()
    assert replayed == list(range(1, publisher.sent))
    # A restarted pod publishes from sequence 0 again, with an empty cache.
    await pod.stop()
    await pod.start()
    assert pod.publisher is not None and pod.publisher.sent == 0
    assert (await stats(http, pod.url))["blocks_cached"] == 0


# -- vLLM endpoints beyond inference ----------------------------------------------------------


async def test_load_and_request_ids(start_fleet: StartFleet, http: Any) -> None:
    fleet = await start_fleet(decode_time_base=0.01)
    url = fleet[0].url
    assert await get_json(http, f"{url}/load") == {"server_load": 0}
    body = {"model": MODEL, "prompt": "x", "max_tokens": 300, "stream": True}
    async with http.post(f"{url}/v1/completions", json=body) as held:
        await held.content.readuntil(b"\n\n")
        assert await get_json(http, f"{url}/load") == {"server_load": 1}
    await eventually_async(lambda: get_json(http, f"{url}/load"), {"server_load": 0})
    headers = {"x-request-id": "req-42"}
    async with http.post(
        f"{url}/v1/chat/completions", json=chat_body("hi", 2), headers=headers
    ) as resp:
        assert (await resp.json())["id"] == "chatcmpl-req-42"
    async with http.post(
        f"{url}/v1/completions",
        json={"model": MODEL, "prompt": "hi", "max_tokens": 2, "stream": True},
        headers=headers,
    ) as resp:
        text = await resp.text()
    chunks = [orjson.loads(line[6:]) for line in text.split("\n\n") if line[6:7] == "{"]
    assert {c["id"] for c in chunks} == {"cmpl-req-42"}
    version = await get_json(http, f"{url}/version")
    assert version["version"].startswith("0.32")


async def eventually_async(probe: Callable[[], Awaitable[Any]], expected: Any) -> None:
    for _ in range(200):
        if await probe() == expected:
            return
        await asyncio.sleep(0.02)
    assert await probe() == expected


async def test_tokenize_chat_template_and_detokenize(start_fleet: StartFleet, http: Any) -> None:
    fleet = await start_fleet()
    url = fleet[0].url
    messages = [{"role": "user", "content": "hello world!"}]  # 12 bytes: 3 tokens of text
    _, _, chat = await post(http, f"{url}/tokenize", {"model": MODEL, "messages": messages})
    assert chat["tokens"][0] == BOS_TOKEN_ID and chat["count"] == len(chat["tokens"])
    assert chat["count"] > 1 + 3  # the template's tokens count too
    _, _, bare = await post(
        http,
        f"{url}/tokenize",
        {"model": MODEL, "messages": messages, "add_generation_prompt": False},
    )
    # Without the generation prompt the text is a prefix (its last piece may be cut shorter).
    assert bare["tokens"][:-1] == chat["tokens"][: bare["count"] - 1]
    assert bare["count"] < chat["count"]
    status, _, done = await post(http, f"{url}/v1/chat/completions", chat_body("hello world!", 2))
    assert status == 200 and done["usage"]["prompt_tokens"] == chat["count"]
    _, _, plain = await post(
        http,
        f"{url}/tokenize",
        {"model": MODEL, "prompt": "route me, please", "return_token_strs": True},
    )
    assert plain["token_strs"] == ["<s>", "rout", "e me", ", pl", "ease"]
    _, _, back = await post(http, f"{url}/detokenize", {"model": MODEL, "tokens": plain["tokens"]})
    assert back == {"prompt": "<s>route me, please"}
    _, _, no_bos = await post(
        http,
        f"{url}/tokenize",
        {"model": MODEL, "prompt": "route me, please", "add_special_tokens": False},
    )
    assert no_bos["tokens"] == plain["tokens"][1:]


async def test_responses_api(start_fleet: StartFleet, http: Any) -> None:
    fleet = await start_fleet()
    url = fleet[0].url
    body = {"model": MODEL, "input": "Summarise routing.", "max_output_tokens": 5}
    status, headers, data = await post(http, f"{url}/v1/responses", body)
    assert status == 200 and headers["x-pod-name"] == "sim-0"
    assert data["object"] == "response" and data["id"].startswith("resp_")
    assert data["model"] == MODEL
    (message,) = data["output"]
    assert message["type"] == "message" and message["role"] == "assistant"
    assert len(message["content"][0]["text"]) == 5 * 4
    _, _, tokens = await post(
        http,
        f"{url}/tokenize",
        {"model": MODEL, "messages": [{"role": "user", "content": "Summarise routing."}]},
    )
    assert data["usage"]["input_tokens"] == tokens["count"]
    assert data["usage"]["output_tokens"] == 5
    assert data["usage"]["total_tokens"] == tokens["count"] + 5
    async with http.post(f"{url}/v1/responses", json={**body, "stream": True}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        raw = await resp.text()
    events = []
    for frame in raw.strip().split("\n\n"):
        kind_line, data_line = frame.split("\n")
        kind = kind_line.removeprefix("event: ")
        payload = orjson.loads(data_line.removeprefix("data: "))
        assert payload["type"] == kind
        events.append(payload)
    kinds = [e["type"] for e in events]
    deltas_count = kinds.count("response.output_text.delta")
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",  # with the first delta, as vLLM opens the item
        "response.content_part.added",
        *["response.output_text.delta"] * deltas_count,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert all(list(e) == sorted(e) for e in events)  # the OpenAI types' field order
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    final = events[-1]["response"]
    assert final["output"][0]["content"][0]["text"] == deltas and len(deltas) == 20
    assert final["usage"]["output_tokens"] == 5


async def test_stream_interval_merges_tokens(start_fleet: StartFleet, http: Any) -> None:
    fleet = await start_fleet(stream_interval=4)
    url = f"{fleet[0].url}/v1/completions"
    body = {
        "model": MODEL,
        "prompt": "x",
        "max_tokens": 10,
        "stream_options": {"include_usage": True},
    }
    _, events, _ = await stream(http, url, body)
    texts = [e["choices"][0]["text"] for e in events[:-2]]
    assert [len(t) // 4 for t in texts] == [1, 4, 4, 1]  # the first token goes out alone
    assert events[-2]["usage"]["completion_tokens"] == 10
    _, events, _ = await stream(http, url, {**body, "stream_options": None})
    assert all("usage" not in e for e in events[:-1]) and events[-1] == "[DONE]"


async def test_metrics_exposition_like_vllm(start_fleet: StartFleet, http: Any) -> None:
    fleet = await start_fleet(lora_modules={"sql": "/adapters/sql"}, max_loras=2)
    url = fleet[0].url
    status, _, _ = await post(http, f"{url}/v1/chat/completions", chat_body("q", 3, "sql"))
    assert status == 200
    async with http.get(f"{url}/metrics") as resp:
        assert resp.headers["Content-Type"] == "text/plain; version=1.0.0; charset=utf-8"
        text = await resp.text()
    types = dict(line.split()[2:4] for line in text.splitlines() if line.startswith("# TYPE "))
    counters = [name for name, kind in types.items() if kind == "counter"]
    histograms = [name for name, kind in types.items() if kind == "histogram"]
    assert counters and all(name.endswith("_total") for name in counters)
    for name in counters:
        assert types[name.removesuffix("_total") + "_created"] == "gauge"
    for name in histograms:
        assert types[name + "_created"] == "gauge"
    for family in (
        "num_requests_running",
        "num_requests_waiting",
        "num_requests_waiting_by_reason",
        "kv_cache_usage_perc",
        "prefix_cache_queries_total",
        "prefix_cache_hits_total",
        "prompt_tokens_total",
        "prompt_tokens_cached_total",
        "generation_tokens_total",
        "request_success_total",
        "time_to_first_token_seconds",
        "e2e_request_latency_seconds",
        "request_queue_time_seconds",
        "request_prefill_time_seconds",
        "request_decode_time_seconds",
        "inter_token_latency_seconds",
        "engine_sleep_state",
        "admission_rejections_total",
        "cache_config_info",
        "lora_requests_info",
    ):
        assert f"vllm:{family}" in types, family
    samples = [line for line in text.splitlines() if line.startswith("vllm:")]
    unlabelled = ("vllm:cache_config_info", "vllm:lora_requests_info", "vllm:admission_rej")
    for line in samples:
        if "{" not in line:
            assert line.startswith("vllm:admission_rejections_"), line  # no labels at all
            continue
        labels = line[line.index("{") + 1 : line.rindex("}")]
        names = [pair.split("=", 1)[0] for pair in labels.split('",')]
        assert names == sorted(names), line  # prometheus_client sorts labels
        if not line.startswith(unlabelled):
            assert 'engine="0"' in line and f'model_name="{MODEL}"' in line, line
    parsed = await scrape(http, url)
    assert value(parsed, "vllm:generation_tokens_total") == 3  # the adapter's, under the base
    info = parsed["vllm:cache_config_info"][0].labels
    assert len(info) == 37 and info["num_cpu_blocks"] == "None" and info["engine"] == "0"
    assert info["block_size"] == "16" and info["num_gpu_blocks"] == "2048"
    assert info["prefix_caching_hash_algo"] == "sha256" and "hash_block_size" in info
    created = value(parsed, "vllm:prompt_tokens_created")
    assert abs(created - time.time()) < 600
    lora = parsed["vllm:lora_requests_info"]
    combos = {(s.labels["running_lora_adapters"], s.labels["waiting_lora_adapters"]) for s in lora}
    assert ("sql", "") in combos and all(s.labels["max_lora"] == "2" for s in lora)
    assert all(abs(s.value - time.time()) < 600 for s in lora)  # valued with update times


async def test_error_bodies_as_vllm_words_them(start_fleet: StartFleet, http: Any) -> None:
    """The bodies a real vLLM 0.32 answered with, word for word."""
    fleet = await start_fleet(max_model_len=64, lora_modules={"sql": "/adapters/sql"})
    url = fleet[0].url
    chat, cmpl = f"{url}/v1/chat/completions", f"{url}/v1/completions"

    async def error(path: str, body: Any = None, raw: bytes | None = None) -> tuple[int, Any]:
        kwargs: dict[str, Any] = {"json": body} if raw is None else {"data": raw}
        headers = {"content-type": "application/json"}
        async with http.post(path, headers=headers, **kwargs) as resp:
            return resp.status, await resp.json()

    assert await error(cmpl, {"model": "nope", "prompt": "x"}) == (
        404,
        {
            "error": {
                "message": f"The model `nope` does not exist. Valid aliases: {MODEL}.",
                "type": "NotFoundError",
                "param": "model",
                "code": 404,
            }
        },
    )
    status, body = await error(chat, raw=b"{not json")
    assert status == 400 and body["error"] == {
        "message": "1 validation error:\n  {'type': 'json_invalid', 'loc': 'body.1', 'msg': "
        "'JSON decode error', 'input': '<dict of 0 items>', 'ctx': {'error': 'Expecting "
        "property name enclosed in double quotes'}}",
        "type": "Bad Request",
        "param": "body.1",
        "code": 400,
    }
    status, body = await error(chat, {"model": MODEL})
    assert status == 400 and body["error"] == {
        "message": "1 validation error:\n  {'type': 'missing', 'loc': 'body.messages', 'msg': "
        "'Field required', 'input': '<dict of 1 items>'}",
        "type": "Bad Request",
        "param": "body.messages",
        "code": 400,
    }
    status, body = await error(cmpl, {"model": MODEL})
    assert (status, body["error"]["param"], body["error"]["type"]) == (
        400,
        "prompt",
        "BadRequestError",
    )
    assert body["error"]["message"] == (
        "Either prompt or prompt_embeds must be provided and non-empty. (parameter=prompt)"
    )
    status, body = await error(cmpl, {"model": MODEL, "prompt": "x", "max_tokens": 65})
    assert status == 400 and body["error"]["message"] == (
        "max_tokens=65 cannot be greater than max_model_len=64. Please request fewer output "
        "tokens. (parameter=max_tokens, value=65)"
    )
    status, body = await error(cmpl, {"model": MODEL, "prompt": "x" * 400})
    assert status == 400 and body["error"]["param"] == "input_tokens"
    assert body["error"]["message"].startswith(
        "This model's maximum context length is 64 tokens. However, your prompt contains at "
        "least 65 input tokens"
    )
    # A prompt that fits gets the rest of the context, not an error (vLLM clamps).
    status, _, done = await post(
        http, cmpl, {"model": MODEL, "prompt": "y" * 200, "max_tokens": 60}
    )
    assert status == 200 and done["usage"]["total_tokens"] == 64
    status, body = await error(cmpl, {"model": MODEL, "prompt": "x", "stream_options": {}})
    assert status == 200  # empty stream options are no options
    status, body = await error(
        cmpl, {"model": MODEL, "prompt": "x", "stream_options": {"include_usage": True}}
    )
    assert status == 400 and body["error"]["message"] == (
        "Stream options can only be defined when `stream=True`. (parameter=stream_options)"
    )
    status, body = await error(f"{url}/tokenize", {"model": MODEL})
    assert status == 400 and body["error"]["param"] == "body.prompt"
    assert body["error"]["message"].startswith("2 validation errors:")
    # Adapters: unknown to the pod is a 404 naming the base model; unload twice, 404.
    assert (await error(chat, chat_body("q", 1, "ghost")))[0] == 404
    status, body = await error(f"{url}/v1/unload_lora_adapter", {"lora_name": "ghost"})
    assert (status, body["error"]) == (
        404,
        {
            "message": "The lora adapter 'ghost' cannot be found.",
            "type": "NotFoundError",
            "param": None,
            "code": 404,
        },
    )
    status, body = await error(
        f"{url}/v1/load_lora_adapter", {"lora_name": "sql", "lora_path": "/adapters/sql"}
    )
    assert (status, body["error"]["type"], body["error"]["param"]) == (
        400,
        "InvalidUserInput",
        None,
    )
    assert body["error"]["message"] == (
        "The lora adapter 'sql' has already been loaded. If you want to load the adapter in "
        "place, set 'load_inplace' to True."
    )
    async with http.get(f"{url}/no/such/path") as resp:
        assert resp.status == 404 and (await resp.json()) == {"detail": "Not Found"}


def test_kv_event_ports_move_up_per_pod(tmp_path: Path) -> None:
    params = SimParams(kv_events=True, kv_events_port=6000, kv_events_replay_port=7000)
    specs = homogeneous_specs(3, "m", params=params)
    assert [s.params.kv_events_port for s in specs] == [6000, 6001, 6002]
    assert [s.params.kv_events_replay_port for s in specs] == [7000, 7001, 7002]
    free = homogeneous_specs(2, "m", params=SimParams(kv_events=True))
    assert [s.params.kv_events_port for s in free] == [0, 0]  # 0: each binds a free port
    assert [s.params.kv_events_replay_port for s in free] == [-1, -1]
    config = tmp_path / "sim.yaml"
    config.write_text(
        "defaults: {model: m, kv_events: true, kv_events_port: 6000, hash_seed: 0}\n"
        "pods: [{name: a}, {name: b}, {name: c, kv_events_port: 6100}]\n"
    )
    loaded = load_fleet_config(config)
    assert [s.params.kv_events_port for s in loaded] == [6000, 6001, 6100]
    assert loaded[0].params.hash_seed == "0"
    with pytest.raises(ValueError, match="prefix_caching_hash_algo"):
        SimParams().replace({"prefix_caching_hash_algo": "md5"})
    with pytest.raises(ValueError, match="restart"):
        SimParams().replace({"kv_events": True}, runtime=True)


async def test_response_shapes_as_vllm(start_fleet: StartFleet, http: Any) -> None:
    """Every field a real vLLM 0.32 sends, in its order."""
    fleet = await start_fleet()
    url = fleet[0].url
    _, _, chat = await post(http, f"{url}/v1/chat/completions", chat_body("hello", 3))
    assert list(chat) == [
        "id",
        "object",
        "created",
        "model",
        "choices",
        "service_tier",
        "system_fingerprint",
        "usage",
        "prompt_logprobs",
        "prompt_token_ids",
        "prompt_text",
        "kv_transfer_params",
        "ec_transfer_params",
        "metrics",
    ]
    assert len(chat["id"]) == len("chatcmpl-") + 16
    assert chat["system_fingerprint"].startswith("vllm-0.32.0-")
    assert list(chat["choices"][0]["message"]) == [
        "role",
        "content",
        "refusal",
        "annotations",
        "audio",
        "function_call",
        "reasoning",
    ]
    assert chat["usage"]["completion_tokens_details"] is None
    _, _, cmpl = await post(
        http, f"{url}/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    )
    assert list(cmpl["choices"][0]) == [
        "index",
        "text",
        "logprobs",
        "finish_reason",
        "stop_reason",
        "token_ids",
        "prompt_logprobs",
        "prompt_token_ids",
        "routed_experts",
    ]
    body = {**chat_body("hello", 3), "stream_options": {"include_usage": True}}
    headers, events, _ = await stream(http, f"{url}/v1/chat/completions", body)
    assert headers["Content-Type"] == "text/event-stream; charset=utf-8"
    role, *tokens, final, done = events
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert role["prompt_token_ids"] is None and "prompt_text" in role
    assert [list(t["choices"][0]) for t in tokens[:-1]] == [
        ["index", "delta", "logprobs", "finish_reason", "token_ids"]
    ] * (len(tokens) - 1)
    assert list(tokens[-1]["choices"][0]) == [
        "index",
        "delta",
        "logprobs",
        "finish_reason",
        "stop_reason",
        "token_ids",
    ]
    assert final["choices"] == [] and list(final["usage"]) == [
        "prompt_tokens",
        "total_tokens",
        "completion_tokens",
    ]
    assert final["system_fingerprint"] == chat["system_fingerprint"] and done == "[DONE]"
    _, events, _ = await stream(
        http, f"{url}/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    )
    assert list(events[0]["choices"][0]) == [
        "index",
        "text",
        "logprobs",
        "finish_reason",
        "stop_reason",
        "prompt_token_ids",
        "token_ids",
    ]
