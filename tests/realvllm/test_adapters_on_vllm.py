"""LoRA adapters on a real vLLM: an adapter unloaded on the pod stops receiving requests within
one refresh of its /v1/models (the documented 503, never vLLM's 404), and comes back once it is
loaded again; an adapter's prompt is matched exactly from the pod's KV-cache events."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from typing import Any

import grpc

from extproc.debug.v1 import debug_pb2 as pb
from extproc.debug.v1.debug_pb2_grpc import RouterDebugStub
from tests.realvllm.conftest import BLOCK, Fleet

REFRESH = 5.0
"""``scraping.models_interval``'s default."""


def ask(fleet: Fleet, model: str) -> tuple[int, dict[str, Any], str]:
    """``(status, JSON body, pod)`` of one chat request through Envoy."""
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    request = urllib.request.Request(
        fleet.stack.gateway_url + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "routing-strategy": "least-request"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read()), response.headers["target-pod"]
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), ""


def test_an_unloaded_adapter_stops_receiving_within_one_refresh(fleet: Fleet) -> None:
    lora = fleet.lora
    status, _, pod = ask(fleet, "lora-b")
    assert (status, pod) == (200, "lora")

    lora.unload_lora("lora-b")
    try:
        unloaded_at = time.monotonic()
        while True:
            status, body, _ = ask(fleet, "lora-b")
            if status == 503:
                break
            # Until the next refresh the pod may still be picked, and answers its own 404.
            assert status in (200, 404), body
            assert time.monotonic() - unloaded_at < REFRESH + 2, "still routed to the pod"
            time.sleep(0.2)
        # From then on the gateway answers: vLLM sees no request for an adapter it lacks.
        assert body["error"]["code"] == "adapter_not_loaded", body
        assert time.monotonic() - unloaded_at < REFRESH + 2
        status, _, _ = ask(fleet, "lora-a")  # the other adapter is untouched
        assert status == 200
    finally:
        lora.load_lora("lora-b")

    loaded_at = time.monotonic()
    while ask(fleet, "lora-b")[0] != 200:
        assert time.monotonic() - loaded_at < REFRESH + 2, "not routed again after loading"
        time.sleep(0.2)


async def test_an_adapters_prompt_is_matched_exactly_from_vllms_events(fleet: Fleet) -> None:
    """vLLM names an adapter's blocks with the adapter and the path it loaded it from; the
    router, knowing the path from the pod's /v1/models, names the prompt's blocks alike."""
    prompt = "adapter prefix " + " ".join(f"word{i % 13}" for i in range(120)) + "\nAnd then?"
    body = {"model": "lora-a", "prompt": prompt, "max_tokens": 2, "temperature": 0}
    request = urllib.request.Request(
        fleet.stack.gateway_url + "/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "routing-strategy": "prefix-cache"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.headers["target-pod"] == "lora"
        response.read()

    async with grpc.aio.insecure_channel(fleet.stack.grpc_address) as channel:
        debug = RouterDebugStub(channel)
        explain = pb.ExplainRequest(model="lora-a", prompt=prompt, strategy="prefix-cache")
        deadline = asyncio.get_running_loop().time() + 10
        while True:
            answer = await debug.Explain(explain)
            (held,) = answer.candidates
            if held.prefix_precise and held.prefix_match_tokens >= BLOCK:
                break
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"no exact match for the adapter's prompt: {answer}")
            await asyncio.sleep(0.2)
        assert held.pod == "lora" and held.prefix_match_tokens % BLOCK == 0
        # The same tokens for the base model are other blocks on the pod.
        base = await debug.Explain(
            pb.ExplainRequest(model="tiny-llama", prompt=prompt, strategy="prefix-cache")
        )
        lora = {c.pod: c for c in base.candidates}["lora"]
        assert lora.prefix_precise and lora.prefix_match_tokens < held.prefix_match_tokens
