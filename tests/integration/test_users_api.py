"""The users API over HTTP: the seed's calls, every validation error as OpenAI-shaped JSON, the
admin token, and a store that is down."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from extproc import config
from extproc.devstack.processes import free_port
from extproc.telemetry import Telemetry
from extproc.users.api import UsersApi, exposure_warning
from extproc.users.store import MemoryUserStore, RedisUserStore, UserStore

Client = Callable[..., Any]


@pytest.fixture
async def api() -> AsyncIterator[Callable[..., Any]]:
    """``await api(store=..., **settings)`` -> a client for a users API on a free port."""
    clients: list[TestClient[Any, Any]] = []

    async def start(store: UserStore | None = None, **settings: Any) -> TestClient[Any, Any]:
        values = {"host": "127.0.0.1", **settings}
        users_api = UsersApi(config.load(values, {}).users, store or MemoryUserStore(), Telemetry())
        client = TestClient(TestServer(users_api.app(), host="127.0.0.1", port=free_port()))
        await client.start_server()
        clients.append(client)
        return client

    yield start
    for client in clients:
        await client.close()


async def call(
    client: TestClient[Any, Any], path: str, body: Any, **headers: str
) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else None
    json_body = None if isinstance(body, bytes) else body
    response = await client.post(path, data=data, json=json_body, headers=headers)
    assert response.headers["Content-Type"].startswith("application/json")
    return response.status, await response.json()


def assert_error(document: Any, code: str, param: str | None = None) -> None:
    error = document["error"]
    assert set(error) == {"message", "type", "code", "param"}
    assert error["code"] == code
    assert error["param"] == param
    assert error["message"]


async def test_the_seed_calls(api: Callable[..., Any], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="extproc.users.api")
    client = await api()
    status, body = await call(client, "/CreateUser", {"name": "lgy", "rpm": 100, "tpm": 1000})
    assert (status, body) == (200, {"name": "lgy", "rpm": 100, "tpm": 1000})
    status, body = await call(client, "/ReadUser", {"name": "lgy"})
    assert (status, body) == (200, {"name": "lgy", "rpm": 100, "tpm": 1000})
    status, body = await call(client, "/UpdateUser", {"name": "lgy", "rpm": 3, "tpm": 1000})
    assert (status, body) == (200, {"name": "lgy", "rpm": 3, "tpm": 1000})
    status, body = await call(client, "/UpdateUser", {"name": "lgy", "tpm": 50})
    assert (status, body) == (200, {"name": "lgy", "rpm": 3, "tpm": 50})
    status, body = await call(client, "/DeleteUser", {"name": "lgy"})
    assert (status, body) == (200, {"name": "lgy", "deleted": True})
    status, body = await call(client, "/CreateUser", {"name": "nolimits"})
    assert (status, body) == (200, {"name": "nolimits", "rpm": 0, "tpm": 0})
    assert caplog.messages.count("user created") == 2
    assert "user deleted" in caplog.messages


async def test_unknown_users_and_duplicates(api: Callable[..., Any]) -> None:
    client = await api()
    for path, body in (
        ("/ReadUser", {"name": "ghost"}),
        ("/UpdateUser", {"name": "ghost", "rpm": 1}),
        ("/DeleteUser", {"name": "ghost"}),
    ):
        status, document = await call(client, path, body)
        assert status == 404
        assert_error(document, "user_not_found")
    await call(client, "/CreateUser", {"name": "lgy", "rpm": 1})
    status, document = await call(client, "/CreateUser", {"name": "lgy", "rpm": 2})
    assert status == 409
    assert_error(document, "user_exists")


@pytest.mark.parametrize(
    ("path", "body", "code", "param"),
    [
        ("/CreateUser", b"{not json", "invalid_json", None),
        ("/CreateUser", b"", "invalid_json", None),
        ("/CreateUser", [1, 2], "invalid_body", None),
        ("/CreateUser", {"rpm": 3}, "missing_field", "name"),
        ("/CreateUser", {"name": "a", "rmp": 3}, "unknown_field", "rmp"),
        ("/CreateUser", {"name": 7}, "invalid_type", "name"),
        ("/CreateUser", {"name": ""}, "invalid_value", "name"),
        ("/CreateUser", {"name": "a{b}"}, "invalid_value", "name"),
        ("/CreateUser", {"name": "a\nb"}, "invalid_value", "name"),
        ("/CreateUser", {"name": "a", "rpm": "3"}, "invalid_type", "rpm"),
        ("/CreateUser", {"name": "a", "rpm": True}, "invalid_type", "rpm"),
        ("/CreateUser", {"name": "a", "tpm": 1.5}, "invalid_type", "tpm"),
        ("/CreateUser", {"name": "a", "tpm": -1}, "invalid_value", "tpm"),
        ("/CreateUser", {"name": "a", "rpm": 10**13}, "invalid_value", "rpm"),
        ("/ReadUser", {"name": "a", "rpm": 3}, "unknown_field", "rpm"),
        ("/UpdateUser", {"name": "a"}, "missing_field", None),
    ],
)
async def test_invalid_requests_are_400(
    api: Callable[..., Any], path: str, body: Any, code: str, param: str | None
) -> None:
    client = await api()
    status, document = await call(client, path, body)
    assert status == 400
    assert_error(document, code, param)


@pytest.mark.parametrize("bad", ["\x00", "\x85", "\x9b", "\u2028", "\u2029", "\u202e", "\ufeff"])
@pytest.mark.parametrize("path", ["/CreateUser", "/ReadUser", "/DeleteUser"])
async def test_names_with_control_or_format_characters_are_400(
    api: Callable[..., Any], path: str, bad: str
) -> None:
    client = await api()
    status, document = await call(client, path, {"name": f"lgy{bad}"})
    assert status == 400
    assert_error(document, "invalid_value", "name")
    message = document["error"]["message"]
    assert message.startswith("`name` must not contain control or format characters")
    assert f"U+{ord(bad):04X}" in message
    assert bad not in message


async def test_a_lone_surrogate_is_not_json(api: Callable[..., Any]) -> None:
    client = await api()
    status, document = await call(client, "/CreateUser", b'{"name": "lgy\\ud800"}')
    assert status == 400
    assert_error(document, "invalid_json")


async def test_unknown_paths_and_methods_are_json(api: Callable[..., Any]) -> None:
    client = await api()
    status, document = await call(client, "/DropAllUsers", {"name": "a"})
    assert status == 404
    assert_error(document, "not_found")
    response = await client.get("/ReadUser")
    assert response.status == 405
    assert_error(await response.json(), "method_not_allowed")


async def test_the_admin_token_is_required_when_set(api: Callable[..., Any]) -> None:
    client = await api(users_admin_token="s3cret-token")
    body = {"name": "lgy", "rpm": 3}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-token"}):
        status, document = await call(client, "/CreateUser", body, **headers)
        assert status == 401
        assert_error(document, "unauthorized")
        assert "s3cret" not in document["error"]["message"]
    status, _ = await call(client, "/CreateUser", body, Authorization="Bearer s3cret-token")
    assert status == 200


def test_an_open_api_off_loopback_warns() -> None:
    exposed = config.load({"users_host": "0.0.0.0"}, {}).users
    warning = exposure_warning(exposed)
    assert warning is not None and "USERS API IS OPEN" in warning
    # without a token the API binds loopback unless told otherwise
    assert exposure_warning(config.load({"host": "0.0.0.0"}, {}).users) is None
    assert exposure_warning(config.load({"users_host": "::1"}, {}).users) is None
    guarded = config.load({"host": "0.0.0.0", "users_admin_token": "t"}, {}).users
    assert guarded.host == "0.0.0.0" and exposure_warning(guarded) is None


async def test_a_store_that_is_down_is_a_503(api: Callable[..., Any]) -> None:
    down = RedisUserStore(f"redis://127.0.0.1:{free_port()}/0", timeout=0.2, max_wait=1.0)
    client = await api(store=down, redis_url="redis://127.0.0.1:1/0")
    status, document = await call(client, "/ReadUser", {"name": "lgy"})
    assert status == 503
    assert_error(document, "store_unavailable")
    await down.close()


async def test_a_redis_store_serves_the_api(api: Callable[..., Any], redis_server: Any) -> None:
    store = RedisUserStore(redis_server.url, timeout=2.0, max_wait=5.0)
    client = await api(store=store, redis_url=redis_server.url)
    assert (await call(client, "/CreateUser", {"name": "r", "rpm": 5}))[0] == 200
    assert (await call(client, "/CreateUser", {"name": "r", "rpm": 5}))[0] == 409
    assert (await call(client, "/ReadUser", {"name": "r"}))[1] == {"name": "r", "rpm": 5, "tpm": 0}
    assert (await call(client, "/DeleteUser", {"name": "r"}))[0] == 200
    assert (await call(client, "/ReadUser", {"name": "r"}))[0] == 404
    await store.close()
