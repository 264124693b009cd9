"""OpenAI-compatible request parsing and response shapes, as vLLM's server emits them."""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web


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


def error_response(
    status: int, message: str, err_type: str, param: str | None = None
) -> web.Response:
    body = {"error": {"message": message, "type": err_type, "param": param, "code": status}}
    return json_response(body, status=status)


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(16)}"


@dataclass(frozen=True, slots=True)
class GenerationOptions:
    """The request fields the simulator honours."""

    model: str | None
    max_tokens: int | None
    stream: bool
    include_usage: bool
    continuous_usage: bool


def generation_options(body: Mapping[str, Any], *, chat: bool) -> GenerationOptions:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_request("model must be a string", "model")
    raw = body.get("max_completion_tokens") if chat else None
    if raw is None:
        raw = body.get("max_tokens")
    if raw is not None and (not isinstance(raw, int) or isinstance(raw, bool) or raw < 1):
        raise bad_request("max_tokens must be a positive integer", "max_tokens")
    stream = bool(body.get("stream", False))
    options = body.get("stream_options") or {}
    if not isinstance(options, Mapping):
        raise bad_request("stream_options must be an object", "stream_options")
    if options and not stream:
        raise bad_request(
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
    body: dict[str, Any] = {
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "completion_tokens": completion,
        "prompt_tokens_details": None if cached is None else {"cached_tokens": cached},
    }
    return body


def chat_completion(
    rid: str, model: str, text: str, reason: str, usage_body: dict[str, Any]
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
                    "reasoning_content": None,
                    "content": text,
                    "tool_calls": [],
                },
                "logprobs": None,
                "finish_reason": reason,
                "stop_reason": None,
            }
        ],
        "usage": usage_body,
        "prompt_logprobs": None,
    }


def text_completion(
    rid: str, model: str, text: str, reason: str, usage_body: dict[str, Any]
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
                "prompt_logprobs": None,
            }
        ],
        "usage": usage_body,
    }


class ChunkWriter:
    """Builds the SSE ``data:`` lines of one streamed response."""

    def __init__(self, rid: str, model: str, *, chat: bool) -> None:
        self.rid = rid
        self.model = model
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
        return self._envelope([choice])

    def token(self, text: str, reason: str | None) -> dict[str, Any]:
        choice: dict[str, Any]
        if self.chat:
            choice = {
                "index": 0,
                "delta": {"content": text},
                "logprobs": None,
                "finish_reason": reason,
            }
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        if reason is not None:
            choice["stop_reason"] = None
        return self._envelope([choice])

    def usage(self, usage_body: dict[str, Any]) -> dict[str, Any]:
        chunk = self._envelope([])
        chunk["usage"] = usage_body
        return chunk

    @staticmethod
    def encode(chunk: Mapping[str, Any]) -> bytes:
        return b"data: " + orjson.dumps(chunk) + b"\n\n"


DONE = b"data: [DONE]\n\n"
