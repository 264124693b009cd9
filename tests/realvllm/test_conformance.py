"""The simulator against real vLLM: the same observations of both, and every difference listed.

Each observation is a structural fact a router or a client depends on (metric families and
their labels, the exposition format, response shapes, streaming, errors), never a value that
depends on the model (token ids, generated text, timings). Differences the simulator keeps on
purpose are in ACCEPTED with the reason; anything else fails the test with the full list.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.devstack.processes import free_port
from tests.realvllm.conftest import BLOCK, MODEL, Fleet

ACCEPTED: dict[str, str] = {}
"""Observation key -> why the simulator differs there on purpose."""

FAMILIES_WITH_ENGINE = (
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:prefix_cache_queries",
    "vllm:prefix_cache_hits",
    "vllm:prompt_tokens",
    "vllm:generation_tokens",
    "vllm:request_success",
    "vllm:time_to_first_token_seconds",
    "vllm:e2e_request_latency_seconds",
    "vllm:cache_config_info",
)


def fetch(
    url: str, body: object | None = None, raw: bytes | None = None
) -> tuple[int, dict[str, str], bytes]:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    if data is not None:
        request.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, lower(response.headers.items()), response.read()
    except urllib.error.HTTPError as err:
        return err.code, lower(err.headers.items()), err.read()


def lower(items: Any) -> dict[str, str]:
    return {key.lower(): value for key, value in items}


def metric_families(text: str) -> dict[str, dict[str, Any]]:
    """Family name (as on its # TYPE line) -> its type and the label names of its samples."""
    families: dict[str, dict[str, Any]] = {}
    current = ""
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            current = name
            families[name] = {"type": kind, "labels": set(), "samples": []}
        elif line and not line.startswith("#") and current:
            head = line.rsplit(" ", 1)[0]
            labels: dict[str, str] = {}
            if "{" in head:
                for part in _split_labels(head[head.index("{") + 1 : head.rindex("}")]):
                    key, _, value = part.partition("=")
                    labels[key] = value.strip('"')
            families[current]["labels"].update(labels)
            families[current]["samples"].append(labels)
    return families


def _split_labels(inner: str) -> list[str]:
    parts, depth, start = [], False, 0
    for i, char in enumerate(inner):
        if char == '"' and (i == 0 or inner[i - 1] != "\\"):
            depth = not depth
        elif char == "," and not depth:
            parts.append(inner[start:i])
            start = i + 1
    if inner[start:]:
        parts.append(inner[start:])
    return parts


def sse(raw: bytes) -> list[Any]:
    return [
        json.loads(block[6:])
        for block in raw.decode().split("\n\n")
        if block.startswith("data: ") and block != "data: [DONE]"
    ]


def observe(base: str, adapter: str | None) -> dict[str, Any]:
    """What a router or client sees of one server, as comparable values."""
    seen: dict[str, Any] = {}
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi there"}], "max_tokens": 4}
    completion = {"model": MODEL, "prompt": "hi there", "max_tokens": 4}
    # A request first, so request-driven series exist on both.
    fetch(f"{base}/v1/completions", completion)

    status, headers, body = fetch(f"{base}/metrics")
    seen["metrics.status"] = status
    seen["metrics.content_type"] = headers.get("content-type", "")
    families = metric_families(body.decode())
    vllm = {name: f for name, f in families.items() if name.startswith("vllm:")}
    for name in FAMILIES_WITH_ENGINE:
        match = [n for n in vllm if n == name or n == f"{name}_total"]
        seen[f"family {name}"] = sorted(match)
        for found in match:
            seen[f"labels {found}"] = sorted(vllm[found]["labels"] - {"le"})
    counters = sorted(n for n, f in vllm.items() if f["type"] == "counter")
    seen["counters named with _total"] = all(n.endswith("_total") for n in counters)
    seen["counters with _created"] = all(
        n.removesuffix("_total") + "_created" in families for n in counters
    )
    info = vllm.get("vllm:cache_config_info", {"samples": [{}]})["samples"][0]
    for key in (
        "block_size",
        "num_cpu_blocks",
        "prefix_caching_hash_algo",
        "enable_prefix_caching",
    ):
        seen[f"cache_config_info {key}"] = info.get(key)
    success = vllm.get("vllm:request_success_total", {"samples": []})["samples"]
    seen["finished_reason values"] = sorted({s.get("finished_reason") for s in success})
    seen["lora_requests_info present"] = "vllm:lora_requests_info" in vllm
    if "vllm:lora_requests_info" in vllm:
        seen["labels vllm:lora_requests_info"] = sorted(vllm["vllm:lora_requests_info"]["labels"])

    status, _, body = fetch(f"{base}/load")
    seen["load"] = (status, sorted(json.loads(body)))
    status, _, body = fetch(f"{base}/kv_event_sources")
    seen["kv_event_sources.status"] = status
    status, _, body = fetch(f"{base}/v1/models")
    models = json.loads(body)
    seen["models.object"] = models.get("object")
    seen["models.ids"] = sorted(m["id"] for m in models["data"])
    seen["models.parents"] = sorted(str(m.get("parent")) for m in models["data"])
    seen["models.keys"] = sorted(models["data"][0])

    status, _, body = fetch(f"{base}/tokenize", {"model": MODEL, "messages": chat["messages"]})
    answer = json.loads(body)
    seen["tokenize.keys"] = sorted(answer)
    seen["tokenize.count matches"] = answer.get("count") == len(answer.get("tokens", []))
    _, _, plain = fetch(f"{base}/tokenize", {"model": MODEL, "prompt": "hi there"})
    seen["tokenize chat adds the template"] = answer["count"] > json.loads(plain)["count"]

    for path, request in (("/v1/chat/completions", chat), ("/v1/completions", completion)):
        status, headers, body = fetch(base + path, request)
        document = json.loads(body)
        seen[f"{path} plain"] = (status, document.get("object"), sorted(document["usage"]))
        streamed = {**request, "stream": True, "max_tokens": 24}
        status, headers, body = fetch(base + path, streamed)
        events = sse(body)
        seen[f"{path} stream content-type"] = headers.get("content-type", "").split(";")[0]
        seen[f"{path} stream ends with DONE"] = body.endswith(b"data: [DONE]\n\n")
        seen[f"{path} stream role first"] = bool(
            events and events[0]["choices"] and "role" in events[0]["choices"][0].get("delta", {})
        )
        seen[f"{path} stream has usage"] = any(e.get("usage") for e in events)
        with_usage = {**streamed, "stream_options": {"include_usage": True}}
        _, _, body = fetch(base + path, with_usage)
        events = sse(body)
        seen[f"{path} stream usage last, no choices"] = bool(
            events and events[-1].get("usage") and events[-1]["choices"] == []
        )

    status, _, body = fetch(f"{base}/v1/responses", {"model": MODEL, "input": "hi"})
    seen["responses"] = (status, json.loads(body).get("object"))

    status, _, body = fetch(f"{base}/v1/completions", {**completion, "model": "no-such-model"})
    seen["unknown model"] = (status, sorted(json.loads(body)), json.loads(body)["error"]["type"])
    status, _, body = fetch(f"{base}/v1/completions", raw=b"{not json")
    seen["invalid json status"] = status
    if adapter is not None:
        status, _, _ = fetch(f"{base}/v1/completions", {**completion, "model": adapter})
        seen["adapter request"] = status
    return seen


def differences(real: dict[str, Any], sim: dict[str, Any]) -> list[str]:
    return [
        f"{key}: vLLM {real.get(key)!r}, simulator {sim.get(key)!r}"
        for key in sorted(set(real) | set(sim))
        if real.get(key) != sim.get(key) and key not in ACCEPTED
    ]


@pytest.fixture(scope="module")
def simulated(fleet: Fleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Simulated twins of the fleet's two pods, configured as they are."""
    folder: Path = tmp_path_factory.mktemp("sim")
    ports = {"plain": free_port(), "lora": free_port()}
    common = {"block_size": BLOCK, "kv_events": True, "max_model_len": 1024}
    config = {
        "defaults": {"max_num_seqs": 8},
        "pods": [
            {"name": "plain", "port": ports["plain"], "model": MODEL, **common},
            {
                "name": "lora",
                "port": ports["lora"],
                "model": MODEL,
                **common,
                "prefix_caching_hash_algo": "sha256_cbor",
                "enable_lora": True,
                "max_loras": 2,
                "lora_modules": {n: fleet.setup.lora_path(n) for n in ("lora-a", "lora-b")},
            },
        ],
    }
    (folder / "sim.yaml").write_text(yaml.safe_dump(config))
    process = subprocess.Popen(
        [sys.executable, "-m", "extproc.vllm_sim", "--config", str(folder / "sim.yaml")],
        stdout=subprocess.DEVNULL,
    )
    try:
        for port in ports.values():
            deadline = time.monotonic() + 30
            while fetch_ok(f"http://127.0.0.1:{port}/health") is False:
                assert time.monotonic() < deadline, "the simulator did not start"
                time.sleep(0.1)
        yield {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    finally:
        process.terminate()
        process.wait(10)


def fetch_ok(url: str) -> bool:
    try:
        return fetch(url)[0] == 200
    except OSError:
        return False


@pytest.mark.parametrize("pod", ["plain", "lora"])
def test_simulator_matches_vllm(fleet: Fleet, simulated: dict[str, str], pod: str) -> None:
    server = fleet.plain if pod == "plain" else fleet.lora
    adapter = "lora-a" if pod == "lora" else None
    real = observe(server.base_url, adapter)
    sim = observe(simulated[pod], adapter)
    found = differences(real, sim)
    assert not found, "the simulator differs from vLLM:\n  " + "\n  ".join(found)
