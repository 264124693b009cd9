"""The users HTTP API, in the seed deployment's shape, on its own port (``users_port``).

``POST /CreateUser``, ``/ReadUser``, ``/UpdateUser``, ``/DeleteUser`` with a JSON object
``{"name", "rpm", "tpm"}``; every answer is JSON: the user row, or an error in the OpenAI shape
the gateway uses everywhere. A limit of 0 means no limit. When ``users_admin_token`` is set,
every call needs ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from extproc.config import UsersSettings
from extproc.config.settings import is_loopback
from extproc.errors import GatewayError, clip
from extproc.telemetry import Telemetry
from extproc.users.ratelimit import STORE_FAILURES
from extproc.users.store import MAX_LIMIT, User, UserExists, UserNotFound, UserStore, name_problem

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024
LOOPBACK = "127.0.0.1"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class UsersApi:
    """The aiohttp application and its site; ``port`` is the bound port once started."""

    def __init__(self, settings: UsersSettings, store: UserStore, telemetry: Telemetry) -> None:
        self._settings = settings
        self._store = store
        self._token = (settings.admin_token or "").encode() or None
        self._store_errors = telemetry.redis_errors.labels("users_api")
        self._runner: web.AppRunner | None = None
        self.port = 0

    def app(self) -> web.Application:
        app = web.Application(
            middlewares=[self._errors, self._authorize], client_max_size=MAX_BODY_BYTES
        )
        app.router.add_post("/CreateUser", self._create)
        app.router.add_post("/ReadUser", self._read)
        app.router.add_post("/UpdateUser", self._update)
        app.router.add_post("/DeleteUser", self._delete)
        return app

    async def start(self) -> None:
        settings = self._settings
        warning = exposure_warning(settings)
        if warning is not None:
            log.warning("%s", warning, extra={"port": settings.port})
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, settings.host or LOOPBACK, settings.port, reuse_port=False)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- endpoints -----------------------------------------------------------------------------

    async def _create(self, request: web.Request) -> web.Response:
        fields = await _fields(request, required=("name",), optional=("rpm", "tpm"))
        user = User(fields["name"], fields.get("rpm", 0), fields.get("tpm", 0))
        try:
            await self._call(self._store.create(user))
        except UserExists:
            raise _error(409, f"user {user.name} already exists", "user_exists") from None
        log.info("user created", extra=_fields_of(user))
        return _json(user.to_json())

    async def _read(self, request: web.Request) -> web.Response:
        fields = await _fields(request, required=("name",))
        user = await self._call(self._store.read(fields["name"]))
        return _json(user.to_json())

    async def _update(self, request: web.Request) -> web.Response:
        fields = await _fields(request, required=("name",), optional=("rpm", "tpm"))
        if "rpm" not in fields and "tpm" not in fields:
            raise _error(400, "give `rpm`, `tpm` or both to update", "missing_field")
        name = fields["name"]
        user = await self._call(self._store.update(name, fields.get("rpm"), fields.get("tpm")))
        log.info("user updated", extra=_fields_of(user))
        return _json(user.to_json())

    async def _delete(self, request: web.Request) -> web.Response:
        fields = await _fields(request, required=("name",))
        name = fields["name"]
        await self._call(self._store.delete(name))
        log.info("user deleted", extra={"user": name})
        return _json({"name": name, "deleted": True})

    async def _call(self, operation: Awaitable[Any]) -> Any:
        """Run a store call (a Redis store bounds its own time); failures become a 503."""
        try:
            return await operation
        except UserNotFound as exc:
            raise _error(404, f"user {clip(str(exc))} does not exist", "user_not_found") from None
        except STORE_FAILURES as exc:
            self._store_errors.inc()
            log.warning("users store call failed", extra={"error": str(exc) or type(exc).__name__})
            raise GatewayError(
                503,
                "The users store is unavailable; retry later.",
                type="service_unavailable_error",
                code="store_unavailable",
            ) from None

    # -- middlewares ---------------------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every failure as an OpenAI-shaped JSON error, including aiohttp's own 404/405/413."""
        try:
            return await handler(request)
        except GatewayError as err:
            return _error_response(err)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
            status = exc.status
            return _error_response(
                GatewayError(status, exc.reason, code=code.get(status, "invalid_request"))
            )

    @web.middleware
    async def _authorize(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        token = self._token
        if token is not None:
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token):
                err = GatewayError(
                    401,
                    "The users API needs Authorization: Bearer <admin token>.",
                    type="authentication_error",
                    code="unauthorized",
                )
                response = _error_response(err)
                response.headers["WWW-Authenticate"] = "Bearer"
                return response
        return await handler(request)


async def _fields(
    request: web.Request, required: tuple[str, ...], optional: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The body's fields, checked: a JSON object with only the given keys, a valid ``name``, and
    ``rpm``/``tpm`` integers from 0 to ``MAX_LIMIT``."""
    try:
        document = orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        raise _error(400, f"Request body is not valid JSON: {exc}", "invalid_json") from None
    if not isinstance(document, dict):
        raise _error(400, "Request body must be a JSON object.", "invalid_body")
    allowed = required + optional
    for key in document:
        if key not in allowed:
            expected = ", ".join(f"`{k}`" for k in allowed)
            raise _error(
                400, f"unknown field `{clip(key, 64)}`; expected {expected}", "unknown_field", key
            )
    for key in required:
        if key not in document:
            raise _error(400, f"`{key}` is required", "missing_field", key)
    name = document["name"]
    if not isinstance(name, str):
        raise _error(400, "`name` must be a string", "invalid_type", "name")
    problem = name_problem(name)
    if problem is not None:
        raise _error(400, f"`name` {problem}", "invalid_value", "name")
    for key in ("rpm", "tpm"):
        if key not in document:
            continue
        value = document[key]
        if not isinstance(value, int) or isinstance(value, bool):
            raise _error(400, f"`{key}` must be an integer", "invalid_type", key)
        if not 0 <= value <= MAX_LIMIT:
            raise _error(400, f"`{key}` must be between 0 and {MAX_LIMIT}", "invalid_value", key)
    return document


def _fields_of(user: User) -> dict[str, object]:
    """Log fields (``name`` is taken by the log record itself)."""
    return {"user": user.name, "rpm": user.rpm, "tpm": user.tpm}


def _error(status: int, message: str, code: str, param: str | None = None) -> GatewayError:
    return GatewayError(status, message, code=code, param=param)


def _error_response(err: GatewayError) -> web.Response:
    return web.Response(status=err.status, body=err.body(), content_type="application/json")


def _json(document: dict[str, object]) -> web.Response:
    return web.Response(body=orjson.dumps(document), content_type="application/json")


def exposure_warning(settings: UsersSettings) -> str | None:
    """The start-up warning for a users API anyone on the network could use, else ``None``."""
    host = settings.host or LOOPBACK
    if settings.admin_token or is_loopback(host):
        return None
    return (
        f"THE USERS API IS OPEN: no users_admin_token is set and port {settings.port} "
        f"listens on {host}, so anyone who can reach it can create users and change "
        "their limits; set EXTPROC_USERS_ADMIN_TOKEN or bind a loopback address"
    )
