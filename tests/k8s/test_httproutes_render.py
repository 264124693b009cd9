"""HTTPRoutes from model labels, and ``extproc httproutes render``."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc import cli
from extproc.kube.httproutes import (
    RouteOptions,
    format_duration,
    is_dns1123_label,
    parse_duration,
    render,
    route_name,
)
from tests.k8s import objects, schemas
from tests.k8s.fake_apiserver import FakeApiServer

SEED = schemas.SEED
PATHS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"]

Obj = dict[str, Any]


def seed(name: str) -> list[Obj]:
    return [d for d in yaml.safe_load_all(schemas.require_shared(SEED / name).read_text()) if d]


def only(found: list[Obj], kind: str) -> Obj:
    matching = [o for o in found if o["kind"] == kind]
    assert len(matching) == 1, matching
    return matching[0]


def assert_valid(found: list[Obj]) -> None:
    assert {o["metadata"]["name"]: schemas.errors(o) for o in found if schemas.errors(o)} == {}


def test_seed_deployment_renders_the_expected_route() -> None:
    result = render(seed("model-deployment.yaml"), RouteOptions())
    assert_valid(result.objects)
    route = only(result.objects, "HTTPRoute")
    assert route["metadata"]["name"] == "deepseek-r1-distill-llama-8b-router"
    assert route["metadata"]["namespace"] == "aibrix-system"
    assert route["spec"]["parentRefs"] == [
        {
            "group": "gateway.networking.k8s.io",
            "kind": "Gateway",
            "name": "aibrix-eg",
            "namespace": "aibrix-system",
        }
    ]
    (rule,) = route["spec"]["rules"]
    matches = {m["path"]["value"]: m for m in rule["matches"]}
    assert list(matches) == PATHS
    for path in ("/v1/chat/completions", "/v1/completions"):
        assert matches[path]["path"]["type"] == "PathPrefix"
        assert matches[path]["headers"] == [
            {"type": "Exact", "name": "model", "value": "deepseek-r1-distill-llama-8b"}
        ]
    assert rule["backendRefs"] == [
        {
            "group": "",
            "kind": "Service",
            "name": "deepseek-r1-distill-llama-8b",
            "namespace": "default",
            "port": 8000,
            "weight": 1,
        }
    ]
    assert rule["timeouts"] == {"request": "120s"}
    grant = only(result.objects, "ReferenceGrant")
    assert grant["metadata"]["namespace"] == "default"
    assert grant["spec"]["from"] == [
        {"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "namespace": "aibrix-system"}
    ]
    assert grant["spec"]["to"] == [
        {"group": "", "kind": "Service", "name": "deepseek-r1-distill-llama-8b"}
    ]
    assert result.findings == []


def test_generated_route_contains_what_users_write_by_hand() -> None:
    (handmade,) = seed("httproute-example.yaml")
    model = handmade["spec"]["rules"][0]["backendRefs"][0]["name"]
    result = render([objects.deployment(model, port="8000")], RouteOptions())
    route = only(result.objects, "HTTPRoute")
    assert route["metadata"]["name"] == handmade["metadata"]["name"]
    assert route["spec"]["parentRefs"] == handmade["spec"]["parentRefs"]
    ours, theirs = route["spec"]["rules"][0], handmade["spec"]["rules"][0]
    assert ours["backendRefs"] == theirs["backendRefs"]
    assert ours["timeouts"] == theirs["timeouts"]
    for match in theirs["matches"]:
        assert match in ours["matches"]


def test_non_dns_model_names_get_valid_stable_distinct_names() -> None:
    names = ["DeepSeek-R1", "deepseek-r1", "Qwen2.5_7B.Instruct", "a" * 63, "A" * 63, "x"]
    routes = [route_name(n) for n in names]
    assert routes[1] == "deepseek-r1-router"
    assert routes[0].startswith("deepseek-r1-") and routes[0].endswith("-router")
    assert routes[0] == route_name("DeepSeek-R1"), "stable across calls"
    assert all(is_dns1123_label(r) for r in routes), routes
    assert len(set(routes)) == len(routes)

    result = render(
        [objects.deployment("ds", "DeepSeek-R1", namespace="aibrix-system")], RouteOptions()
    )
    assert_valid(result.objects)
    route = only(result.objects, "HTTPRoute")
    assert route["metadata"]["name"] == routes[0]
    assert route["spec"]["rules"][0]["matches"][0]["headers"][0]["value"] == "DeepSeek-R1"
    assert route["spec"]["rules"][0]["backendRefs"][0]["name"] == "deepseek-r1"
    assert [f.code for f in result.findings] == ["derived_service_name"]


def test_behaviour_annotations_apply_and_misplaced_keys_are_reported() -> None:
    timed = objects.deployment(
        "slow",
        namespace="aibrix-system",
        annotations={
            "model.aibrix.ai/route-timeout": "10m",
            "model.aibrix.ai/service-name": "slow-svc",
        },
    )
    misplaced = objects.deployment(
        "wrong",
        namespace="aibrix-system",
        labels={"model.aibrix.ai/route-timeout": "300s"},
        annotations={"model.aibrix.ai/port": "9000"},
    )
    result = render([timed, misplaced], RouteOptions(timeout_seconds=90))
    assert_valid(result.objects)
    routes = {o["metadata"]["name"]: o["spec"]["rules"][0] for o in result.objects}
    assert routes["slow-router"]["timeouts"] == {"request": "600s"}
    assert routes["slow-router"]["backendRefs"][0]["name"] == "slow-svc"
    assert routes["wrong-router"]["timeouts"] == {"request": "90s"}, "a label is not obeyed"
    assert routes["wrong-router"]["backendRefs"][0]["port"] == 8000
    found = {(f.code, f.misplaced.key if f.misplaced else "") for f in result.findings}
    assert found == {
        ("misplaced_key", "model.aibrix.ai/route-timeout"),
        ("misplaced_key", "model.aibrix.ai/port"),
    }


def test_bad_values_and_disagreements_are_findings() -> None:
    result = render(
        [
            objects.deployment("m", namespace="aibrix-system", port="8001"),
            objects.pod("m-0", "m", namespace="aibrix-system", port="8002"),
            objects.deployment("bad", namespace="aibrix-system", port="http"),
            objects.deployment(
                "t",
                namespace="aibrix-system",
                annotations={"model.aibrix.ai/route-timeout": "2 min"},
            ),
        ],
        RouteOptions(),
    )
    codes = sorted(f.code for f in result.findings)
    assert codes == ["conflict", "invalid_annotation", "invalid_port"]
    names = [o["metadata"]["name"] for o in result.objects]
    assert names == ["m-router", "t-router"]
    ports = [o["spec"]["rules"][0]["backendRefs"][0]["port"] for o in result.objects]
    assert ports == [8001, 8000], "the Deployment's port wins over its pod's"


def test_model_in_several_namespaces_routes_to_each() -> None:
    result = render(
        [
            objects.deployment("llama", namespace="team-b"),
            objects.deployment("llama", namespace="team-a"),
            objects.deployment("llama", namespace="aibrix-system"),
        ],
        RouteOptions(),
    )
    assert_valid(result.objects)
    route = only(result.objects, "HTTPRoute")
    backends = [b["namespace"] for b in route["spec"]["rules"][0]["backendRefs"]]
    assert backends == ["aibrix-system", "team-a", "team-b"]
    grants = sorted(
        o["metadata"]["namespace"] for o in result.objects if o["kind"] == "ReferenceGrant"
    )
    assert grants == ["team-a", "team-b"]


def test_an_adapter_routes_to_its_base_models_service() -> None:
    result = render(
        [
            objects.deployment("qwen", namespace="team-a", port="8001"),
            objects.model_adapter("qwen-lora", "qwen", ["qwen-0"], namespace="team-a"),
            objects.model_adapter("orphan-lora", "missing", []),
            objects.model_adapter("qwen", "qwen", []),  # an adapter named like a model
        ],
        RouteOptions(),
    )
    assert_valid(result.objects)
    routes = {o["metadata"]["name"]: o for o in result.objects if o["kind"] == "HTTPRoute"}
    assert sorted(routes) == ["qwen-lora-router", "qwen-router"]
    base, adapter = routes["qwen-router"], routes["qwen-lora-router"]
    (rule,) = adapter["spec"]["rules"]
    assert rule["backendRefs"] == base["spec"]["rules"][0]["backendRefs"]
    assert {m["path"]["value"] for m in rule["matches"]} == set(PATHS)
    assert all(
        m["headers"] == [{"type": "Exact", "name": "model", "value": "qwen-lora"}]
        for m in rule["matches"]
    )
    assert adapter["metadata"]["labels"]["model.aibrix.ai/name"] == "qwen-lora"
    # the base model's grant admits every route of the gateway namespace, the adapter's too
    assert len([o for o in result.objects if o["kind"] == "ReferenceGrant"]) == 1
    codes = sorted((f.code, f.model) for f in result.findings)
    assert ("adapter_without_model", "orphan-lora") in codes
    assert ("name_collision", "qwen") in codes


def test_other_kinds_and_unlabelled_objects_are_ignored() -> None:
    service = seed("model-deployment.yaml")[1]
    plain = objects.deployment("x")
    del plain["metadata"]["labels"]["model.aibrix.ai/name"]
    assert render([service, plain], RouteOptions()).objects == []


@pytest.mark.parametrize(
    ("seconds", "text"), [(120, "120s"), (1.5, "1500ms"), (0.25, "250ms"), (360000, "100h")]
)
def test_durations(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == seconds


def test_render_command_from_files_and_stdin(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    seed = schemas.require_shared(SEED / "model-deployment.yaml")
    assert cli.main(["httproutes", "render", "-f", str(seed)]) == 0
    out = capsys.readouterr()
    rendered = [d for d in yaml.safe_load_all(out.out) if d]
    assert [o["kind"] for o in rendered] == ["HTTPRoute", "ReferenceGrant"]
    assert rendered[0]["metadata"]["name"] == "deepseek-r1-distill-llama-8b-router"

    listing = {"apiVersion": "v1", "kind": "List", "items": [objects.deployment("DeepSeek-R1")]}
    monkeypatch.setattr("sys.stdin", io.StringIO(yaml.safe_dump(listing)))
    args = [
        "httproutes",
        "render",
        "-f",
        "-",
        "--gateway-namespace",
        "gw",
        "--route-timeout",
        "30s",
    ]
    assert cli.main(args) == 0
    out = capsys.readouterr()
    route = next(d for d in yaml.safe_load_all(out.out) if d and d["kind"] == "HTTPRoute")
    assert route["metadata"]["namespace"] == "gw"
    assert route["spec"]["rules"][0]["timeouts"] == {"request": "30s"}
    assert "cannot name a Service" in out.err

    assert cli.main(["httproutes", "render", "-f", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_render_command_from_the_cluster(
    fake_api: FakeApiServer, kubeconfig: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_api.put(objects.deployment("llama", namespace="team-a"))
    fake_api.put(objects.pod("phi-0", "phi", namespace="team-b"))
    fake_api.put(objects.deployment("hidden", namespace="team-c"))
    args = ["httproutes", "render", "--kubeconfig", str(kubeconfig)]
    assert cli.main([*args, "--watch-namespaces", "team-a,team-b"]) == 0
    rendered = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    assert sorted(o["metadata"]["name"] for o in rendered if o["kind"] == "HTTPRoute") == [
        "llama-router",
        "phi-router",
    ]
    assert_valid(rendered)
    assert fake_api.writes() == [], "render only reads"

    fake_api.fail(403, path_contains="/deployments")
    assert cli.main(args) == 1
    assert "cannot list" in capsys.readouterr().err
