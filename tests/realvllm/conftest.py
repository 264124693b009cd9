"""The real-vLLM tier: two real vLLM servers (CPU build, a tiny model built locally) on
loopback, behind `extproc serve` and a real Envoy.

`bash tools/realvllm/setup.sh` installs vLLM into its own cached venv and builds the model
(`bash tools/test.sh` runs it first); without them every test here fails saying what is
missing. Run the tier alone with `bash tools/realvllm/setup.sh && .venv/bin/pytest
tests/realvllm`.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from extproc.devstack.stack import LocalStack, StackConfig
from tools.realvllm.server import VllmServer, VllmSetup, setup_problem, start_all

MODEL = "tiny-llama"
BLOCK = 32


@dataclass
class Fleet:
    setup: VllmSetup
    plain: VllmServer
    lora: VllmServer
    stack: LocalStack

    @property
    def servers(self) -> tuple[VllmServer, VllmServer]:
        return self.plain, self.lora


@pytest.fixture(scope="session")
def setup() -> VllmSetup:
    problem = setup_problem()
    if problem is not None:
        pytest.fail(f"{problem} (run bash tools/realvllm/setup.sh)", pytrace=False)
    from tools.realvllm.server import require_setup

    return require_setup()


@pytest.fixture(scope="session")
def fleet(setup: VllmSetup) -> Iterator[Fleet]:
    """Two pods of one model, both publishing KV-cache events: `plain`, and `lora` with both
    adapters loaded. Pod `lora` uses sha256_cbor; `plain` vLLM's default sha256."""
    common = {"block_size": BLOCK, "kv_events": True, "load_tracking": True, "dev_mode": True}
    plain = VllmServer(setup, **common)  # type: ignore[arg-type]
    lora = VllmServer(setup, hash_algo="sha256_cbor", lora=True, **common)  # type: ignore[arg-type]
    start_all([plain, lora])
    try:
        for name in ("lora-a", "lora-b"):
            lora.load_lora(name)
        pods = [
            {"name": "plain", "address": f"127.0.0.1:{plain.port}", "model": MODEL},
            {
                "name": "lora",
                "address": f"127.0.0.1:{lora.port}",
                "model": MODEL,
                "adapters": ["lora-a", "lora-b"],
            },
        ]
        for pod in pods:
            pod["kv_events"] = "auto"
        config = StackConfig(
            pods=0,
            models=(MODEL,),
            extra_pods=pods,
            server_args=(
                "--tokenizer",
                "remote",
                "--remote-tokenizer-timeout",
                "2s",
                "--unknown-user-policy",
                "default-limits",
                "--default-tpm",
                "1000000000",
            ),
        )
        with LocalStack(config) as stack:
            yield Fleet(setup, plain, lora, stack)
    finally:
        plain.stop()
        lora.stop()


def pod_counters(server: VllmServer) -> dict[str, float]:
    """The pod's own token and prefix-cache counters, from its /metrics."""
    with urllib.request.urlopen(f"{server.base_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    wanted = {
        "vllm:prompt_tokens_total": "prompt",
        "vllm:generation_tokens_total": "generation",
        "vllm:prefix_cache_queries_total": "queries",
        "vllm:prefix_cache_hits_total": "hits",
    }
    counters: dict[str, float] = {}
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in wanted:
            key = wanted[name]
            counters[key] = counters.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    missing = sorted(name for name, key in wanted.items() if key not in counters)
    assert not missing, f"vLLM's /metrics lacks {missing}: the checks here would pass vacuously"
    return counters


def total(fleet: Fleet) -> dict[str, float]:
    sums: dict[str, float] = {}
    for server in fleet.servers:
        for key, value in pod_counters(server).items():
            sums[key] = sums.get(key, 0.0) + value
    return sums


def dumps(document: object) -> bytes:
    return json.dumps(document).encode()
