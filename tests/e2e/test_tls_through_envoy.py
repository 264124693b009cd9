"""Envoy reaches the server over mTLS, configured as the README shows (the bootstrap's
``transport_socket``), and requests are routed as over plaintext."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from extproc.devstack.stack import LocalStack, StackConfig
from extproc.envoy_config import ExtprocTls
from tests.certs import Authority


@pytest.fixture
def mtls_stack(tmp_path: Path) -> Iterator[LocalStack]:
    ca = Authority(tmp_path / "pki")
    server = ca.issue("extproc")
    envoy = ca.issue("envoy", client=True)
    config = StackConfig(
        pods=2,
        models=("m1",),
        server_args=(
            "--tls-cert",
            str(server.cert),
            "--tls-key",
            str(server.key),
            "--tls-client-ca",
            str(ca.cert),
        ),
        layout={
            "extproc_tls": ExtprocTls(str(ca.cert), "localhost", str(envoy.cert), str(envoy.key))
        },
    )
    with LocalStack(config) as running:
        yield running


async def test_requests_are_routed_over_mutual_tls(mtls_stack: LocalStack) -> None:
    body = {"model": "m1", "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            async with session.post(
                mtls_stack.gateway_url + "/v1/chat/completions",
                json=body,
                headers={"routing-strategy": "least-request"},
            ) as response:
                assert response.status == 200, await response.text()
                assert response.headers["target-pod"] == response.headers["x-pod-name"]
