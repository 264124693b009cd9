"""Every error the gateway returns, as one exception type with OpenAI's error shape.

The exchange turns a ``GatewayError`` into an Envoy ImmediateResponse; nothing else may reach the
client as an error, so the error table of docs/api.md lives here in one place. A value the
client sent is echoed at most ``ECHO_LIMIT`` bytes long, cut the way the logs cut it (marked
``...(+N bytes)``); and whatever a message quotes, no body carries more than ``MESSAGE_LIMIT``
bytes of message, so a 10 KB header never comes back as a 10 KB error.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from extproc.logs import FIELD_LIMIT, cut

ECHO_LIMIT = FIELD_LIMIT
MESSAGE_LIMIT = 1024


def clip(value: str, limit: int = ECHO_LIMIT) -> str:
    """``value`` cut to about ``limit`` UTF-8 bytes, the cut marked, for echoing it."""
    return cut(value, limit)


@dataclass(eq=False)
class GatewayError(Exception):
    status: int
    message: str
    type: str = "invalid_request_error"
    code: str | int = "invalid_request"
    param: str | None = None
    retry_after: int | None = None
    allow: str | None = None
    """Methods the path accepts (the ``Allow`` header of a 405)."""

    def body(self) -> bytes:
        return orjson.dumps(
            {
                "error": {
                    "message": clip(self.message, MESSAGE_LIMIT),
                    "type": self.type,
                    "code": self.code,
                    "param": None if self.param is None else clip(self.param),
                }
            }
        )

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"


def bad_request(
    message: str, param: str | None = None, code: str = "invalid_request"
) -> GatewayError:
    return GatewayError(400, message, code=code, param=param)


def invalid_json(detail: str) -> GatewayError:
    return GatewayError(400, f"Request body is not valid JSON: {clip(detail)}", code="invalid_json")


def model_required() -> GatewayError:
    return GatewayError(400, "`model` is required", code="model_required", param="model")


def model_not_found(model: str) -> GatewayError:
    return GatewayError(
        404, f"The model {clip(model)} does not exist.", code="model_not_found", param="model"
    )


def unknown_strategy(name: str, valid: list[str], header: str) -> GatewayError:
    return GatewayError(
        400,
        f"Unknown routing strategy '{clip(name, 64)}'. Valid strategies: {', '.join(valid)}",
        code="unknown_routing_strategy",
        param=header,
    )


def invalid_strategy(detail: str, header: str) -> GatewayError:
    return GatewayError(
        400,
        f"Invalid {header} header: {clip(detail)}",
        code="invalid_routing_strategy",
        param=header,
    )


def no_ready_pod(model: str, retry_after: int) -> GatewayError:
    return GatewayError(
        503,
        f"No ready pod serves model {clip(model)}; retry later.",
        type="service_unavailable_error",
        code="no_ready_pod",
        retry_after=retry_after,
    )


def adapter_not_loaded(adapter: str, base: str, retry_after: int) -> GatewayError:
    return GatewayError(
        503,
        f"LoRA adapter {clip(adapter)} is not loaded on any ready pod of {base}; retry later.",
        type="service_unavailable_error",
        code="adapter_not_loaded",
        retry_after=retry_after,
    )


def no_endpoint_in_subset(retry_after: int) -> GatewayError:
    return GatewayError(
        503,
        "None of the endpoints the gateway allows for this request is ready; retry later.",
        type="service_unavailable_error",
        code="no_ready_endpoint",
        retry_after=retry_after,
    )


def body_too_large(limit: int) -> GatewayError:
    return GatewayError(
        413,
        f"Request body is larger than the {limit}-byte limit.",
        code="request_too_large",
    )


def rate_limited(user: str, kind: str, limit: int, retry_after: int) -> GatewayError:
    """``kind`` is ``RPM`` or ``TPM``. Message and integer code are the seed deployment's; the
    type is OpenAI's for rate limits (``requests`` or ``tokens``)."""
    return GatewayError(
        429,
        f"user: {clip(user)} has exceeded {kind}: {limit}",
        type="requests" if kind == "RPM" else "tokens",
        code=429,
        retry_after=retry_after,
    )


def unknown_user(user: str, header: str) -> GatewayError:
    return GatewayError(
        401,
        f"user: {clip(user)} is not registered",
        type="authentication_error",
        code="unknown_user",
        param=header,
    )


def limits_unavailable(retry_after: int) -> GatewayError:
    return GatewayError(
        503,
        "Rate limits cannot be checked right now; retry later.",
        type="service_unavailable_error",
        code="rate_limits_unavailable",
        retry_after=retry_after,
    )


def internal(request_id: str) -> GatewayError:
    return GatewayError(
        500,
        f"The gateway failed to process request {clip(request_id)}; it has been logged.",
        type="server_error",
        code="internal_error",
    )


def method_not_allowed(method: str, path: str) -> GatewayError:
    return GatewayError(
        405,
        f"Method {clip(method, 16)} is not allowed on {clip(path, 64)}; use POST.",
        code="method_not_allowed",
        allow="POST",
    )


def path_not_found(path: str) -> GatewayError:
    return GatewayError(
        404, f"No inference endpoint at {clip(path, 128)}.", code="not_found", param="path"
    )
