"""Logs as a log pipeline sees them (``--log-format json``): one access line per inference
request, whatever its outcome; no prompt, header value or token unless ``log_prompts`` is on."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import grpc
import orjson
import pytest
from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingRequest

from extproc import logs
from extproc.app import Server
from extproc.debug.v1 import debug_pb2 as pb
from extproc.debug.v1.debug_pb2_grpc import RouterDebugStub
from tests import envoy_protocol as ep
from tests.helpers import eventually

PROMPT = "TOP SECRET PROMPT 7f3a"
CLIENT_TOKEN = "sk-client-credential-91c2"
ADMIN_TOKEN = "admin-credential-5d8e"
SECRETS = (PROMPT, CLIENT_TOKEN, ADMIN_TOKEN)


@pytest.fixture
def json_logs() -> Iterator[Callable[[], list[dict[str, Any]]]]:
    """The real ``logs.setup("json", "debug")``, its stream kept; yields a reader of the lines."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging.getLogger("extproc.access").level)
    logs.setup("json", "debug")
    (handler,) = root.handlers
    assert isinstance(handler, logging.StreamHandler)
    buffer = io.StringIO()
    handler.setStream(buffer)

    def read() -> list[dict[str, Any]]:
        logs.flush()  # the handler batches writes; the server flushes it every second
        return [orjson.loads(line) for line in buffer.getvalue().splitlines()]

    try:
        yield read
    finally:
        root.handlers[:], level, access_level = saved
        root.setLevel(level)
        logging.getLogger("extproc.access").setLevel(access_level)


async def exchange(server: Server, messages: list[ProcessingRequest]) -> None:
    await ep.run_stream(server.grpc_port, messages)


def headers(request_id: str, **extra: str) -> ProcessingRequest:
    values = {"x-request-id": request_id, "authorization": f"Bearer {CLIENT_TOKEN}", "user": "ann"}
    return ep.request_headers(
        headers={**values, **{k.replace("_", "-"): v for k, v in extra.items()}}
    )


def chat(model: str = "m1") -> bytes:
    return orjson.dumps({"model": model, "messages": [{"role": "user", "content": PROMPT}]})


async def traffic(server: Server) -> None:
    """A routed request, one routed by model only, three errors, the users API and Explain."""
    await exchange(
        server,
        [
            headers("rid-routed", routing_strategy="least-request"),
            ep.request_body(chat()),
            ep.response_headers(200),
        ],
    )
    await exchange(
        server, [headers("rid-by-model"), ep.request_body(chat()), ep.response_headers(200)]
    )
    await exchange(
        server, [headers("rid-404", routing_strategy="random"), ep.request_body(chat("nope"))]
    )
    await exchange(server, [headers("rid-400"), ep.request_body(b'{"model": "' + PROMPT.encode())])
    await exchange(
        server, [headers("rid-503", routing_strategy="random"), ep.request_body(chat("m2"))]
    )
    url = f"http://127.0.0.1:{server.users_api.port}/CreateUser"
    async with aiohttp.ClientSession() as session:
        for token in ("wrong-token", ADMIN_TOKEN):
            async with session.post(
                url, json={"name": "ann", "rpm": 5}, headers={"Authorization": f"Bearer {token}"}
            ) as response:
                await response.read()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        await RouterDebugStub(channel).Explain(
            pb.ExplainRequest(
                body=chat().decode(),
                strategy="least-request",
                headers={"authorization": CLIENT_TOKEN},
            )
        )


def access_lines(lines: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {line["request_id"]: line for line in lines if line["logger"] == "extproc.access"}


async def test_one_access_line_per_request_and_no_secrets(make_server, json_logs) -> None:
    server = await make_server(
        users_admin_token=ADMIN_TOKEN,
        unknown_user_policy="default-limits",
        default_rpm=100,
        hold_requests=0,  # rid-503: no ready pod of m2, answered at once rather than held
    )
    await traffic(server)
    await server.stop(grace=0.5)
    lines = json_logs()

    text = orjson.dumps(lines).decode()
    for secret in SECRETS:
        assert secret not in text
    access = access_lines(lines)
    assert set(access) == {"rid-routed", "rid-by-model", "rid-404", "rid-400", "rid-503"}
    routed = access["rid-routed"]
    assert routed["msg"] == "routed" and routed["level"] == "info"
    assert (routed["model"], routed["strategy"], routed["status"]) == ("m1", "least-request", "200")
    assert routed["pod"] in ("pod-a", "pod-b")
    assert routed["decision_ms"] >= 0 and routed["duration_ms"] >= 0
    by_model = access["rid-by-model"]
    assert (by_model["msg"], by_model["strategy"], by_model["pod"], by_model["status"]) == (
        "routed",
        "none",
        None,
        "200",
    )
    for request_id, status in (("rid-404", "404"), ("rid-400", "400"), ("rid-503", "503")):
        assert access[request_id]["msg"] == "not routed"
        assert access[request_id]["status"] == status
        assert access[request_id]["pod"] is None
    assert "prompt" not in text


async def test_log_prompts_adds_the_prompt_and_nothing_else(make_server, json_logs) -> None:
    server = await make_server(
        users_admin_token=ADMIN_TOKEN,
        unknown_user_policy="default-limits",
        default_rpm=100,
        hold_requests=0,
        log_prompts=True,
    )
    await traffic(server)
    await server.stop(grace=0.5)
    lines = json_logs()

    access = access_lines(lines)
    expected = [{"role": "user", "content": PROMPT}]
    for request_id in ("rid-routed", "rid-by-model", "rid-404", "rid-503"):
        assert access[request_id]["prompt"] == expected
    assert "prompt" not in access["rid-400"]  # the body never parsed
    text = orjson.dumps(lines).decode()
    assert CLIENT_TOKEN not in text and ADMIN_TOKEN not in text
    assert text.count(PROMPT) == 4


async def test_a_malformed_request_on_the_metrics_port_is_one_warning(
    make_server, caplog: pytest.LogCaptureFixture
) -> None:
    server = await make_server()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.http_port)
    writer.write(b"GET /" + b"a" * 80_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(64), 5)
    writer.close()
    assert answer.startswith(b"HTTP/1.0 400") or answer.startswith(b"HTTP/1.1 400")
    await eventually(lambda: any(r.name == "aiohttp.server" for r in caplog.records))
    (entry,) = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert entry.levelno == logging.WARNING and entry.exc_info is None
    assert "malformed HTTP request answered 400" in entry.getMessage()
    assert len(entry.getMessage()) < 300
