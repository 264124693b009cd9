"""Parsing and validating OpenAI-style request bodies.

Only what routing needs is extracted (model, streaming, the prompt); the body itself is never
re-serialised, so what reaches the pod is byte-for-byte what the client sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import orjson

from extproc import errors


class Endpoint(StrEnum):
    CHAT = "chat"
    COMPLETIONS = "completions"
    EMBEDDINGS = "embeddings"
    RESPONSES = "responses"


INFERENCE_PATHS: dict[str, Endpoint] = {
    "/v1/chat/completions": Endpoint.CHAT,
    "/v1/completions": Endpoint.COMPLETIONS,
    "/v1/embeddings": Endpoint.EMBEDDINGS,
    "/v1/responses": Endpoint.RESPONSES,
}
MODELS_PATH = "/v1/models"
CHARS_PER_TOKEN = 4
"""Typical UTF-8 bytes per token of BPE vocabularies: the estimate when a prompt is not
tokenised."""


@dataclass(slots=True)
class InferenceRequest:
    """The routing-relevant part of one inference body.

    Exactly one of ``messages``, ``text`` and ``token_ids`` describes the prompt: chat turns as
    ``(role, text)`` pairs, a text prompt, or a prompt already tokenised by the client.
    """

    endpoint: Endpoint
    model: str
    stream: bool = False
    include_usage: bool = False
    stream_options: bool = False
    """The body has a ``stream_options`` object (possibly without ``include_usage``)."""
    max_tokens: int | None = None
    messages: list[tuple[str, str]] | None = None
    text: str | None = None
    token_ids: list[int] | None = None

    @property
    def prompt_chars(self) -> int:
        """Prompt size in characters (chat turns with their roles), cheap and approximate."""
        if self.messages is not None:
            return sum(len(role) + len(content) + 2 for role, content in self.messages)
        return len(self.text or "")

    @property
    def prompt_tokens(self) -> int:
        """Prompt size in tokens: exact for token ids, else ``prompt_chars / 4`` rounded up
        (the pipeline replaces it with the tokenizer's count when it tokenises)."""
        if self.token_ids is not None:
            return len(self.token_ids)
        return -(-self.prompt_chars // CHARS_PER_TOKEN)


def parse(endpoint: Endpoint, body: bytes) -> InferenceRequest:
    """Parse ``body`` for ``endpoint``; raise ``GatewayError`` (400) saying what is wrong."""
    if not body:
        raise errors.invalid_json("the body is empty")
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise errors.invalid_json(str(exc)) from None
    if not isinstance(document, dict):
        raise errors.bad_request(
            f"Request body must be a JSON object, not {_json_type(document)}.", code="invalid_body"
        )
    model = document.get("model")
    if model is None or model == "":
        raise errors.model_required()
    if not isinstance(model, str):
        raise _wrong_type("model", "a string", model)

    request = InferenceRequest(endpoint=endpoint, model=model)
    stream = document.get("stream")
    if stream is not None:
        if not isinstance(stream, bool):
            raise _wrong_type("stream", "a boolean", stream)
        request.stream = stream
    options = document.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise _wrong_type("stream_options", "an object", options)
        include = options.get("include_usage")
        if include is not None and not isinstance(include, bool):
            raise _wrong_type("stream_options.include_usage", "a boolean", include)
        request.include_usage = bool(include)
        request.stream_options = True
    for key in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        value = document.get(key)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise _wrong_type(key, "a non-negative integer", value)
        request.max_tokens = value

    if endpoint is Endpoint.CHAT:
        request.messages = _messages(document.get("messages"))
    elif endpoint is Endpoint.COMPLETIONS:
        _prompt(request, document.get("prompt"), "prompt", required=True)
    elif endpoint is Endpoint.EMBEDDINGS:
        _prompt(request, document.get("input"), "input", required=True)
    else:
        _responses_input(request, document.get("input"))
    return request


def _messages(value: Any) -> list[tuple[str, str]]:
    if value is None:
        raise errors.bad_request("`messages` is required", param="messages", code="missing_field")
    if not isinstance(value, list) or not value:
        raise errors.bad_request(
            "`messages` must be a non-empty array", param="messages", code="invalid_type"
        )
    turns: list[tuple[str, str]] = []
    for index, message in enumerate(value):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise _wrong_type(where, "an object", message)
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise errors.bad_request(
                f"`{where}.role` must be a non-empty string",
                param=f"{where}.role",
                code="invalid_type",
            )
        turns.append((role, _content_text(message.get("content"), f"{where}.content")))
    return turns


def _content_text(content: Any, where: str) -> str:
    """A message's text: a string, or the text parts of a content-part array, or nothing."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for index, part in enumerate(content):
            if not isinstance(part, dict):
                raise _wrong_type(f"{where}[{index}]", "an object", part)
            text = part.get("text")
            if isinstance(text, str):
                texts.append(text)
        return "\n".join(texts)
    raise _wrong_type(where, "a string or an array of content parts", content)


def _prompt(request: InferenceRequest, value: Any, name: str, *, required: bool) -> None:
    """A completion prompt / embedding input: string, strings, token ids, or lists of token ids.

    For a batch, the first element stands for the prompt: its prefix is what the pod will cache.
    """
    if value is None:
        if required:
            raise errors.bad_request(f"`{name}` is required", param=name, code="missing_field")
        return
    if isinstance(value, str):
        request.text = value
        return
    if isinstance(value, list) and value:
        first = value[0]
        if isinstance(first, str) and all(isinstance(item, str) for item in value):
            request.text = first
            return
        if _is_token_ids(value):
            request.token_ids = value
            return
        if isinstance(first, list) and all(_is_token_ids(item) for item in value):
            request.token_ids = first
            return
    raise errors.bad_request(
        f"`{name}` must be a string, an array of strings, an array of token ids, "
        "or an array of token-id arrays",
        param=name,
        code="invalid_type",
    )


def _responses_input(request: InferenceRequest, value: Any) -> None:
    """Responses API ``input``: a string or an array of input items (messages)."""
    if value is None or isinstance(value, str):
        request.text = value or ""
        return
    if not isinstance(value, list):
        raise _wrong_type("input", "a string or an array of input items", value)
    turns: list[tuple[str, str]] = []
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise _wrong_type(f"input[{index}]", "an object", item)
        role = item.get("role")
        content = item.get("content")
        turns.append(
            (
                role if isinstance(role, str) else str(item.get("type", "item")),
                _content_text(content, f"input[{index}].content") if content is not None else "",
            )
        )
    request.messages = turns


def _is_token_ids(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)
    )


def _wrong_type(name: str, expected: str, value: Any) -> errors.GatewayError:
    return errors.bad_request(
        f"`{name}` must be {expected}, not {_json_type(value)}", param=name, code="invalid_type"
    )


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


USAGE_REQUEST = b',"stream_options":{"include_usage":true}'
USAGE_ENDPOINTS = frozenset({Endpoint.CHAT, Endpoint.COMPLETIONS})


def with_usage_requested(body: bytes, request: InferenceRequest) -> bytes | None:
    """``body`` asking the pod to end its stream with a usage event, for a streamed request
    whose client did not ask for one (``None`` when nothing needs changing). Only
    ``stream_options`` changes; the rest of the body keeps its bytes unless the client sent
    ``stream_options`` of its own, which is then merged and the body written anew."""
    if not request.stream or request.include_usage or request.endpoint not in USAGE_ENDPOINTS:
        return None
    if request.stream_options:
        document = orjson.loads(body)
        document["stream_options"] = {**document["stream_options"], "include_usage": True}
        return orjson.dumps(document)
    end = body.rstrip().rfind(b"}")
    return body[:end] + USAGE_REQUEST + body[end:]
