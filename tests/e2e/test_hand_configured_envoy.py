"""A new user's setup: an Envoy written by hand from the README (ext_proc on 127.0.0.1, an
ORIGINAL_DST cluster on ``target-pod``, response body NONE), ``extproc serve --config pods.yaml``
and upstreams that are not the simulator (plain HTTP servers without /metrics)."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import yaml
from aiohttp import web

from extproc.devstack.processes import Managed, bin_path, free_port

ENVOY = """
static_resources:
  listeners:
  - name: gateway
    address: {{socket_address: {{address: 127.0.0.1, port_value: {gateway}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: gateway
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: "/", headers: [{{name: target-pod, present_match: true}}]}}
                route: {{cluster: original_destination_cluster, timeout: 120s}}
          http_filters:
          - name: envoy.filters.http.ext_proc
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor
              grpc_service: {{envoy_grpc: {{cluster_name: extproc}}}}
              allow_mode_override: true
              message_timeout: 5s
              processing_mode:
                request_header_mode: SEND
                request_body_mode: BUFFERED
                response_header_mode: SEND
                response_body_mode: NONE
                request_trailer_mode: SKIP
                response_trailer_mode: SKIP
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: original_destination_cluster
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 2s
    original_dst_lb_config: {{use_http_header: true, http_header_name: target-pod}}
  - name: extproc
    type: STATIC
    connect_timeout: 2s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: extproc
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {grpc}}}}}}}
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}
"""


async def plain_upstream(name: str) -> tuple[web.AppRunner, int]:
    """An OpenAI-ish server that is not the simulator: no /metrics, no x-pod-name."""

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response(
            {
                "served_by": name,
                "model": body["model"],
                "choices": [{"message": {"role": "assistant", "content": "ok"}}],
            }
        )

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


@pytest.fixture
async def by_hand(tmp_path: Path) -> AsyncIterator[str]:
    upstreams = [await plain_upstream(f"up-{i}") for i in range(2)]
    (tmp_path / "pods.yaml").write_text(
        yaml.safe_dump(
            {
                "pods": [
                    {"name": f"up-{i}", "address": f"127.0.0.1:{port}", "model": "my-model"}
                    for i, (_, port) in enumerate(upstreams)
                ]
            }
        )
    )
    gateway, grpc, http, admin = free_port(), free_port(), free_port(), free_port()
    (tmp_path / "envoy.yaml").write_text(ENVOY.format(gateway=gateway, grpc=grpc, admin=admin))
    server = Managed(
        "extproc",
        [
            bin_path("extproc"),
            "serve",
            "--config",
            str(tmp_path / "pods.yaml"),
            "--port",
            str(grpc),
            "--http-port",
            str(http),
            "--users-port",
            str(free_port()),
        ],
        tmp_path / "extproc.log",
    ).start()
    envoy = Managed(
        "envoy",
        [
            bin_path("envoy"),
            "-c",
            str(tmp_path / "envoy.yaml"),
            "--disable-hot-restart",
            "-l",
            "warning",
        ],
        tmp_path / "envoy.log",
    ).start()
    try:
        await asyncio.to_thread(server.wait_http, f"http://127.0.0.1:{http}/readyz")
        await asyncio.to_thread(envoy.wait_http, f"http://127.0.0.1:{admin}/ready")
        yield f"http://127.0.0.1:{gateway}"
    finally:
        envoy.stop()
        server.stop()
        for runner, _ in upstreams:
            await runner.cleanup()


async def test_a_hand_written_envoy_routes_to_pods_that_are_not_the_simulator(by_hand: str) -> None:
    body = {"model": "my-model", "messages": [{"role": "user", "content": "Say this is a test!"}]}
    served: Counter[str] = Counter()
    async with aiohttp.ClientSession() as session:
        for _ in range(12):
            async with session.post(
                by_hand + "/v1/chat/completions", json=body, headers={"routing-strategy": "random"}
            ) as response:
                assert response.status == 200, await response.text()
                answer = await response.json()
                assert response.headers["target-pod"] == answer["served_by"]
                served[answer["served_by"]] += 1
        async with session.post(
            by_hand + "/v1/chat/completions",
            json={**body, "model": "nope"},
            headers={"routing-strategy": "least-kv-cache"},
        ) as response:
            assert response.status == 404
            assert json.loads(await response.read())["error"]["code"] == "model_not_found"
        # a metrics strategy facing pods without /metrics falls back, never fails
        async with session.post(
            by_hand + "/v1/chat/completions",
            json=body,
            headers={"routing-strategy": "least-latency"},
        ) as response:
            assert response.status == 200
    assert set(served) == {"up-0", "up-1"}
