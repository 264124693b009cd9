"""AIBrix autoscaler keys under labels, where the autoscaler never reads them (a seed's
``kpa.autoscaling.aibrix.ai/scale-down-delay`` label left the default delay in force): the whole
server against the fake API reports them in the log and in ``extproc_model_keys_misplaced``, and
``extproc httproutes render`` lists them as findings. Under annotations they are not reported."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from extproc import config
from extproc.app import Server
from extproc.devstack.processes import free_port
from extproc.kube.httproutes import RouteOptions, render
from extproc.kube.model_labels import SCALE_DOWN_DELAY, misplaced_keys
from tests.helpers import eventually
from tests.k8s import objects
from tests.k8s.fake_apiserver import FakeApiServer

MAX_UP = "autoscaling.aibrix.ai/max-scale-up-rate"


@pytest.fixture
async def server(fake_api: FakeApiServer, kubeconfig: Path) -> AsyncIterator[Server]:
    settings = config.load(
        {
            "discovery": "kubernetes",
            "kubeconfig": str(kubeconfig),
            "manage_httproutes": True,
            "lease_duration": 2,
            "host": "127.0.0.1",
            "port": free_port(),
            "http_port": free_port(),
            "users_port": free_port(),
        },
        {},
    )
    running = Server(settings)
    await running.start()
    yield running
    await running.stop(grace=0.5)


async def misplaced(server: Server) -> dict[tuple[str, str, str], float]:
    url = f"http://127.0.0.1:{server.http_port}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        text = await response.text()
    return {
        (s.labels["kind"], s.labels["key"], s.labels["found_in"]): s.value
        for family in text_string_to_metric_families(text)
        if family.name == "extproc_model_keys_misplaced"
        for s in family.samples
    }


async def test_scale_down_delay_under_labels_is_reported(
    fake_api: FakeApiServer, server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    seed = {SCALE_DOWN_DELAY: "3m", MAX_UP: "2"}
    fake_api.put(objects.deployment("llama", namespace="aibrix-system", labels=seed))
    fake_api.put(objects.pod("llama-0", "llama", "10.0.0.7", labels=seed))
    fake_api.put(objects.deployment("qwen", annotations=seed))  # the right place
    fake_api.put(objects.pod("qwen-0", "qwen", "10.0.0.8", annotations=seed))

    async def reported() -> bool:
        found = await misplaced(server)
        return all(
            found.get((kind, key, "labels")) == 1
            for kind in ("Deployment", "Pod")
            for key in (SCALE_DOWN_DELAY, MAX_UP)
        )

    await eventually(reported)
    assert all(found_in == "labels" for _, _, found_in in await misplaced(server))
    assert f"{SCALE_DOWN_DELAY} under labels, where it is ignored; move it to annotations" in (
        caplog.text
    )
    assert not [r for r in caplog.records if "qwen" in r.getMessage() and "ignored" in r.msg]

    fake_api.put(objects.deployment("llama", namespace="aibrix-system"))
    fake_api.put(objects.pod("llama-0", "llama", "10.0.0.7"))

    async def cleared() -> bool:
        return not any((await misplaced(server)).values())

    await eventually(cleared)


def test_render_lists_the_finding_and_pure_check() -> None:
    deployment = objects.deployment("llama", labels={SCALE_DOWN_DELAY: "0s"})
    result = render([deployment], RouteOptions())
    assert [(f.code, f.misplaced.key if f.misplaced else "") for f in result.findings] == [
        ("misplaced_key", SCALE_DOWN_DELAY)
    ]
    assert [k.key for k in misplaced_keys({SCALE_DOWN_DELAY: "0s"}, {})] == [SCALE_DOWN_DELAY]
    assert misplaced_keys({}, {SCALE_DOWN_DELAY: "0s"}) == []
    # An unrelated label in the same domain family is left alone: the gauge's key stays bounded.
    assert misplaced_keys({"kpa.autoscaling.aibrix.ai/made-up": "1"}, {}) == []
