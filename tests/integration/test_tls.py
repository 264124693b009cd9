"""TLS and mTLS on the gRPC port, with certificates generated here, and reloading on rotation."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc import config
from extproc.app import Server
from extproc.config import ConfigError
from tests.certs import Authority, KeyPair


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    directory = tmp_path_factory.mktemp("pki")
    ca = Authority(directory, "ca")
    other = Authority(directory, "other-ca")
    return {
        "ca": ca,
        "server": ca.issue("server"),
        "server2": ca.issue("server-2"),
        "client": ca.issue("client", client=True),
        "stranger": other.issue("stranger", client=True),
    }


def installed(pair: KeyPair, directory: Path) -> KeyPair:
    """The pair copied where the server reads it, so a test can rotate the files."""
    target = KeyPair(directory / "tls.crt", directory / "tls.key")
    replace(target, pair)
    return target


def replace(target: KeyPair, source: KeyPair) -> None:
    """Swap the files in place the way a mounted Secret changes: write aside, then rename."""
    for src, dst in ((source.key, target.key), (source.cert, target.cert)):
        aside = dst.with_suffix(".new")
        aside.write_bytes(src.read_bytes())
        os.replace(aside, dst)


async def health(server: Server, ca: Path, client: KeyPair | None = None) -> str:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=client.key.read_bytes() if client else None,
        certificate_chain=client.cert.read_bytes() if client else None,
    )
    target = f"localhost:{server.grpc_port}"
    async with grpc.aio.secure_channel(target, credentials) as channel:
        answer = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status))


async def plaintext_health(server: Server) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)


def served_certificate(port: int, ca: Path) -> bytes:
    """The certificate a fresh TLS connection is given (DER)."""
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        certificate = tls.getpeercert(binary_form=True)
    assert certificate is not None
    return certificate


def der(pair: KeyPair) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pair.cert.read_text())


def reloads(server: Server, result: str) -> float:
    value = server.telemetry.registry.get_sample_value(
        "extproc_tls_reloads_total", {"result": result}
    )
    return value or 0.0


async def test_tls_serves_the_gateway_and_refuses_plaintext(make_server, pki, tmp_path) -> None:
    files = installed(pki["server"], tmp_path)
    server = await make_server(tls_cert=str(files.cert), tls_key=str(files.key))
    assert await health(server, pki["ca"].cert) == "SERVING"
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await plaintext_health(server)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_requires_a_client_certificate_from_the_ca(
    make_server, pki, tmp_path
) -> None:
    files = installed(pki["server"], tmp_path)
    server = await make_server(
        tls_cert=str(files.cert), tls_key=str(files.key), tls_client_ca=str(pki["ca"].cert)
    )
    assert await health(server, pki["ca"].cert, pki["client"]) == "SERVING"
    for client in (None, pki["stranger"]):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await health(server, pki["ca"].cert, client)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_rotated_certificate_is_served_to_new_connections(
    make_server, pki, tmp_path
) -> None:
    files = installed(pki["server"], tmp_path)
    server = await make_server(tls_cert=str(files.cert), tls_key=str(files.key))
    ca = pki["ca"].cert
    assert await asyncio.to_thread(served_certificate, server.grpc_port, ca) == der(pki["server"])

    replace(files, pki["server2"])
    assert await asyncio.to_thread(served_certificate, server.grpc_port, ca) == der(pki["server2"])
    assert await health(server, ca) == "SERVING"
    assert (reloads(server, "ok"), reloads(server, "error")) == (1.0, 0.0)

    # A key that does not fit the certificate is refused; the last good pair stays in use.
    broken = KeyPair(pki["server"].cert, pki["client"].key)
    replace(files, broken)
    assert await asyncio.to_thread(served_certificate, server.grpc_port, ca) == der(pki["server2"])
    assert await health(server, ca) == "SERVING"
    assert (reloads(server, "ok"), reloads(server, "error")) == (1.0, 1.0)


def test_tls_settings_are_checked_at_start_up(pki, tmp_path) -> None:
    pods = tmp_path / "pods.yaml"
    pods.write_text("pods: []\n")
    base = {"config": str(pods)}
    cert, key = str(pki["server"].cert), str(pki["server"].key)
    cases = [
        ({"tls_cert": cert}, "server.tls_key"),
        ({"tls_key": key}, "server.tls_cert"),
        ({"tls_client_ca": str(pki["ca"].cert)}, "--tls-client-ca"),
        ({"tls_cert": cert, "tls_key": str(tmp_path / "missing.key")}, "--tls-key"),
    ]
    for flags, key_name in cases:
        with pytest.raises(ConfigError) as failure:
            config.load({**base, **flags}, {})
        assert failure.value.key == key_name


@pytest.mark.parametrize(
    ("files", "key_name"),
    [
        (lambda p: {"tls_cert": p["server"].key, "tls_key": p["server"].key}, "tls_cert"),
        (lambda p: {"tls_cert": p["server"].cert, "tls_key": p["server"].cert}, "tls_key"),
        (lambda p: {"tls_cert": p["server"].cert, "tls_key": p["client"].key}, "tls_key"),
        (
            lambda p: {
                "tls_cert": p["server"].cert,
                "tls_key": p["server"].key,
                "tls_client_ca": p["server"].key,
            },
            "tls_client_ca",
        ),
    ],
)
async def test_bad_tls_files_stop_start_up_naming_the_key(
    make_server: Callable[..., Any], pki, files, key_name
) -> None:
    with pytest.raises(ConfigError) as failure:
        await make_server(**{k: str(v) for k, v in files(pki).items()})
    assert failure.value.key == key_name
