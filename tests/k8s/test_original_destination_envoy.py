"""The EnvoyPatchPolicy's route and cluster in a real Envoy shaped like Envoy Gateway's output.

Envoy Gateway adds the ext_proc filter disabled and enables it per route on the routes it
generates; the patched-in ORIGINAL_DST route enables it by name. So a client that sends its own
``target-pod`` (here with no ClientTrafficPolicy stripping it first) still goes through the server,
which removes the header and picks the pod: the address the client named is never contacted.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from extproc.devstack.processes import Managed, bin_path, free_port
from extproc.envoy_config import GatewayLayout, bootstrap
from tests.k8s.schemas import REPO

PATCH = REPO / "manifests" / "overlays" / "patch-policy" / "patch-policy.yaml"
EXTENSION = REPO / "manifests" / "base" / "extension-policy.yaml"
ENABLE = {"@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "config": {}}


def gateway_shaped_bootstrap(layout: GatewayLayout) -> dict[str, Any]:
    """The local bootstrap turned into what Envoy Gateway would build, with the patches applied."""
    patches = yaml.safe_load(PATCH.read_text())["spec"]["jsonPatches"]
    cluster = next(p for p in patches if p["type"].endswith("Cluster"))["operation"]["value"]
    route = next(p for p in patches if p["type"].endswith("RouteConfiguration"))["operation"]
    meta = yaml.safe_load(EXTENSION.read_text())["metadata"]
    # The name Envoy Gateway gives the policy's first ext_proc filter.
    filter_name = (
        f"envoy.filters.http.ext_proc/envoyextensionpolicy/{meta['namespace']}/{meta['name']}"
        "/extproc/0"
    )
    config = bootstrap(layout)
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    for http_filter in hcm["typed_config"]["http_filters"]:
        if http_filter["name"] == "envoy.filters.http.ext_proc":
            http_filter["name"] = filter_name
            http_filter["disabled"] = True
    routes = hcm["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    routes[:] = [r for r in routes if r["name"] != route["value"]["name"]]
    for generated in routes:
        generated["typed_per_filter_config"] = {filter_name: ENABLE}
    assert route["path"] == "/virtual_hosts/0/routes/0"
    routes.insert(0, route["value"])
    clusters = config["static_resources"]["clusters"]
    clusters[:] = [c for c in clusters if c["name"] != cluster["name"]] + [cluster]
    return config


@dataclass
class Gateway:
    url: str
    decoy_port: int
    pod_hits: list[str] = field(default_factory=list)
    decoy_hits: list[str] = field(default_factory=list)


async def recorder(hits: list[str], reply: Callable[[web.Request], web.Response]) -> web.AppRunner:
    async def handle(request: web.Request) -> web.Response:
        hits.append(request.path)
        return reply(request)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    return runner


@pytest.fixture
async def gateway(make_server, tmp_path: Path) -> AsyncIterator[Gateway]:
    """Envoy on a free port, the server, a pod, and a decoy; pod and decoy record their hits."""
    pod_port, decoy_port, listen_port = free_port(), free_port(), free_port()
    running = Gateway(f"http://127.0.0.1:{listen_port}", decoy_port)
    answer = {"id": "x", "object": "chat.completion", "choices": [], "usage": None}

    def serve(request: web.Request) -> web.Response:
        if request.path == "/metrics":  # the server's scraper
            return web.Response(text="vllm:num_requests_running 0\n")
        return web.json_response(answer)

    pod = await recorder(running.pod_hits, serve)
    decoy = await recorder(running.decoy_hits, lambda _: web.json_response({"decoy": True}))
    await web.TCPSite(pod, "127.0.0.1", pod_port).start()
    await web.TCPSite(decoy, "127.0.0.1", decoy_port).start()
    server = await make_server(
        pods=[{"name": "pod-0", "address": f"127.0.0.1:{pod_port}", "model": "m1"}],
        routing_strategy="random",
    )
    layout = GatewayLayout(
        listen_port=listen_port, admin_port=free_port(), extproc_port=server.grpc_port
    )
    config_file = tmp_path / "envoy.json"
    config_file.write_text(json.dumps(gateway_shaped_bootstrap(layout)))
    argv = [bin_path("envoy"), "-c", str(config_file), "--concurrency", "1", "-l", "warning"]
    envoy = Managed("envoy", [*argv, "--disable-hot-restart"], tmp_path / "envoy.log").start()
    try:
        await asyncio.to_thread(envoy.wait_http, f"http://127.0.0.1:{layout.admin_port}/ready")
        await asyncio.to_thread(envoy.wait_port, listen_port)
        yield running
    finally:
        await asyncio.to_thread(envoy.stop)
        await pod.cleanup()
        await decoy.cleanup()


async def test_client_target_pod_cannot_bypass_the_server(gateway: Gateway) -> None:
    body = {"model": "m1", "messages": [{"role": "user", "content": "hi"}]}
    forged = {"target-pod": f"127.0.0.1:{gateway.decoy_port}"}
    async with aiohttp.ClientSession() as session:
        chat = f"{gateway.url}/v1/chat/completions"
        async with session.post(chat, json=body, headers=forged) as reply:
            assert reply.status == 200, await reply.text()
            assert reply.headers["target-pod"] == "pod-0"
        async with session.get(f"{gateway.url}/internal/admin", headers=forged) as reply:
            assert reply.status == 404
    polls = ("/metrics", "/v1/models")  # the server reads them itself
    assert [hit for hit in gateway.pod_hits if hit not in polls] == ["/v1/chat/completions"]
    assert gateway.decoy_hits == []
