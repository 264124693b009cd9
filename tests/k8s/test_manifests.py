"""``manifests/``: kustomize builds, every object validates, and the pieces agree with each other.

The build uses ``kubectl kustomize`` (``$KUBECTL``, else ``kubectl`` on PATH, else
``/usr/bin/kubectl``), or a standalone ``kustomize build``; with neither the tests fail saying
so, rather than skipping. Custom resources validate against the CRDs vendored in ``tests/crds``
(strict; Envoy Gateway's against each supported release); built-in kinds round-trip through the
kubernetes client's models.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.route.v3 import route_components_pb2
from google.protobuf import json_format

from extproc import cli, config
from extproc.config import Settings
from extproc.devstack.processes import bin_path
from extproc.envoy.headers import DESTINATION_ENDPOINT, TARGET_POD
from extproc.envoy_config import GatewayLayout, bootstrap
from extproc.kube.httproutes import parse_duration
from tests.k8s import schemas

MANIFESTS = schemas.REPO / "manifests"
OVERLAYS = MANIFESTS / "overlays"
PATCH_POLICY = OVERLAYS / "patch-policy"
POOL = OVERLAYS / "inferencepool"
POOL_ISTIO = OVERLAYS / "inferencepool-istio"
BUILDS = [MANIFESTS, OVERLAYS / "single-namespace", PATCH_POLICY, POOL, POOL_ISTIO]
OLDER_RELEASES = {PATCH_POLICY}
"""Builds meant for Envoy Gateway v1.4 too, checked against its CRDs as well."""
EXAMPLES = sorted((MANIFESTS / "examples").glob("*.yaml"))
EG = "gateway.envoyproxy.io/v1alpha1"
HTTPROUTE = "gateway.networking.k8s.io/v1"
SAFE_RETRY_TRIGGERS = {"connect-failure", "refused-stream", "reset-before-request"}
"""Failures where the pod cannot have started the request, so a retry never runs it twice."""

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
def build(directory: Path, components: tuple[Path, ...] = ()) -> tuple[Obj, ...]:
    """``directory`` built, with ``components`` added (through a kustomization written beside the
    test run, naming them by relative paths, as kustomize requires)."""
    if components:
        with tempfile.TemporaryDirectory() as tmp:
            rel = [os.path.relpath(path, tmp) for path in (directory, *components)]
            (Path(tmp) / "kustomization.yaml").write_text(
                yaml.safe_dump({"resources": rel[:1], "components": rel[1:]})
            )
            return _build(Path(tmp))
    return _build(directory)


def _build(directory: Path) -> tuple[Obj, ...]:
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


def problems(obj: Obj, older: bool = False) -> list[str]:
    return schemas.errors(obj, older=older)


@pytest.mark.parametrize("directory", BUILDS, ids=lambda p: str(p.relative_to(schemas.REPO)))
def test_every_built_object_validates(directory: Path) -> None:
    objects = build(directory)
    assert objects
    older = directory in OLDER_RELEASES
    failures = {
        f"{o['kind']} {o['metadata'].get('namespace', '')}/{o['metadata']['name']}": problems(
            o, older
        )
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


def test_a_field_newer_than_the_oldest_supported_release_is_caught() -> None:
    """statusOnError exists only from Envoy Gateway v1.9: v1.5 to v1.8 reject the whole policy."""
    policy = json.loads(
        json.dumps(find(build(MANIFESTS), "EnvoyExtensionPolicy", "aibrix-gateway-plugins"))
    )
    assert problems(policy) == []
    policy["spec"]["extProc"][0]["statusOnError"] = 503
    found = problems(policy)
    assert found and all(message.startswith("[envoy-gateway-v1.5.0]") for message in found)
    traffic = find(build(MANIFESTS), "BackendTrafficPolicy", "aibrix-eg-backends")
    assert problems(traffic) == []
    assert any("envoy-gateway-v1.4.0" in m for m in problems(traffic, older=True))


def test_every_vendored_crd_is_listed_with_its_origin() -> None:
    readme = (schemas.CRDS / "README.md").read_text()
    vendored = sorted(p.relative_to(schemas.CRDS) for p in schemas.CRDS.rglob("*.yaml"))
    assert vendored
    assert [str(p) for p in vendored if str(p.name) not in readme] == []
    kinds = {kind for _, kind in schemas.releases()}
    assert {
        "Gateway",
        "GatewayClass",
        "HTTPRoute",
        "ReferenceGrant",
        "BackendTrafficPolicy",
        "ClientTrafficPolicy",
        "EnvoyExtensionPolicy",
        "EnvoyPatchPolicy",
        "InferencePool",
        "ScaledObject",
        "ModelAdapter",
    } <= kinds


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
    assert {TARGET_POD, DESTINATION_ENDPOINT} <= set(removed)
    assert policy["spec"]["headers"]["requestID"] == "PreserveOrGenerate"


def test_extension_policy_has_the_expected_processing_mode() -> None:
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
    assert "statusOnError" not in ext_proc  # Envoy Gateway v1.9+ only
    limits = ext_proc["backendSettings"]["circuitBreaker"]
    assert min(limits.values()) > 10 * 1024


def test_ext_proc_waits_at_least_as_long_as_the_server_holds_a_request() -> None:
    """A request held for a scaled-to-zero model's first pod is answered only after up to
    --hold-timeout; Envoy Gateway sets no max_message_timeout, so messageTimeout must cover it."""
    objects = build(MANIFESTS)
    settings = server_settings(find(objects, "Deployment", "aibrix-gateway-plugins"))
    policy = find(objects, "EnvoyExtensionPolicy", "aibrix-gateway-plugins")
    timeout = parse_duration(policy["spec"]["extProc"][0]["messageTimeout"])
    assert settings.autoscaling.hold_timeout <= timeout <= settings.autoscaling.hold_timeout + 30


def test_backend_policy_routes_by_target_pod_within_the_model_service() -> None:
    objects = build(MANIFESTS)
    policy = find(objects, "BackendTrafficPolicy", "aibrix-eg-backends")
    gateway = find(objects, "Gateway", "aibrix-eg")
    assert policy["spec"]["targetRefs"] == [
        {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "aibrix-eg"}
    ]
    assert policy["metadata"]["namespace"] == gateway["metadata"]["namespace"]
    balancer = policy["spec"]["loadBalancer"]
    assert balancer["endpointOverride"] == {"extractFrom": [{"header": TARGET_POD}]}
    assert balancer["type"] == "LeastRequest"
    breaker = policy["spec"]["circuitBreaker"]
    assert {"maxConnections", "maxPendingRequests", "maxParallelRequests"} <= set(breaker)
    assert min(breaker.values()) > 10 * 1024
    retry = policy["spec"]["retry"]
    assert set(retry["retryOn"]["triggers"]) <= SAFE_RETRY_TRIGGERS
    assert "httpStatusCodes" not in retry["retryOn"]
    assert not [o for o in objects if o["kind"] == "EnvoyPatchPolicy"]


def _patches(objects: tuple[Obj, ...]) -> tuple[Obj, Obj, Obj]:
    policy = find(objects, "EnvoyPatchPolicy", "aibrix-original-destination")
    by_type = {p["type"].rsplit(".", 1)[1]: p for p in policy["spec"]["jsonPatches"]}
    return policy, by_type["Cluster"], by_type["RouteConfiguration"]


def _route_config_names(objects: tuple[Obj, ...]) -> dict[str, str]:
    """Listener name -> the route configuration name the patch policy patches for it."""
    policy = find(objects, "EnvoyPatchPolicy", "aibrix-original-destination")
    routes = [p for p in policy["spec"]["jsonPatches"] if p["type"].endswith("RouteConfiguration")]
    values = [p["operation"]["value"] for p in routes]
    assert all(v == values[0] for v in values)
    gateway = find(objects, "Gateway", "aibrix-eg")
    names = [p["name"] for p in routes]
    listeners = {item["name"]: item for item in gateway["spec"]["listeners"]}
    assert len(names) == len(listeners)
    return dict(zip(listeners, names, strict=True))


@pytest.mark.parametrize(
    ("components", "expected"),
    [
        ((), {"http": "aibrix-system/aibrix-eg/http"}),
        (("xds-name-scheme-v2",), {"http": "http-80"}),
        (
            ("https",),
            {"http": "aibrix-system/aibrix-eg/http", "https": "aibrix-system/aibrix-eg/https"},
        ),
        (
            ("https", "xds-name-scheme-v2"),
            {"http": "http-80", "https": "aibrix-system/aibrix-eg/https"},
        ),
        (
            ("xds-name-scheme-v2", "https"),
            {"http": "http-80", "https": "aibrix-system/aibrix-eg/https"},
        ),
    ],
    ids=lambda value: "+".join(value) or "default" if isinstance(value, tuple) else None,
)
def test_patch_policy_names_each_listener_route_configuration(
    components: tuple[str, ...], expected: dict[str, str]
) -> None:
    """Envoy Gateway's names: ``<ns>/<gateway>/<listener>``, or ``http-<port>`` for a plain HTTP
    listener under XDSNameSchemeV2; HTTPS listeners keep theirs under both."""
    paths = tuple(PATCH_POLICY / "components" / name for name in components)
    objects = build(PATCH_POLICY, paths)
    assert _route_config_names(objects) == expected
    gateway = find(objects, "Gateway", "aibrix-eg")
    ports = {item["name"]: item["port"] for item in gateway["spec"]["listeners"]}
    if expected["http"].startswith("http-"):
        assert expected["http"] == f"http-{ports['http']}"
    for obj in objects:
        assert problems(obj, older=True) == [], obj["metadata"]["name"]
    backends = find(objects, "BackendTrafficPolicy", "aibrix-eg-backends")
    assert "endpointOverride" not in backends["spec"]["loadBalancer"]


def test_patch_policy_targets_the_gateway_and_enables_ext_proc_on_its_route() -> None:
    objects = build(PATCH_POLICY)
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
    _, cluster, route = _patches(build(PATCH_POLICY))
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


def _pool_objects(directory: Path) -> tuple[Obj, Obj, Obj, Settings]:
    objects = build(directory)
    pool = find(objects, "InferencePool", "deepseek-r1-distill-llama-8b")
    picker = find(objects, "Deployment", "extproc-picker")
    service = find(objects, "Service", "extproc-picker")
    return pool, picker, service, server_settings(picker)


@pytest.mark.parametrize("directory", [POOL, POOL_ISTIO], ids=lambda p: p.name)
def test_inference_pool_overlay_wires_the_picker_to_the_pool(directory: Path) -> None:
    objects = build(directory)
    pool, picker, service, settings = _pool_objects(directory)
    namespace = pool["metadata"]["namespace"]
    assert settings.mode == "epp"
    assert settings.discovery.provider == "inferencepool"
    assert settings.kubernetes.inference_pool == f"{namespace}/{pool['metadata']['name']}"
    # The pool's picker is a Service of its own namespace, on the server's gRPC port.
    ref = pool["spec"]["endpointPickerRef"]
    assert (ref["kind"], ref["name"]) == ("Service", service["metadata"]["name"])
    assert service["metadata"]["namespace"] == picker["metadata"]["namespace"] == namespace
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ref["port"]["number"] == ports["grpc"]["port"] == settings.server.port
    assert ref["failureMode"] == "FailClose"
    assert service["spec"]["selector"] == picker["spec"]["selector"]["matchLabels"]
    container = picker["spec"]["template"]["spec"]["containers"][0]
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
        "grpc": settings.server.port,
        "metrics": settings.server.http_port,
    }
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # The pool selects the example model's pods, on the port they serve.
    model = find(
        [d for p in EXAMPLES for d in yaml.safe_load_all(p.read_text()) if d],
        "Deployment",
        "deepseek-r1-distill-llama-8b",
    )
    pod_labels = model["spec"]["template"]["metadata"]["labels"]
    assert pool["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert model["metadata"]["namespace"] == namespace
    served = {
        p["containerPort"]
        for c in model["spec"]["template"]["spec"]["containers"]
        for p in c["ports"]
    }
    assert {p["number"] for p in pool["spec"]["targetPorts"]} <= served
    # The route's backend is the pool; its parent is the overlay's Gateway.
    route = find(objects, "HTTPRoute", "deepseek-r1-distill-llama-8b")
    (rule,) = route["spec"]["rules"]
    assert rule["backendRefs"] == [
        {
            "group": "inference.networking.k8s.io",
            "kind": "InferencePool",
            "name": pool["metadata"]["name"],
        }
    ]
    gateway = find(objects, "Gateway", route["spec"]["parentRefs"][0]["name"])
    assert gateway["metadata"]["namespace"] == namespace
    # RBAC: read the pool and the pods of its namespace, nothing else.
    assert _rules(objects) == {
        (namespace, group, resource, verb)
        for group, resource in (("inference.networking.k8s.io", "inferencepools"), ("", "pods"))
        for verb in ("get", "list", "watch")
    }
    binding = find(objects, "RoleBinding", "extproc-picker")
    assert binding["subjects"] == [
        {
            "kind": "ServiceAccount",
            "name": picker["spec"]["template"]["spec"]["serviceAccountName"],
            "namespace": namespace,
        }
    ]


def test_envoy_ai_gateway_variant_speaks_tls_and_names_one_endpoint() -> None:
    objects = build(POOL)
    _, _, _, settings = _pool_objects(POOL)
    assert settings.server.tls_self_signed  # Envoy AI Gateway connects with TLS
    assert settings.routing.fallback_endpoints == 0  # its ORIGINAL_DST reads one address
    gateway = find(objects, "Gateway", "inference-gateway")
    gateway_class = find(objects, "GatewayClass", gateway["spec"]["gatewayClassName"])
    assert (
        gateway_class["spec"]["controllerName"] == "gateway.envoyproxy.io/gatewayclass-controller"
    )
    traffic = find(objects, "ClientTrafficPolicy", "inference-gateway-client")
    assert traffic["spec"]["headers"]["requestID"] == "PreserveOrGenerate"
    assert DESTINATION_ENDPOINT in traffic["spec"]["headers"]["earlyRequestHeaders"]["remove"]


def test_istio_variant_is_plaintext_with_a_fallback_endpoint() -> None:
    objects = build(POOL_ISTIO)
    _, _, service, settings = _pool_objects(POOL_ISTIO)
    assert not settings.server.tls_self_signed and settings.server.tls_cert is None
    assert settings.routing.fallback_endpoints >= 1  # Istio's override_host retries the next
    assert find(objects, "Gateway", "inference-gateway")["spec"]["gatewayClassName"] == "istio"
    assert not [o for o in objects if o["apiVersion"].startswith("gateway.envoyproxy.io/")]
    assert not [o for o in objects if o["kind"] == "GatewayClass"]
    grpc = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
    assert grpc["appProtocol"] == "http2"


def _example(name: str) -> list[Obj]:
    return [d for d in yaml.safe_load_all((MANIFESTS / "examples" / name).read_text()) if d]


def test_keda_scaled_object_points_at_the_gateway_scaler() -> None:
    (scaled,) = _example("keda-scaledobject.yaml")
    objects = build(MANIFESTS)
    service = find(objects, "Service", "aibrix-gateway-plugins")
    settings = server_settings(find(objects, "Deployment", "aibrix-gateway-plugins"))
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] in ("external", "external-push")
    host, port = trigger["metadata"]["scalerAddress"].rsplit(":", 1)
    meta = service["metadata"]
    assert host == f"{meta['name']}.{meta['namespace']}.svc.cluster.local"
    grpc = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
    assert int(port) == grpc["port"] == settings.server.port
    assert trigger["metadata"]["metric"] in ("concurrency", "waiting")  # totals: AverageValue
    assert trigger["metricType"] == "AverageValue"
    float(trigger["metadata"]["targetSize"])
    model = find(_example("model-deployment.yaml"), "Deployment", "deepseek-r1-distill-llama-8b")
    assert trigger["metadata"]["model"] == model["metadata"]["labels"]["model.aibrix.ai/name"]
    target = scaled["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", model["metadata"]["name"])
    assert scaled["metadata"]["namespace"] == model["metadata"]["namespace"]


def test_hpa_example_scales_the_model_on_exported_metrics() -> None:
    (hpa,) = _example("hpa-prometheus-adapter.yaml")
    model = find(_example("model-deployment.yaml"), "Deployment", "deepseek-r1-distill-llama-8b")
    assert hpa["spec"]["scaleTargetRef"]["name"] == model["metadata"]["name"]
    assert hpa["metadata"]["namespace"] == model["metadata"]["namespace"]
    assert hpa["spec"]["minReplicas"] >= 1  # an HPA cannot scale to zero
    exported = (schemas.REPO / "extproc" / "autoscaling" / "signals.py").read_text()
    for metric in hpa["spec"]["metrics"]:
        external = metric["external"]
        assert f'"{external["metric"]["name"]}"' in exported
        assert external["metric"]["selector"]["matchLabels"] == {
            "model": model["metadata"]["labels"]["model.aibrix.ai/name"]
        }
