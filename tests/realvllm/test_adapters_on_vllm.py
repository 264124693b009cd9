"""LoRA adapters on a real vLLM: an adapter unloaded on the pod stops receiving requests within
one refresh of its /v1/models (the documented 503, never vLLM's 404), and comes back once it is
loaded again."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

from tests.realvllm.conftest import Fleet

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
