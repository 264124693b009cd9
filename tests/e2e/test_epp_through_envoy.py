"""The server as an InferencePool's endpoint picker (``--mode epp``) behind a real Envoy
configured as Envoy AI Gateway generates it (ORIGINAL_DST on ``x-gateway-destination-endpoint``,
TLS to the picker) and as Istio does (override_host on the ``envoy.lb`` metadata, retries down
the fallback list, plaintext): both bodies stream full-duplex through the server.

Simulated pods prove every strategy on chat and completions, streamed or not, lands on the pod
the server chose; fake pods that echo prove bodies from 10 bytes to 1 MiB and 1 MiB streamed
answers pass byte for byte, and what happens when the chosen pod refuses connections.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest

from extproc.devstack.stack import LocalStack, StackConfig
from extproc.envoy_config import epp
from strategies import registry
from tests.e2e.conftest import FakePods, dead_address, stream_bytes

PATHS = {
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "Say this is a test!"}]},
    "/v1/completions": {"prompt": "Say this is a test!"},
}


@pytest.fixture(scope="module", params=epp.SHAPES)
def simulated(request: pytest.FixtureRequest) -> Iterator[LocalStack]:
    config = StackConfig(
        pods=3,
        models=("m1",),
        mode="epp",
        epp_shape=request.param,
        sim_defaults={"decode_time_base": 0.002},
    )
    with LocalStack(config) as running:
        yield running


async def test_every_strategy_lands_on_the_pod_the_server_chose(simulated: LocalStack) -> None:
    served: Counter[str] = Counter()
    async with aiohttp.ClientSession() as session:
        for strategy in [*registry.names(), None]:
            headers = {"routing-strategy": strategy} if strategy else {}
            for path, fields in PATHS.items():
                for stream in (False, True):
                    body = {"model": "m1", "max_tokens": 8, "stream": stream, **fields}
                    async with session.post(
                        simulated.gateway_url + path, json=body, headers=headers
                    ) as response:
                        text = await response.text()
                        assert response.status == 200, (strategy, path, stream, text)
                        assert response.headers["target-pod"] == response.headers["x-pod-name"]
                        if stream:
                            assert text.rstrip().endswith("data: [DONE]")
                        else:
                            assert json.loads(text)["usage"]["completion_tokens"] == 8
                        served[response.headers["x-pod-name"]] += 1
    assert set(served) == {"sim-0", "sim-1", "sim-2"}


LIMIT = 2 * 1024 * 1024


async def echo_stack(shape: epp.Shape, fake_pods: FakePods, *extra: dict[str, Any]) -> LocalStack:
    stack = LocalStack(
        StackConfig(
            pods=0,
            models=("m1",),
            mode="epp",
            epp_shape=shape,
            max_body_bytes=LIMIT,
            extra_pods=[*fake_pods.pods("m1"), *extra],
        )
    )
    return await asyncio.to_thread(stack.start)


@pytest.fixture
async def fake_pods() -> AsyncIterator[FakePods]:
    pods = FakePods()
    try:
        yield await pods.start("up-0", "up-1")
    finally:
        await pods.stop()


async def chunked(payload: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(payload), 65536):
        yield payload[start : start + 65536]


def completion(size: int) -> bytes:
    """A completions request body of exactly ``size`` bytes."""
    empty = len(json.dumps({"model": "m1", "prompt": ""}))
    return json.dumps({"model": "m1", "prompt": "x" * (size - empty)}).encode()


SIZES = (30, 100, 61_999, 62_000, 62_001, 124_001, 1_000_000, 1024 * 1024)
"""Around the 62,000-byte chunks the server re-streams request bodies in, up to 1 MiB."""


@pytest.mark.parametrize("shape", epp.SHAPES)
async def test_bodies_and_streamed_answers_pass_byte_for_byte(
    shape: epp.Shape, fake_pods: FakePods
) -> None:
    stack = await echo_stack(shape, fake_pods)
    try:
        async with aiohttp.ClientSession() as session:
            for size in SIZES:
                body = completion(size)
                assert len(body) == size
                async with session.post(
                    stack.gateway_url + "/v1/completions",
                    data=body,
                    headers={"routing-strategy": "random", "content-type": "application/json"},
                ) as response:
                    assert response.status == 200, await response.text()
                    assert await response.read() == body
                    assert response.headers["target-pod"] == response.headers["x-pod-name"]

            # Ten bytes that are no JSON: the server's answer, through the full-duplex stream.
            async with session.post(stack.gateway_url + "/v1/completions", data=b'{"model":}') as r:
                assert r.status == 400
                assert r.headers["content-type"] == "application/json"
                assert (await r.json())["error"]["code"] == "invalid_json"

            # Over the limit: Envoy answers a declared length, the server a streamed body.
            for data in (completion(LIMIT + 1), chunked(completion(LIMIT + 100_000))):
                async with session.post(stack.gateway_url + "/v1/completions", data=data) as r:
                    assert r.status == 413
                    assert (await r.json())["error"]["code"] == "request_too_large"

            for path, fields in PATHS.items():
                size = 1024 * 1024
                request = {"model": "m1", "stream": True, "max_tokens": size, **fields}
                async with session.post(stack.gateway_url + path, json=request) as response:
                    assert response.status == 200, await response.text()
                    assert await response.read() == stream_bytes(size)
    finally:
        await asyncio.to_thread(stack.stop)


@pytest.mark.parametrize("shape", epp.SHAPES)
async def test_a_refusing_pod_first_in_the_list(shape: epp.Shape, fake_pods: FakePods) -> None:
    """A dead address in the pod file: Istio's shape retries on the next endpoint of the
    server's list and reports which one served; Envoy AI Gateway's ORIGINAL_DST cluster has
    one address and no retry, so those requests get Envoy's 503, as JSON."""
    dead = dead_address()
    stack = await echo_stack(shape, fake_pods, {"name": "dead", "address": dead, "model": "m1"})
    try:
        statuses: Counter[int] = Counter()
        async with aiohttp.ClientSession() as session:
            for _ in range(30):
                async with session.post(
                    stack.gateway_url + "/v1/chat/completions",
                    json={"model": "m1", **PATHS["/v1/chat/completions"]},
                    headers={"routing-strategy": "random"},
                ) as response:
                    statuses[response.status] += 1
                    if response.status == 200:
                        assert response.headers["target-pod"] == response.headers["x-pod-name"]
                    else:
                        assert response.headers["content-type"] == "application/json"
                        error = (await response.json())["error"]
                        assert (response.status, error["code"]) == (503, "upstream_unavailable")
    finally:
        await asyncio.to_thread(stack.stop)
    first_dead = [hit for hit in fake_pods.hits if hit[2].startswith(dead)]
    if shape == "istio":
        assert statuses == {200: 30}
        assert first_dead, "the dead pod was never chosen first"
        for name, _, destination in first_dead:
            assert fake_pods.addresses[name] == destination.split(",")[1]
    else:
        assert statuses[503] > 0 and statuses[200] > 0, statuses
        assert not first_dead
        assert all("," not in destination for _, _, destination in fake_pods.hits)
