"""The OpenAI Responses API (``/v1/responses``) as vLLM serves it: request input to chat
messages, the response object, and the typed stream events."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import orjson

from .protocol import bad_request, missing_fields, new_id


def input_messages(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``instructions`` plus ``input`` (a string or a list of messages) as chat messages."""
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions:
        messages.append({"role": "system", "content": instructions})
    raw = body.get("input")
    if isinstance(raw, str):
        messages.append({"role": "user", "content": raw})
    elif isinstance(raw, list) and raw:
        for item in raw:
            if not isinstance(item, Mapping):
                raise bad_request("input items must be objects", "input")
            content = item.get("content")
            if isinstance(content, list):
                content = [
                    {"type": "text", "text": part.get("text", "")}
                    for part in content
                    if isinstance(part, Mapping) and "text" in part
                ]
            messages.append({"role": str(item.get("role", "user")), "content": content})
    elif raw is None:
        raise missing_fields(body, "input")
    else:
        raise bad_request("input must be a string or a non-empty list of messages", "input")
    return messages


def max_output_tokens(body: Mapping[str, Any]) -> int | None:
    raw = body.get("max_output_tokens")
    if raw is not None and (not isinstance(raw, int) or isinstance(raw, bool) or raw < 1):
        raise bad_request("max_output_tokens must be a positive integer", "max_output_tokens")
    return raw


def _usage(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    return {
        "input_tokens": prompt,
        "input_tokens_details": {
            "cached_tokens": cached,
            "cache_write_tokens": 0,
            "input_tokens_per_turn": [],
            "cached_tokens_per_turn": [],
        },
        "output_tokens": completion,
        "output_tokens_details": {
            "reasoning_tokens": 0,
            "tool_output_tokens": 0,
            "output_tokens_per_turn": [],
            "tool_output_tokens_per_turn": [],
        },
        "total_tokens": prompt + completion,
    }


def _text_part(text: str, logprobs: list[Any] | None) -> dict[str, Any]:
    return {"annotations": [], "text": text, "type": "output_text", "logprobs": logprobs}


class ResponseBuilder:
    """The response object of one request, in its states, and its stream events (each a
    ``event: <type>`` line and a ``data:`` line, keys in the OpenAI types' order)."""

    def __init__(
        self, rid: str, model: str, body: Mapping[str, Any], max_tokens: int | None
    ) -> None:
        self.rid = rid
        self.msg_id = new_id("msg", "_")
        self.model = model
        self.body = body
        self.max_tokens = max_tokens
        self.created = int(time.time())
        self._sequence = 0
        self._opened = False

    def message(self, text: str | None, status: str) -> dict[str, Any]:
        return {
            "id": self.msg_id,
            "content": [] if text is None else [_text_part(text, None)],
            "role": "assistant",
            "status": status,
            "type": "message",
            "phase": None,
        }

    def response(
        self,
        status: str,
        output: list[dict[str, Any]],
        usage: tuple[int, int, int] | None = None,
        finish_reason: str | None = None,
    ) -> dict[str, Any]:
        incomplete = None
        if finish_reason == "length":
            status = "incomplete"
            incomplete = {"reason": "max_output_tokens"}
        body = self.body
        return {
            "id": self.rid,
            "created_at": self.created,
            "incomplete_details": incomplete,
            "instructions": body.get("instructions"),
            "metadata": body.get("metadata"),
            "model": self.model,
            "object": "response",
            "output": output,
            "parallel_tool_calls": True,
            "temperature": float(body.get("temperature", 1.0)),
            "tool_choice": "none",
            "tools": [],
            "top_p": float(body.get("top_p", 1.0)),
            "background": False,
            "max_output_tokens": self.max_tokens,
            "max_tool_calls": None,
            "previous_response_id": body.get("previous_response_id"),
            "prompt": None,
            "reasoning": None,
            "service_tier": "auto",
            "status": status,
            "text": None,
            "top_logprobs": None,
            "truncation": "disabled",
            "usage": None if usage is None else _usage(*usage),
            "user": None,
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
            "kv_transfer_params": None,
            "ec_transfer_params": None,
            "input_messages": None,
            "output_messages": None,
        }

    def final(self, text: str, finish_reason: str, usage: tuple[int, int, int]) -> dict[str, Any]:
        return self.response("completed", [self.message(text, "completed")], usage, finish_reason)

    # -- stream --------------------------------------------------------------------------------

    def event(self, kind: str, fields: dict[str, Any]) -> bytes:
        """One event; ``fields`` in alphabetical order, as the OpenAI types declare them."""
        payload = dict(sorted({**fields, "sequence_number": self._sequence, "type": kind}.items()))
        self._sequence += 1
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"

    def opening(self) -> bytes:
        """``response.created`` and ``response.in_progress``, sent before any output."""
        return self.event(
            "response.created", {"response": self.response("in_progress", [])}
        ) + self.event("response.in_progress", {"response": self.response("in_progress", [])})

    def delta(self, text: str) -> bytes:
        """A text delta; the first also opens the message item and its content part."""
        opened = b""
        if not self._opened:
            self._opened = True
            opened = self.event(
                "response.output_item.added",
                {"item": self.message(None, "in_progress"), "output_index": 0},
            ) + self.event(
                "response.content_part.added",
                {
                    "content_index": 0,
                    "item_id": self.msg_id,
                    "output_index": 0,
                    "part": _text_part("", []),
                },
            )
        return opened + self.event(
            "response.output_text.delta",
            {
                "content_index": 0,
                "delta": text,
                "item_id": self.msg_id,
                "logprobs": [],
                "output_index": 0,
            },
        )

    def closing(self, text: str, finish_reason: str, usage: tuple[int, int, int]) -> bytes:
        position = {"content_index": 0, "item_id": self.msg_id, "output_index": 0}
        return b"".join(
            [
                self.event("response.output_text.done", {**position, "logprobs": [], "text": text}),
                self.event(
                    "response.content_part.done", {**position, "part": _text_part(text, None)}
                ),
                self.event(
                    "response.output_item.done",
                    {"item": self.message(text, "completed"), "output_index": 0},
                ),
                self.event(
                    "response.completed",
                    {"response": self.final(text, finish_reason, usage)},
                ),
            ]
        )
