"""OpenAI-compatible request parsing, response shapes and error bodies, as vLLM 0.32 emits
them (field for field, in its order)."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

SYSTEM_FINGERPRINT_PREFIX = "vllm-0.32.0-"


class ApiError(Exception):
    """An error answered in OpenAI's ``{"error": {...}}`` shape."""

    def __init__(self, status: int, message: str, err_type: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type
        self.param = param

    def response(self) -> web.Response:
        return error_response(self.status, self.message, self.err_type, self.param)


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, "BadRequestError", param)


def bad_parameter(message: str, param: str, value: Any = None) -> ApiError:
    """vLLM's 400 for a bad value: the parameter (and value) appended to the message."""
    suffix = f"parameter={param}" if value is None else f"parameter={param}, value={value}"
    return bad_request(f"{message} ({suffix})", param)


def validation_error(errors: list[dict[str, Any]]) -> ApiError:
    """FastAPI's request-validation 400 as vLLM words it (pydantic errors, Python repr)."""
    count = len(errors)
    lines = "".join(f"\n  {error!r}" for error in errors)
    message = f"{count} validation error{'s' if count > 1 else ''}:{lines}"
    return ApiError(400, message, "Bad Request", str(errors[0]["loc"]))


def missing_fields(body: Mapping[str, Any], *names: str) -> ApiError:
    """The validation error for required fields absent from ``body``."""
    size = f"<dict of {len(body)} items>"
    return validation_error(
        [
            {"type": "missing", "loc": f"body.{name}", "msg": "Field required", "input": size}
            for name in names
        ]
    )


def invalid_json(raw: bytes) -> ApiError:
    """The validation error FastAPI gives for a body that is not JSON."""
    try:
        json.loads(raw)
    except ValueError as exc:
        position = getattr(exc, "pos", 0)
        reason = getattr(exc, "msg", str(exc))
    else:  # orjson refused what json takes (e.g. NaN): report it at the start
        position, reason = 0, "Invalid JSON"
    return validation_error(
        [
            {
                "type": "json_invalid",
                "loc": f"body.{position}",
                "msg": "JSON decode error",
                "input": "<dict of 0 items>",
                "ctx": {"error": reason},
            }
        ]
    )


def model_not_found(model: str, served: str) -> ApiError:
    return ApiError(
        404,
        f"The model `{model}` does not exist. Valid aliases: {served}.",
        "NotFoundError",
        "model",
    )


def error_response(
    status: int, message: str, err_type: str, param: str | None = None
) -> web.Response:
    body = {"error": {"message": message, "type": err_type, "param": param, "code": status}}
    return json_response(body, status=status)


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def not_found_response() -> web.Response:
    return json_response({"detail": "Not Found"}, status=404)


def method_not_allowed_response() -> web.Response:
    return json_response({"detail": "Method Not Allowed"}, status=405)


def new_id(prefix: str, sep: str = "-") -> str:
    """vLLM's ids: the endpoint's prefix and 16 random hex digits."""
    return f"{prefix}{sep}{secrets.token_hex(8)}"


def request_id(request: web.Request, prefix: str, body_id: Any = None, sep: str = "-") -> str:
    """The response id: the client's ``x-request-id`` (else the body's ``request_id``, else a
    random one) behind the endpoint's prefix, as vLLM names its requests."""
    base = request.headers.get("x-request-id")
    if not base and isinstance(body_id, str) and body_id:
        base = body_id
    return f"{prefix}{sep}{base}" if base else new_id(prefix, sep)


def sse_response() -> web.StreamResponse:
    return web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})


@dataclass(frozen=True, slots=True)
class GenerationOptions:
    """The request fields the simulator honours."""

    model: str | None
    max_tokens: int | None
    stream: bool
    include_usage: bool
    continuous_usage: bool


def generation_options(
    body: Mapping[str, Any], *, chat: bool, max_model_len: int
) -> GenerationOptions:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_request("model must be a string", "model")
    raw = body.get("max_completion_tokens") if chat else None
    if raw is None:
        raw = body.get("max_tokens")
    if raw is not None:
        if not isinstance(raw, int) or isinstance(raw, bool):
            raise bad_request("max_tokens must be an integer", "max_tokens")
        if raw < 1:
            raise bad_parameter(f"max_tokens must be at least 1, got {raw}.", "max_tokens", raw)
        if raw > max_model_len:
            raise bad_parameter(
                f"max_tokens={raw} cannot be greater than max_model_len={max_model_len}. "
                "Please request fewer output tokens.",
                "max_tokens",
                raw,
            )
    stream = bool(body.get("stream", False))
    options = body.get("stream_options") or {}
    if not isinstance(options, Mapping):
        raise bad_request("stream_options must be an object", "stream_options")
    if options and not stream:
        raise bad_parameter(
            "Stream options can only be defined when `stream=True`.", "stream_options"
        )
    return GenerationOptions(
        model=model,
        max_tokens=raw,
        stream=stream,
        include_usage=bool(options.get("include_usage", False)),
        continuous_usage=bool(options.get("continuous_usage_stats", False)),
    )


def usage(prompt: int, completion: int, cached: int | None = None) -> dict[str, Any]:
    """A non-streamed answer's usage (``prompt_tokens_details`` only when enabled)."""
    return {
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "completion_tokens": completion,
        "prompt_tokens_details": None if cached is None else {"cached_tokens": cached},
        "completion_tokens_details": None,
    }


def stream_usage(prompt: int, completion: int, cached: int | None = None) -> dict[str, Any]:
    """A stream's usage: the details only when enabled, else absent."""
    body: dict[str, Any] = {
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "completion_tokens": completion,
    }
    if cached is not None:
        body["prompt_tokens_details"] = {"cached_tokens": cached}
    return body


def chat_completion(
    rid: str,
    model: str,
    text: str,
    reason: str,
    usage_body: dict[str, Any],
    fingerprint: str,
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": text,
                    "refusal": None,
                    "annotations": None,
                    "audio": None,
                    "function_call": None,
                    "reasoning": None,
                },
                "logprobs": None,
                "finish_reason": reason,
                "stop_reason": None,
                "token_ids": None,
                "routed_experts": None,
            }
        ],
        "service_tier": None,
        "system_fingerprint": fingerprint,
        "usage": usage_body,
        "prompt_logprobs": None,
        "prompt_token_ids": None,
        "prompt_text": None,
        "kv_transfer_params": None,
        "ec_transfer_params": None,
        "metrics": None,
    }


def text_completion(
    rid: str,
    model: str,
    text: str,
    reason: str,
    usage_body: dict[str, Any],
    fingerprint: str,
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": reason,
                "stop_reason": None,
                "token_ids": None,
                "prompt_logprobs": None,
                "prompt_token_ids": None,
                "routed_experts": None,
            }
        ],
        "service_tier": None,
        "system_fingerprint": fingerprint,
        "usage": usage_body,
        "kv_transfer_params": None,
        "ec_transfer_params": None,
        "metrics": None,
    }


class ChunkWriter:
    """Builds the SSE ``data:`` lines of one streamed response."""

    def __init__(self, rid: str, model: str, fingerprint: str, *, chat: bool) -> None:
        self.rid = rid
        self.model = model
        self.fingerprint = fingerprint
        self.chat = chat
        self.created = int(time.time())
        self.object = "chat.completion.chunk" if chat else "text_completion"

    def _envelope(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.rid,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def role(self) -> dict[str, Any]:
        choice = {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
        chunk = self._envelope([choice])
        chunk["prompt_token_ids"] = None
        chunk["prompt_text"] = None
        return chunk

    def token(self, text: str, reason: str | None) -> dict[str, Any]:
        choice: dict[str, Any]
        if self.chat:
            choice = {
                "index": 0,
                "delta": {"content": text},
                "logprobs": None,
                "finish_reason": reason,
            }
            if reason is not None:
                choice["stop_reason"] = None
        else:
            choice = {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": reason,
                "stop_reason": None,
                "prompt_token_ids": None,
            }
        choice["token_ids"] = None
        return self._envelope([choice])

    def usage(self, usage_body: dict[str, Any]) -> dict[str, Any]:
        chunk = self._envelope([])
        chunk["usage"] = usage_body
        chunk["system_fingerprint"] = self.fingerprint
        return chunk

    @staticmethod
    def encode(chunk: Mapping[str, Any]) -> bytes:
        return b"data: " + orjson.dumps(chunk) + b"\n\n"


DONE = b"data: [DONE]\n\n"
