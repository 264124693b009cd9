"""``manifests/``: kustomize builds, every object validates, and the pieces agree with each other.

The build uses ``kubectl kustomize`` (``$KUBECTL``, else ``kubectl`` on PATH, else
``/usr/bin/kubectl``), or a standalone ``kustomize build``; with neither the tests fail saying
so, rather than skipping. Custom resources validate against ``../shared/crds`` (strict); built-in
kinds round-trip through the kubernetes client's models. ClientTrafficPolicy has no CRD there:
its fields are checked against the sub-schemas of the same API types that other shared CRDs embed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.route.v3 import route_components_pb2
from google.protobuf import json_format

from extproc import cli, config
from extproc.config import Settings
from extproc.devstack.processes import bin_path
from extproc.envoy_config import GatewayLayout, bootstrap
from tests.k8s import schemas

MANIFESTS = schemas.REPO / "manifests"
BUILDS = [MANIFESTS, MANIFESTS / "overlays" / "single-namespace"]
EXAMPLES = sorted((MANIFESTS / "examples").glob("*.yaml"))
EG = "gateway.envoyproxy.io/v1alpha1"
HTTPROUTE = "gateway.networking.k8s.io/v1"

Obj = dict[str, Any]


def _kustomize_command(directory: Path) -> list[str]:
    kubectl = os.environ.get("KUBECTL") or shutil.which("kubectl")
    if kubectl is None and Path("/usr/bin/kubectl").exists():
        kubectl = "/usr/bin/kubectl"
    if kubectl is not None:
        return [kubectl, "kustomize", str(directory)]
    standalone = shutil.which("kustomize")
    if standalone is not None:
        return [standalone, "build", str(directory)]
    pytest.fail(
        "building manifests/ needs kubectl (1.14+, it embeds kustomize) or kustomize: install "
        "one, or point $KUBECTL at kubectl"
    )


@cache
def build(directory: Path) -> tuple[Obj, ...]:
    result = subprocess.run(
        _kustomize_command(directory), capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, f"kustomize failed for {directory}:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def find(objects: tuple[Obj, ...] | list[Obj], kind: str, name: str) -> Obj:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
    return matches[0]


def quantity(text: str | int) -> int:
    units = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "k": 1000, "M": 1000**2, "G": 1000**3}
    match = re.fullmatch(r"(\d+)([KMG]i|[kMG])?", str(text))
    assert match, f"not a quantity: {text!r}"
    return int(match.group(1)) * units.get(match.group(2) or "", 1)


@cache
def client_traffic_policy_schema() -> Obj:
    """The ClientTrafficPolicy fields used here, each from a shared CRD embedding the same type."""
    target_refs = schemas.schema_at(EG, "EnvoyExtensionPolicy", "spec", "targetRefs")
    buffer_limit = schemas.schema_at(
        EG, "BackendTrafficPolicy", "spec", "connection", "bufferLimit"
    )
    header_filter = schemas.schema_at(
        HTTPROUTE, "HTTPRoute", "spec", "rules", "[]", "filters", "[]", "requestHeaderModifier"
    )

    def closed(properties: Obj, required: list[str] | None = None) -> Obj:
        node: Obj = {"type": "object", "properties": properties, "additionalProperties": False}
        if required:
            node["required"] = required
        return node

    return closed(
        {
            "apiVersion": {"const": EG},
            "kind": {"const": "ClientTrafficPolicy"},
            "metadata": {"type": "object"},
            "spec": closed(
                {
                    "targetRefs": target_refs,
                    "connection": closed({"bufferLimit": buffer_limit}),
                    "headers": closed({"earlyRequestHeaders": header_filter}),
                },
                ["targetRefs"],
            ),
        },
        ["apiVersion", "kind", "metadata", "spec"],
    )


def problems(obj: Obj) -> list[str]:
    if obj.get("kind") == "ClientTrafficPolicy":
        validator = jsonschema.Draft7Validator(client_traffic_policy_schema())
        found = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(obj)]
        return schemas.metadata_errors(obj, namespaced=True) + found
    return schemas.errors(obj)


@pytest.mark.parametrize("directory", BUILDS, ids=lambda p: str(p.relative_to(schemas.REPO)))
def test_every_built_object_validates(directory: Path) -> None:
    objects = build(directory)
    assert objects
    failures = {
        f"{o['kind']} {o['metadata'].get('namespace', '')}/{o['metadata']['name']}": problems(o)
        for o in objects
    }
    assert {k: v for k, v in failures.items() if v} == {}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_validates(path: Path) -> None:
    objects = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    assert objects
    assert {o["metadata"]["name"]: problems(o) for o in objects if problems(o)} == {}


def test_examples_hold_the_seed_model_and_an_adapter() -> None:
    objects = [d for p in EXAMPLES for d in yaml.safe_load_all(p.read_text()) if d]
    deployment = find(objects, "Deployment", "deepseek-r1-distill-llama-8b")
    labels = deployment["metadata"]["labels"]
    assert labels["model.aibrix.ai/name"] == "deepseek-r1-distill-llama-8b"
    assert labels["model.aibrix.ai/port"] == "8000"
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pod_labels["model.aibrix.ai/name"] == "deepseek-r1-distill-llama-8b"
    service = find(objects, "Service", "deepseek-r1-distill-llama-8b")
    assert 8000 in [p["port"] for p in service["spec"]["ports"]]
    adapter = find(objects, "ModelAdapter", "qwen-code-lora")
    assert adapter["spec"]["baseModel"] == "qwen-coder-1-5b-instruct"


def test_a_misspelt_field_is_caught() -> None:
    """The checks above can fail: strict CRD schemas and model round trips reject typos."""
    policy = json.loads(
        json.dumps(find(build(MANIFESTS), "EnvoyExtensionPolicy", "aibrix-gateway-plugins"))
    )
    policy["spec"]["extProc"][0]["procesingMode"] = policy["spec"]["extProc"][0].pop(
        "processingMode"
    )
    assert problems(policy)
    deployment = json.loads(
        json.dumps(find(build(MANIFESTS), "Deployment", "aibrix-gateway-plugins"))
    )
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    assert problems(deployment)
    traffic = json.loads(
        json.dumps(find(build(MANIFESTS), "ClientTrafficPolicy", "aibrix-eg-client"))
    )
    traffic["spec"]["connection"]["bufferLimt"] = "1Mi"
    assert problems(traffic)


def server_settings(deployment: Obj) -> Settings:
    """The Deployment's args through the real command-line parser and settings loader."""
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    args = cli.build_parser().parse_args(container["args"])
    assert args.command == "serve"
    return config.load(cli.settings_flags(args), {}, strategy_option_flags=args.strategy_option)


def test_server_deployment_and_service_agree() -> None:
    objects = build(MANIFESTS)
    deployment = find(objects, "Deployment", "aibrix-gateway-plugins")
    settings = server_settings(deployment)
    assert settings.discovery.provider == "kubernetes"
    assert settings.kubernetes.manage_httproutes
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["serviceAccountName"] == "aibrix-gateway-plugins"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {
        "grpc": settings.server.port,
        "metrics": settings.server.http_port,
        "users": settings.users.port,
    }
    assert ports == {"grpc": 50052, "metrics": 8080, "users": 8090}
    assert container["readinessProbe"]["grpc"]["port"] == 50052
    assert container["startupProbe"]["grpc"]["port"] == 50052
    assert container["resources"]["requests"] and container["resources"]["limits"]
    service = find(objects, "Service", "aibrix-gateway-plugins")
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == ports
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]

    gateway = find(objects, "Gateway", "aibrix-eg")
    assert settings.kubernetes.gateway_name == gateway["metadata"]["name"]
    assert (
        settings.kubernetes.gateway_namespace == gateway["metadata"]["namespace"] == "aibrix-system"
    )
    assert (
        gateway["spec"]["gatewayClassName"]
        == find(objects, "GatewayClass", "aibrix-eg")["metadata"]["name"]
    )

    redis = find(objects, "Service", "aibrix-redis-master")
    assert settings.users.redis_url == f"redis://{redis['metadata']['name']}:6379/0"
    assert find(objects, "Deployment", "aibrix-redis-master")


def test_envoy_buffer_limit_sits_just_above_the_server_body_limit() -> None:
    objects = build(MANIFESTS)
    settings = server_settings(find(objects, "Deployment", "aibrix-gateway-plugins"))
    policy = find(objects, "ClientTrafficPolicy", "aibrix-eg-client")
    limit = quantity(policy["spec"]["connection"]["bufferLimit"])
    assert settings.server.max_body_bytes < limit <= settings.server.max_body_bytes + 1024 * 1024
    assert policy["spec"]["targetRefs"][0]["name"] == "aibrix-eg"
    removed = policy["spec"]["headers"]["earlyRequestHeaders"]["remove"]
    assert {"target-pod", "x-gateway-destination-endpoint"} <= set(removed)


def test_extension_policy_has_the_design_processing_mode() -> None:
    policy = find(build(MANIFESTS), "EnvoyExtensionPolicy", "aibrix-gateway-plugins")
    assert policy["spec"]["targetRefs"] == [
        {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "aibrix-eg"}
    ]
    (ext_proc,) = policy["spec"]["extProc"]
    assert ext_proc["backendRefs"][0]["name"] == "aibrix-gateway-plugins"
    assert ext_proc["backendRefs"][0]["port"] == 50052
    mode = ext_proc["processingMode"]
    assert mode["allowModeOverride"] is True
    assert mode["request"] == {"body": "Buffered"}  # headers SEND, body BUFFERED
    assert mode["response"] == {}  # headers SEND, body NONE
    assert ext_proc["failOpen"] is False
    assert ext_proc["messageTimeout"] == "5s"


def _patches(objects: tuple[Obj, ...]) -> tuple[Obj, Obj, Obj]:
    policy = find(objects, "EnvoyPatchPolicy", "aibrix-original-destination")
    by_type = {p["type"].rsplit(".", 1)[1]: p for p in policy["spec"]["jsonPatches"]}
    return policy, by_type["Cluster"], by_type["RouteConfiguration"]


def test_patch_policy_targets_the_gateway_and_enables_ext_proc_on_its_route() -> None:
    objects = build(MANIFESTS)
    policy, cluster, route = _patches(objects)
    gateway = find(objects, "Gateway", "aibrix-eg")
    extension = find(objects, "EnvoyExtensionPolicy", "aibrix-gateway-plugins")
    assert policy["spec"]["targetRef"]["name"] == gateway["metadata"]["name"]
    listener = gateway["spec"]["listeners"][0]["name"]
    assert (
        route["name"]
        == f"{gateway['metadata']['namespace']}/{gateway['metadata']['name']}/{listener}"
    )
    value = route["operation"]["value"]
    filter_name = (
        "envoy.filters.http.ext_proc/envoyextensionpolicy/"
        f"{extension['metadata']['namespace']}/{extension['metadata']['name']}/extproc/0"
    )
    assert list(value["typed_per_filter_config"]) == [filter_name]
    assert value["match"]["headers"] == [{"name": "target-pod", "present_match": True}]
    assert value["route"]["cluster"] == cluster["operation"]["value"]["name"]
    assert route["operation"]["path"] == "/virtual_hosts/0/routes/0"


def test_patch_values_are_valid_envoy_config() -> None:
    """Parsed as Envoy's protos, then validated by Envoy itself inside an Envoy Gateway-shaped
    bootstrap (the ext_proc filter under Envoy Gateway's name) with the patches applied."""
    _, cluster, route = _patches(build(MANIFESTS))
    cluster_value = cluster["operation"]["value"]
    route_value = route["operation"]["value"]
    json_format.ParseDict(cluster_value, cluster_pb2.Cluster())
    json_format.ParseDict(route_value, route_components_pb2.Route())

    local = bootstrap(GatewayLayout(listen_port=18080, admin_port=19901, extproc_port=15052))
    local_dst = next(
        c for c in local["static_resources"]["clusters"] if c["name"] == cluster_value["name"]
    )
    assert cluster_value["original_dst_lb_config"] == local_dst["original_dst_lb_config"]

    hcm = local["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    for http_filter in hcm["typed_config"]["http_filters"]:
        if http_filter["name"] == "envoy.filters.http.ext_proc":
            http_filter["name"] = next(iter(route_value["typed_per_filter_config"]))
            http_filter["disabled"] = True  # as Envoy Gateway does; enabled per route
    routes = hcm["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    routes[:] = [r for r in routes if r.get("name") != route_value["name"]]
    routes.insert(0, route_value)
    clusters = local["static_resources"]["clusters"]
    clusters[:] = [c for c in clusters if c["name"] != cluster_value["name"]] + [cluster_value]
    result = subprocess.run(
        [bin_path("envoy"), "--mode", "validate", "--config-yaml", json.dumps(local)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_reserved_route_covers_the_inference_paths() -> None:
    route = find(build(MANIFESTS), "HTTPRoute", "aibrix-reserved-router")
    paths = {m["path"]["value"] for rule in route["spec"]["rules"] for m in rule["matches"]}
    assert paths == {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/v1/models",
    }
    assert route["spec"]["parentRefs"][0]["name"] == "aibrix-eg"


def _rules(objects: tuple[Obj, ...]) -> set[tuple[str, str, str, str]]:
    """(scope, apiGroup, resource, verb) for every rule; scope is the binding's reach."""
    granted: set[tuple[str, str, str, str]] = set()
    for obj in objects:
        if obj["kind"] not in ("ClusterRole", "Role"):
            continue
        scope = "cluster" if obj["kind"] == "ClusterRole" else obj["metadata"]["namespace"]
        for rule in obj["rules"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        granted.add((scope, group, resource, verb))
    return granted


def test_rbac_is_exactly_what_the_server_calls() -> None:
    granted = _rules(build(MANIFESTS))
    assert not any("*" in item for item in granted)
    assert not any(resource == "secrets" for _, _, resource, _ in granted)
    expected = {
        ("cluster", "", "pods", "list"),
        ("cluster", "", "pods", "watch"),
        ("cluster", "apps", "deployments", "list"),
        ("cluster", "apps", "deployments", "watch"),
        ("cluster", "model.aibrix.ai", "modeladapters", "list"),
        ("cluster", "model.aibrix.ai", "modeladapters", "watch"),
        *(
            ("cluster", "gateway.networking.k8s.io", "referencegrants", verb)
            for verb in ("get", "list", "create", "update", "delete")
        ),
        *(
            ("aibrix-system", "gateway.networking.k8s.io", "httproutes", verb)
            for verb in ("get", "list", "create", "update", "delete")
        ),
        ("aibrix-system", "coordination.k8s.io", "leases", "create"),
        ("aibrix-system", "coordination.k8s.io", "leases", "get"),
        ("aibrix-system", "coordination.k8s.io", "leases", "update"),
    }
    assert granted == expected
    role = find(build(MANIFESTS), "Role", "aibrix-gateway-plugins")
    named = [r for r in role["rules"] if r.get("resourceNames")]
    assert named and named[0]["resourceNames"] == ["extproc-httproutes"]


def test_single_namespace_overlay_binds_only_there() -> None:
    objects = build(MANIFESTS / "overlays" / "single-namespace")
    assert not [o for o in objects if o["kind"] == "ClusterRoleBinding"]
    binding = next(
        o for o in objects if o["kind"] == "RoleBinding" and o["metadata"]["namespace"] == "default"
    )
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": "aibrix-gateway-plugins",
    }
    settings = server_settings(find(objects, "Deployment", "aibrix-gateway-plugins"))
    assert settings.kubernetes.namespaces == ["default"]
