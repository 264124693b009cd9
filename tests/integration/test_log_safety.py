"""What a client sends over the gRPC port cannot forge a log line nor come back at full size.

Header values arrive as raw bytes (NUL, CR/LF, ESC, U+0085, U+2028, U+202E, invalid UTF-8): in
the text format each access line stays one printable line whose fields are exactly the server's,
and the value reads back unchanged once unescaped; in JSON it round-trips. Values over 256 bytes
are logged cut and echoed cut, the cut marked, in logs and error bodies alike."""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Callable, Iterator

import aiohttp
import orjson
import pytest

from extproc import logs
from extproc.app import Server
from tests import envoy_protocol as ep

ADMIN_TOKEN = "admin-5d8e"
FORGED = [
    "abc model=evil pod=evil-pod status=200",
    "abc  model=evil  pod=evil-pod",
    'abc" pod="evil',
    "abc\nINFO    extproc.access: routed  request_id=x pod=evil status=200",
    "abc\r\x00\x1b[31mred\x7f",
    "abc\u0085\u009b\u2028\u2029\u202e\u200b\ufeff",
    "back\\slash\\n",
]
RAW_FORGED = [value.encode() for value in FORGED] + [b"bad\xff\xfeutf8"]
FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|[^\s"]+)')
ESCAPE = re.compile(r"\\(x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8}|.)")
SIMPLE = {"n": "\n", "r": "\r", "t": "\t", "\\": "\\", '"': '"'}


def unescape(value: str) -> str:
    if not value.startswith('"'):
        return value
    return ESCAPE.sub(
        lambda m: SIMPLE.get(m[1]) or chr(int(m[1][1:], 16)),
        value[1:-1],
    )


def parse(line: str) -> tuple[str, dict[str, str]]:
    """A text line's ``logger: message`` and fields; fails unless the fields part is nothing
    but ``key=value`` pairs separated by single spaces (the message never holds two spaces)."""
    prefix, _, rest = line.partition(": ")
    message, _, fields = rest.partition("  ")
    head = f"{prefix.split()[-1]}: {message}"
    pairs = FIELD.findall(fields)
    assert " ".join(f"{k}={v}" for k, v in pairs) == fields, line
    return head, {k: unescape(v) for k, v in pairs}


@pytest.fixture(params=["text", "json"])
def captured(request: pytest.FixtureRequest) -> Iterator[tuple[str, Callable[[], list[str]]]]:
    """The real ``logs.setup(format)``, its stream kept; yields the format and a line reader."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging.getLogger("extproc.access").level)
    logs.setup(request.param, "info")
    (handler,) = root.handlers
    assert isinstance(handler, logging.StreamHandler)
    buffer = io.StringIO()
    handler.setStream(buffer)

    def read() -> list[str]:
        logs.flush()
        return buffer.getvalue().split("\n")[:-1]

    try:
        yield request.param, read
    finally:
        root.handlers[:], level, access_level = saved
        root.setLevel(level)
        logging.getLogger("extproc.access").setLevel(access_level)


def chat(content: str) -> bytes:
    return orjson.dumps({"model": "m1", "messages": [{"role": "user", "content": content}]})


async def send(server: Server, request_id: bytes, content: str) -> None:
    message = ep.request_headers(headers={"routing-strategy": "random"})
    message.request_headers.headers.headers.add(key="x-request-id", raw_value=request_id)
    await ep.run_stream(
        server.grpc_port, [message, ep.request_body(chat(content)), ep.response_headers(200)]
    )


def logged_id(raw: bytes) -> re.Pattern[str]:
    """The server keeps a printable ASCII id of at most 256 characters, else makes a new one."""
    kept = raw.isascii() and raw.decode().isprintable() and len(raw) <= 256
    return re.compile(re.escape(raw.decode()) if kept else "[0-9a-f]{32}")


async def test_forged_values_stay_one_line_with_the_servers_fields(
    make_server, captured: tuple[str, Callable[[], list[str]]]
) -> None:
    """Each forgery as the ``x-request-id`` header and as the prompt (``log_prompts`` on, so
    the access line carries it), as a user name through the users API, then a 500 KB id."""
    fmt, read = captured
    server = await make_server(log_prompts=True, users_admin_token=ADMIN_TOKEN)
    sent = [(raw, raw.decode("utf-8", "replace")) for raw in RAW_FORGED]
    sent.append((b"r" * 500_000, "long id"))
    for raw, content in [(b"clean-1", "clean"), *sent]:
        await send(server, raw, content)
    name = 'ann user=admin status="200"'
    url = f"http://127.0.0.1:{server.users_api.port}/CreateUser"
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with aiohttp.ClientSession(headers=auth) as s, s.post(url, json={"name": name}) as r:
        assert r.status == 200
    await server.stop(grace=0.5)
    lines = read()

    access = [line for line in lines if "extproc.access" in line]
    assert len(access) == len(sent) + 1  # one line a request, none injected
    created = [line for line in lines if "user created" in line]
    if fmt == "json":
        entries = [orjson.loads(line) for line in access]
        (user,) = [orjson.loads(line) for line in created]
    else:
        for line in lines:
            assert line.isprintable(), line  # no control, format or separator character
        parsed = [parse(line) for line in access]
        assert all(head == "extproc.access: routed" for head, _ in parsed), parsed
        entries = [fields for _, fields in parsed]
        (user,) = [parse(line)[1] for line in created]
    assert user["user"] == name
    names = list(entries[0])
    assert {"request_id", "model", "pod", "status", "prompt"} <= set(names)
    for entry, (raw, content) in zip(entries[1:], sent, strict=True):
        assert list(entry) == names
        assert logged_id(raw).fullmatch(entry["request_id"]), entry
        assert entry["model"] == "m1" and entry["pod"] in ("pod-a", "pod-b")
        assert entry["status"] == "200"
        if fmt == "json":
            assert entry["prompt"] == [{"role": "user", "content": content}]
    assert max(len(line) for line in lines) < 2_000


async def test_user_names_with_control_or_format_characters_are_refused(make_server) -> None:
    server = await make_server(users_admin_token=ADMIN_TOKEN)
    url = f"http://127.0.0.1:{server.users_api.port}/CreateUser"
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as s:
        for bad in ("\x00", "\x1b", "\u0085", "\u009b", "\u2028", "\u202e", "\ufeff"):
            async with s.post(url, json={"name": f"ann{bad}", "rpm": 5}) as response:
                assert response.status == 400
                body = await response.json()
                assert "control or format" in body["error"]["message"]
                assert bad not in body["error"]["message"]


async def test_client_values_come_back_cut(make_server) -> None:
    """A 10 KB header never comes back in a 10 KB body (the cut is marked)."""
    server = await make_server(users_admin_token=ADMIN_TOKEN)
    huge = "v" * 10_000
    cases = [
        (ep.request_headers(headers={"user": huge}), 400),
        (ep.request_headers(headers={"user": "n" * 250}), 401),
        (ep.request_headers(headers={"routing-strategy": huge}), 400),
        (ep.request_headers(headers={"routing-strategy": huge + ":1,random:1"}), 400),
        (ep.request_headers(headers={"routing-strategy": "random:" + huge}), 400),
        (ep.request_headers(method=huge), 405),
        (ep.request_headers(path="/v1/chat/completions/" + huge), 404),
        (ep.request_headers(path="/v1/models/" + huge, method="GET"), 404),
    ]
    for message, status in cases:
        message.request_headers.headers.headers.add(key="x-request-id", raw_value=b"r" * 500_000)
        answers = await ep.run_stream(server.grpc_port, [message])
        reply = answers[-1].immediate_response
        assert reply.status.code == status, reply.body[:200]
        assert len(reply.body) < 1_200, (status, len(reply.body))
    model = orjson.dumps({"model": huge, "messages": [{"role": "user", "content": "hi"}]})
    answers = await ep.run_stream(server.grpc_port, [ep.request_headers(), ep.request_body(model)])
    reply = answers[-1].immediate_response
    assert reply.status.code == 404 and len(reply.body) < 1_200
    assert b"...(+" in reply.body

    url = f"http://127.0.0.1:{server.users_api.port}/CreateUser"
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with aiohttp.ClientSession(headers=auth) as s, s.post(url, json={huge: 1}) as r:
        assert r.status == 400 and len(await r.read()) < 1_200
