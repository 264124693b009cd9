"""``extproc envoy-config``: every option gives a bootstrap Envoy accepts, and the output, run as
printed in front of ``extproc serve``, routes requests with and without a strategy header,
retries on another pod, and answers every error (the server's and Envoy's own) as JSON.

Also ``extproc dev`` itself, in both modes, answering the README's first request.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from extproc import cli
from extproc.devstack.processes import Managed, bin_path, envoy_command, free_port
from extproc.envoy_config import command
from tests.certs import Authority
from tests.e2e.conftest import FakePods, dead_address
from tests.helpers import eventually

CHAT = {"model": "my-model", "messages": [{"role": "user", "content": "Say this is a test!"}]}
LIMIT = 65536


def build(*args: str) -> dict[str, Any]:
    return command.build(cli.build_parser().parse_args(["envoy-config", *args]))


def validate(config: dict[str, Any]) -> None:
    result = subprocess.run(
        [bin_path("envoy"), "--mode", "validate", "--config-yaml", json.dumps(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A pod file with a LoRA adapter and an unready pod, and a CA with two key pairs."""
    root = tmp_path_factory.mktemp("envoy-config")
    pods = root / "pods.yaml"
    pods.write_text(
        yaml.safe_dump(
            {
                "pods": [
                    {"name": "a", "address": "10.0.0.1:8000", "model": "m", "adapters": ["l"]},
                    {"name": "b", "address": "10.0.0.2:8000", "model": "m"},
                    {"name": "c", "address": "[fd00::3]:8000", "model": "n"},
                    {"name": "d", "address": "10.0.0.4:8000", "model": "o", "ready": False},
                ]
            }
        )
    )
    ca = Authority(root / "pki")
    server, client = ca.issue("extproc"), ca.issue("envoy", client=True)
    return {
        "pods": str(pods),
        "ca": str(ca.cert),
        "cert": str(client.cert),
        "key": str(client.key),
        "server_cert": str(server.cert),
        "server_key": str(server.key),
    }


OPTION_SETS = {
    "defaults": [],
    "pods": ["--pods", "{pods}"],
    "pods, no retries": ["--pods", "{pods}", "--retries", "0"],
    "destination list": ["--pods", "{pods}", "--destination-endpoint-header", "--retries", "3"],
    "when-needed": ["--response-phase", "when-needed"],
    "one round trip": ["--pods", "{pods}", "--response-phase", "never", "--full-duplex"],
    "full duplex": ["--full-duplex"],
    "addresses": [
        "--listen-address",
        "127.0.0.1",
        "--listen-port",
        "18080",
        "--admin-address",
        "0.0.0.0",
        "--admin-port",
        "19000",
        "--extproc-address",
        "extproc.example:50052",
    ],
    "tls": ["--extproc-tls-ca", "{ca}", "--extproc-tls-server-name", "extproc"],
    "mtls": [
        "--extproc-tls-ca",
        "{ca}",
        "--extproc-tls-cert",
        "{cert}",
        "--extproc-tls-key",
        "{key}",
    ],
    "tls unverified": ["--extproc-tls-insecure"],
    "limits and timeouts": [
        "--max-body-bytes",
        "1Mi",
        "--route-timeout",
        "2m",
        "--message-timeout",
        "500ms",
        "--failure-mode-allow",
        "--access-log",
    ],
    "ai-gateway": ["--shape", "ai-gateway"],
    "ai-gateway verified": ["--shape", "ai-gateway", "--extproc-tls-ca", "{ca}"],
    "istio": ["--shape", "istio", "--pods", "{pods}", "--retries", "1"],
    "istio tls": ["--shape", "istio", "--pods", "{pods}", "--extproc-tls-insecure"],
}


@pytest.mark.parametrize("name", OPTION_SETS)
def test_every_option_gives_a_bootstrap_envoy_accepts(name: str, files: dict[str, str]) -> None:
    validate(build(*(arg.format(**files) for arg in OPTION_SETS[name])))


def _find(node: Any, key: str) -> list[Any]:
    """Every value stored under ``key`` anywhere in the bootstrap."""
    found = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                found.append(v)
            found.extend(_find(v, key))
    elif isinstance(node, list):
        for item in node:
            found.extend(_find(item, key))
    return found


def test_options_reach_the_bootstrap(files: dict[str, str]) -> None:
    config = build("--pods", files["pods"])
    routes = [r["name"] for r in _find(config, "routes")[0]]
    assert routes[:3] == ["too_large", "m-pinned", "l-pinned"]
    assert {"n-pinned", "original_route", "m-router", "l-router", "n-router"} <= set(routes)
    assert not any(name.startswith("o-") for name in routes)  # an unready pod's model
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    assert {"model-m", "model-l", "model-n"} <= set(clusters)
    sources = _find(clusters["model-m"], "override_host_sources")
    assert sources == [[{"header": "target-pod"}]]
    assert _find(config, "num_retries") == [2] * 6
    mode = _find(config, "processing_mode")[0]
    assert (mode["request_body_mode"], mode["response_header_mode"]) == ("BUFFERED", "SEND")
    assert (mode["response_body_mode"], mode["request_trailer_mode"]) == ("NONE", "SKIP")
    assert _find(config, "allow_mode_override") == [True]

    listed = build("--pods", files["pods"], "--destination-endpoint-header")
    model_m = next(c for c in listed["static_resources"]["clusters"] if c["name"] == "model-m")
    assert _find(model_m, "override_host_sources") == [
        [{"header": "x-gateway-destination-endpoint"}]
    ]
    assert _find(build("--pods", files["pods"], "--retries", "0"), "retry_policy") == []

    duplex = _find(build("--response-phase", "never", "--full-duplex"), "processing_mode")[0]
    assert duplex["request_body_mode"] == "FULL_DUPLEX_STREAMED"
    assert duplex["request_trailer_mode"] == "SEND"
    assert duplex["response_header_mode"] == "SKIP"

    tuned = build(
        *("--max-body-bytes", "1Mi", "--route-timeout", "2m", "--message-timeout", "500ms"),
        *("--failure-mode-allow", "--access-log", "--listen-port", "18080"),
    )
    listener = tuned["static_resources"]["listeners"][0]
    assert listener["per_connection_buffer_limit_bytes"] == 1024 * 1024 + 64 * 1024
    assert listener["address"]["socket_address"] == {"address": "0.0.0.0", "port_value": 18080}
    assert _find(tuned, "message_timeout") == ["0.5s"]
    assert set(_find(tuned, "timeout")) >= {"120s"}
    assert _find(tuned, "failure_mode_allow") == [True]
    assert _find(tuned, "access_log")
    assert _find(tuned, "range_match") == [{"start": 1024 * 1024 + 1, "end": 2**62}]

    extproc = build("--extproc-address", "extproc.example:50052")["static_resources"]["clusters"]
    assert next(c for c in extproc if c["name"] == "extproc")["type"] == "STRICT_DNS"
    mtls = build(
        *("--extproc-tls-ca", files["ca"], "--extproc-tls-cert", files["cert"]),
        *("--extproc-tls-key", files["key"]),
    )
    context = _find(mtls, "common_tls_context")[0]
    assert context["validation_context"]["trusted_ca"] == {"filename": files["ca"]}
    assert _find(context, "san_type")  # the server's name is checked
    assert _find(mtls, "sni") == ["127.0.0.1"]
    assert context["tls_certificates"][0]["certificate_chain"] == {"filename": files["cert"]}
    unverified = _find(build("--extproc-tls-insecure"), "common_tls_context")[0]
    assert unverified["validation_context"] == {}

    gateway = build("--shape", "ai-gateway")
    assert _find(gateway, "http_header_name") == ["x-gateway-destination-endpoint"]
    assert _find(gateway, "common_tls_context")[0]["validation_context"] == {}
    istio = build("--shape", "istio", "--pods", files["pods"])
    assert _find(istio, "override_host_sources") == [
        [{"metadata": {"key": "envoy.lb", "path": [{"key": "x-gateway-destination-endpoint"}]}}]
    ]
    assert _find(istio, "transport_socket") == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--shape", "istio"], "--shape istio needs --pods"),
        (["--shape", "ai-gateway", "--full-duplex"], "--full-duplex applies to --shape aibrix"),
        (["--shape", "istio", "--response-phase", "never"], "--response-phase applies"),
        (["--shape", "ai-gateway", "--destination-endpoint-header"], "applies to --shape aibrix"),
        (["--extproc-tls-cert", "{ca}"], "go together"),
        (["--extproc-tls-cert", "{cert}", "--extproc-tls-key", "{key}"], "needs --extproc-tls-ca"),
        (["--extproc-tls-insecure", "--extproc-tls-ca", "{ca}"], "exclude each other"),
        (["--extproc-tls-server-name", "x"], "needs --extproc-tls-ca"),
        (["--extproc-tls-ca", "/nonexistent/ca.pem"], "no such file"),
        (["--pods", "/nonexistent/pods.yaml"], "--pods: cannot read"),
        (["--retries", "-1"], "--retries must be >= 0"),
        (["--max-body-bytes", "lots"], "number of bytes"),
        (["--route-timeout", "soon"], "must be seconds"),
        (["--extproc-address", "nohost"], "host:port"),
        (["--listen-port", "70000"], "port number"),
    ],
)
def test_bad_options_are_refused(
    args: list[str], message: str, files: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        code = cli.main(["envoy-config", *(arg.format(**files) for arg in args)])
    except SystemExit as exc:  # argparse refuses a value
        code = exc.code
    assert code == 2
    assert message in capsys.readouterr().err


def test_a_pod_file_the_server_would_refuse(tmp_path: Path) -> None:
    pods = tmp_path / "pods.yaml"
    pods.write_text(yaml.safe_dump({"pods": [{"name": "a", "address": "pod-a:80", "model": "m"}]}))
    with pytest.raises(ValueError, match=r"pods\[0\]\.address"):
        build("--pods", str(pods))


# -- running the output ------------------------------------------------------------------------


@dataclass
class Gateway:
    url: str
    admin_url: str
    server: Managed
    envoy: Managed

    async def stat(self, name: str) -> int:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{self.admin_url}/stats?filter=^{name}$") as response,
        ):
            text = await response.text()
        return sum(int(line.rpartition(": ")[2]) for line in text.splitlines() if line)


@asynccontextmanager
async def gateway(
    tmp_path: Path,
    pods: Sequence[dict[str, Any]],
    server_args: Sequence[str] = (),
    config_args: Sequence[str] = (),
) -> AsyncIterator[Gateway]:
    """``extproc serve`` on a pod file, and Envoy on the file ``extproc envoy-config`` prints."""
    pods_file = tmp_path / "pods.yaml"
    pods_file.write_text(yaml.safe_dump({"pods": list(pods)}))
    grpc, http, listen, admin = free_port(), free_port(), free_port(), free_port()
    generated = await asyncio.to_thread(
        subprocess.run,
        [
            bin_path("extproc"),
            "envoy-config",
            *("--pods", str(pods_file), "--listen-address", "127.0.0.1"),
            *("--listen-port", str(listen), "--admin-port", str(admin)),
            *("--extproc-address", f"127.0.0.1:{grpc}", *config_args),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    envoy_file = tmp_path / "envoy.yaml"
    envoy_file.write_text(generated.stdout)
    server = Managed(
        "extproc",
        [
            bin_path("extproc"),
            "serve",
            *("--config", str(pods_file), "--host", "127.0.0.1", "--port", str(grpc)),
            *("--http-port", str(http), "--users-port", str(free_port()), *server_args),
        ],
        tmp_path / "extproc.log",
    ).start()
    envoy = Managed("envoy", envoy_command(envoy_file), tmp_path / "envoy.log").start()
    try:
        await asyncio.to_thread(server.wait_http, f"http://127.0.0.1:{http}/readyz")
        await asyncio.to_thread(envoy.wait_http, f"http://127.0.0.1:{admin}/ready")
        await asyncio.to_thread(envoy.wait_port, listen)
        yield Gateway(f"http://127.0.0.1:{listen}", f"http://127.0.0.1:{admin}", server, envoy)
    finally:
        await asyncio.to_thread(envoy.stop)
        await asyncio.to_thread(server.stop)


@pytest.fixture
async def fake_pods() -> AsyncIterator[FakePods]:
    pods = FakePods()
    try:
        yield pods
    finally:
        await pods.stop()


async def post(
    session: aiohttp.ClientSession, url: str, body: Any, **headers: str
) -> tuple[int, Mapping[str, str], bytes]:
    data = body if isinstance(body, (bytes, AsyncIterator)) else json.dumps(body).encode()
    hdrs = {k.replace("_", "-"): v for k, v in headers.items()}
    async with session.post(url + "/v1/chat/completions", data=data, headers=hdrs) as response:
        return response.status, response.headers.copy(), await response.read()


def error_of(status: int, headers: Mapping[str, str], body: bytes, expected: int) -> dict[str, Any]:
    """The ``error`` object of a JSON error reply (the one shape every error has)."""
    assert status == expected, body
    assert headers["Content-Type"] == "application/json", headers
    error: dict[str, Any] = json.loads(body)["error"]
    assert set(error) == {"message", "type", "code", "param"}
    return error


async def chunked(payload: bytes) -> AsyncIterator[bytes]:
    """A body sent without content-length: Envoy cannot know its size in advance."""
    for start in range(0, len(payload), 16384):
        yield payload[start : start + 16384]


def sized(size: int) -> bytes:
    """A chat request body of exactly ``size`` bytes."""
    empty = len(json.dumps({**CHAT, "messages": [{"role": "user", "content": ""}]}))
    content = "x" * (size - empty)
    return json.dumps({**CHAT, "messages": [{"role": "user", "content": content}]}).encode()


async def test_output_routes_with_and_without_strategy_and_every_error_is_json(
    tmp_path: Path, fake_pods: FakePods
) -> None:
    await fake_pods.start("up-0", "up-1")
    pods = [
        *fake_pods.pods("my-model"),
        {"name": "dead-0", "address": dead_address(), "model": "m-dead"},
        {"name": "down-0", "address": dead_address(), "model": "m-down", "ready": False},
    ]
    pods[0]["adapters"] = ["my-lora"]
    server_args = ("--max-body-bytes", str(LIMIT), "--hold-timeout", "1s")
    async with (
        gateway(tmp_path, pods, server_args, ("--max-body-bytes", str(LIMIT))) as gw,
        aiohttp.ClientSession() as session,
    ):
        chosen: Counter[str] = Counter()
        for _ in range(12):
            status, headers, body = await post(session, gw.url, CHAT, routing_strategy="random")
            assert status == 200, body
            assert headers["target-pod"] == headers["x-pod-name"]  # the server's pick served
            chosen[headers["x-pod-name"]] += 1
        assert set(chosen) == {"up-0", "up-1"}

        by_model: Counter[str] = Counter()
        for _ in range(12):
            status, headers, body = await post(session, gw.url, CHAT)
            assert status == 200, body
            assert "target-pod" not in headers  # routed by model, not by the server's pick
            by_model[headers["x-pod-name"]] += 1
        assert set(by_model) == {"up-0", "up-1"}
        for strategy in ({}, {"routing_strategy": "random"}):
            status, headers, _ = await post(
                session, gw.url, {**CHAT, "model": "my-lora"}, **strategy
            )
            assert (status, headers["x-pod-name"]) == (200, "up-0")  # only up-0 has the adapter

        # The server's errors.
        s, h, b = await post(session, gw.url, b"{oops", routing_strategy="random")
        assert error_of(s, h, b, 400)["code"] == "invalid_json"
        s, h, b = await post(session, gw.url, {**CHAT, "model": "nope"}, routing_strategy="random")
        assert error_of(s, h, b, 404)["code"] == "model_not_found"
        s, h, b = await post(
            session, gw.url, {**CHAT, "model": "m-down"}, routing_strategy="random"
        )
        assert error_of(s, h, b, 503)["code"] == "no_ready_pod"
        assert h["retry-after"]
        async with session.get(gw.url + "/v1/chat/completions") as response:
            s, h, b = response.status, response.headers.copy(), await response.read()
        assert error_of(s, h, b, 405)["code"] == "method_not_allowed"
        assert h["allow"] == "POST"
        for method in ("PUT", "DELETE", "PATCH", "OPTIONS"):
            async with session.request(method, gw.url + "/v1/completions") as response:
                s, h, b = response.status, response.headers.copy(), await response.read()
            assert error_of(s, h, b, 405)["code"] == "method_not_allowed", method
        async with session.head(gw.url + "/v1/chat/completions") as response:
            assert response.status == 405
        async with session.post(
            gw.url + "/v1/chat/completions/extra", data=json.dumps(CHAT).encode()
        ) as response:
            s, h, b = response.status, response.headers.copy(), await response.read()
        assert error_of(s, h, b, 404)["code"] in ("not_found", "path_not_found")

        # Envoy's own replies, as JSON.
        async with session.get(
            gw.url + "/no/such/route", headers={"x-request-id": "r-1"}
        ) as response:
            s, h, b = response.status, response.headers.copy(), await response.read()
        assert error_of(s, h, b, 404)["code"] == "not_found"
        assert h["x-request-id"] == "r-1"
        s, h, b = await post(
            session, gw.url, {**CHAT, "model": "m-dead"}, routing_strategy="random"
        )
        error = error_of(s, h, b, 503)
        assert error["code"] == "upstream_unavailable"
        assert "connect" in error["message"]

        # 413: under Envoy's buffer (the server answers) and over it (Envoy answers), alike.
        s, h, b = await post(
            session, gw.url, chunked(sized(LIMIT + 1000)), routing_strategy="random"
        )
        under = error_of(s, h, b, 413)
        s, h, b = await post(session, gw.url, sized(LIMIT + 1), routing_strategy="random")
        at_limit = error_of(s, h, b, 413)
        s, h, b = await post(session, gw.url, sized(8 * LIMIT), routing_strategy="random")
        over = error_of(s, h, b, 413)
        assert under == at_limit == over
        assert over["code"] == "request_too_large"
        assert over["message"] == f"Request body is larger than the {LIMIT}-byte limit."
        s, _, b = await post(session, gw.url, sized(LIMIT), routing_strategy="random")
        assert s == 200, b

        # The server gone: Envoy's ext_proc failure, as JSON.
        await asyncio.to_thread(gw.server.stop)
        s, h, b = await post(session, gw.url, CHAT, routing_strategy="random")
        assert error_of(s, h, b, 500)["code"] == "routing_unavailable"


async def test_a_chunked_body_over_the_buffer_gets_the_json_413(
    tmp_path: Path, fake_pods: FakePods
) -> None:
    await fake_pods.start("up-0")
    async with (
        gateway(
            tmp_path,
            fake_pods.pods("my-model"),
            ("--max-body-bytes", str(LIMIT)),
            ("--max-body-bytes", str(LIMIT)),
        ) as gw,
        aiohttp.ClientSession() as session,
    ):
        s, h, b = await post(session, gw.url, chunked(sized(4 * LIMIT)), routing_strategy="random")
        assert error_of(s, h, b, 413)["code"] == "request_too_large"


@pytest.mark.parametrize("source", ["target-pod", "fallback list", "no retries"])
async def test_a_dead_pod_is_retried_on_another(
    source: str, tmp_path: Path, fake_pods: FakePods
) -> None:
    """One pod of three refuses connections; the server keeps choosing it now and then."""
    await fake_pods.start("up-0", "up-1")
    dead = dead_address()
    pods = [*fake_pods.pods("my-model"), {"name": "dead", "address": dead, "model": "my-model"}]
    server_args: tuple[str, ...] = ()
    config_args: tuple[str, ...] = ()
    if source == "fallback list":
        server_args = ("--destination-endpoint-header", "--fallback-endpoints", "2")
        config_args = ("--destination-endpoint-header",)
    elif source == "no retries":
        config_args = ("--retries", "0")
    async with (
        gateway(tmp_path, pods, server_args, config_args) as gw,
        aiohttp.ClientSession() as session,
    ):
        statuses: Counter[int] = Counter()
        for index in range(36):
            strategy = {"routing_strategy": "random"} if index % 4 else {}
            s, h, b = await post(session, gw.url, CHAT, **strategy)
            statuses[s] += 1
            if s != 200:
                assert error_of(s, h, b, 503)["code"] == "upstream_unavailable"
        retried = await gw.stat("cluster.model-my-model.upstream_rq_retry")
    if source == "no retries":
        assert statuses[503] > 0, statuses  # what the retries save
        return
    assert statuses == {200: 36}
    assert retried > 0  # the dead pod was chosen, and the request moved on
    if source == "fallback list":
        first_dead = [hit for hit in fake_pods.hits if hit[2].startswith(dead)]
        assert first_dead
        for name, _, destination in first_dead:
            assert fake_pods.addresses[name] == destination.split(",")[1]


@pytest.mark.parametrize(
    ("profile", "config_args", "server_args"),
    [
        ("when-needed", ["--response-phase", "when-needed"], ["--response-phase", "when-needed"]),
        (
            "one round trip",
            ["--response-phase", "never", "--full-duplex"],
            ["--response-phase", "never"],
        ),
    ],
)
async def test_latency_profiles_keep_the_client_headers(
    profile: str,
    config_args: list[str],
    server_args: list[str],
    tmp_path: Path,
    fake_pods: FakePods,
) -> None:
    await fake_pods.start("up-0", "up-1")
    limit = ["--max-body-bytes", str(LIMIT)]
    async with (
        gateway(
            tmp_path, fake_pods.pods("my-model"), server_args + limit, config_args + limit
        ) as gw,
        aiohttp.ClientSession() as session,
    ):
        for _ in range(4):
            status, headers, body = await post(
                session, gw.url, CHAT, routing_strategy="random", x_request_id=f"{profile}-id"
            )
            assert status == 200, body
            assert body == json.dumps(CHAT).encode()
            assert headers["target-pod"] == headers["x-pod-name"]
            assert headers["routing-strategy"] == "random"
            assert headers["x-request-id"] == f"{profile}-id"
        s, h, b = await post(session, gw.url, {**CHAT, "model": "nope"}, routing_strategy="random")
        assert error_of(s, h, b, 404)["code"] == "model_not_found"
        s, h, b = await post(session, gw.url, sized(LIMIT + 1), routing_strategy="random")
        assert error_of(s, h, b, 413)["code"] == "request_too_large"
        if "--full-duplex" in config_args:  # no buffer in Envoy: the server counts the bytes
            s, h, b = await post(
                session, gw.url, chunked(sized(8 * LIMIT)), routing_strategy="random"
            )
            assert error_of(s, h, b, 413)["code"] == "request_too_large"


@pytest.mark.parametrize("tls", ["mtls", "self-signed"])
async def test_tls_to_the_server(tls: str, tmp_path: Path, fake_pods: FakePods) -> None:
    await fake_pods.start("up-0")
    if tls == "mtls":
        ca = Authority(tmp_path / "pki")
        server, client = ca.issue("extproc"), ca.issue("envoy", client=True)
        server_args = [
            *("--tls-cert", str(server.cert), "--tls-key", str(server.key)),
            *("--tls-client-ca", str(ca.cert)),
        ]
        config_args = [
            *("--extproc-tls-ca", str(ca.cert), "--extproc-tls-server-name", "localhost"),
            *("--extproc-tls-cert", str(client.cert), "--extproc-tls-key", str(client.key)),
        ]
    else:
        server_args, config_args = ["--tls-self-signed"], ["--extproc-tls-insecure"]
    async with (
        gateway(tmp_path, fake_pods.pods("my-model"), server_args, config_args) as gw,
        aiohttp.ClientSession() as session,
    ):
        status, headers, body = await post(session, gw.url, CHAT, routing_strategy="random")
        assert status == 200, body
        assert headers["target-pod"] == "up-0"


@pytest.mark.parametrize("mode", ["aibrix", "epp"])
async def test_extproc_dev_answers_the_readme_request(mode: str, tmp_path: Path) -> None:
    """``extproc dev`` (and ``--mode epp``) with the README's curl request, then Ctrl-C."""
    ports = {name: free_port() for name in ("gateway", "grpc", "http", "users", "admin", "base")}
    dev = Managed(
        "extproc-dev",
        [
            bin_path("extproc"),
            "dev",
            *("--pods", "1", "--mode", mode, "--workdir", str(tmp_path / "work")),
            *("--gateway-port", str(ports["gateway"]), "--grpc-port", str(ports["grpc"])),
            *("--http-port", str(ports["http"]), "--users-port", str(ports["users"])),
            *("--admin-port", str(ports["admin"]), "--base-pod-port", str(ports["base"])),
        ],
        tmp_path / "dev.log",
    ).start()
    try:
        await eventually(
            lambda: "Ctrl-C stops everything" in dev.tail(60) or not dev.alive(),
            timeout=60,
            what="extproc dev's banner",
        )
        dev.check_alive()
        readme = {
            "model": "llama-3-8b",
            "messages": [{"role": "user", "content": "Say this is a test!"}],
        }
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"http://127.0.0.1:{ports['gateway']}/v1/chat/completions",
                json=readme,
                headers={"routing-strategy": "random", "Content-Type": "application/json"},
            ) as response,
        ):
            assert response.status == 200, await response.text()
            assert response.headers["target-pod"] == "sim-0"
            assert (await response.json())["choices"][0]["message"]["content"]
        dev.signal(signal.SIGINT)
        await eventually(lambda: not dev.alive(), timeout=30, what="extproc dev stopping")
        assert dev.stop() == 0
    finally:
        await asyncio.to_thread(dev.stop)
