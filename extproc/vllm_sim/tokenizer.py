"""A deterministic, file-free tokenizer and chat template.

Routing quality depends on prompt *lengths* and shared *prefixes*, not on real vocabularies, so
fixed-width byte chunks hashed into a vocabulary are enough: identical text prefixes give
identical token prefixes on every pod and in every process.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

#: Four-byte pieces the simulated model "generates"; one per output token.
_WORDS = (" the", " sim", " kv ", " pod", " gpu", " and", " tok", " run",
          " map", " set", " row", " key", " hit", " new", " old", " end")  # fmt: skip


class Tokenizer:
    """UTF-8 bytes cut into ``chars_per_token``-byte pieces, ids by CRC32 modulo the vocab."""

    def __init__(self, chars_per_token: int = 4, vocab_size: int = 32000) -> None:
        self.chars_per_token = chars_per_token
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        data = text.encode("utf-8")
        step = self.chars_per_token
        vocab = self.vocab_size
        crc = zlib.crc32
        return [crc(data[i : i + step]) % vocab for i in range(0, len(data), step)]

    def count(self, text: str) -> int:
        return -(-len(text.encode("utf-8")) // self.chars_per_token)

    @staticmethod
    def output_token(previous: int, index: int, vocab_size: int) -> int:
        """The id of generated token ``index``: a cheap deterministic walk from the prompt."""
        return (previous * 1103515245 + 12345 + index * 2654435761) % vocab_size

    @staticmethod
    def decode_output(token_id: int) -> str:
        return _WORDS[token_id % len(_WORDS)]


def message_text(content: Any) -> str:
    """Flatten OpenAI message content: a string, or a list of ``{"type": "text"}`` parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: list[str] = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, Mapping) and part.get("type") == "text":
                parts.append(str(part.get("text", "")))
        return "".join(parts)
    raise ValueError("message content must be a string or a list of content parts")


def render_chat(messages: Iterable[Any], *, add_generation_prompt: bool = True) -> str:
    """Render messages as ``<|role|>\\ncontent\\n`` blocks, ending with the assistant turn."""
    pieces: list[str] = []
    for message in messages:
        if not isinstance(message, Mapping):
            raise ValueError("each message must be an object")
        role = str(message.get("role", "user"))
        pieces.append(f"<|{role}|>\n{message_text(message.get('content'))}\n")
    if add_generation_prompt:
        pieces.append("<|assistant|>\n")
    return "".join(pieces)


def is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value
    )


def prompt_token_ids(prompt: Any, tokenizer: Tokenizer) -> list[int]:
    """Token ids for a completions ``prompt``: string, list of strings (first used), ids,
    or list of id lists (first used)."""
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    if isinstance(prompt, list) and prompt:
        if is_token_ids(prompt):
            return list(prompt)
        first = prompt[0]
        if isinstance(first, str):
            return tokenizer.encode(first)
        if is_token_ids(first):
            return list(first)
    raise ValueError("prompt must be a string, a list of strings, or token ids")


def as_token_batches(value: Any, tokenizer: Tokenizer) -> Sequence[list[int]]:
    """Every input of an embeddings request as token ids (one list per input)."""
    if isinstance(value, str):
        return [tokenizer.encode(value)]
    if isinstance(value, list) and value:
        if is_token_ids(value):
            return [list(value)]
        batches: list[list[int]] = []
        for item in value:
            if isinstance(item, str):
                batches.append(tokenizer.encode(item))
            elif is_token_ids(item):
                batches.append(list(item))
            else:
                raise ValueError("input items must be strings or token id lists")
        return batches
    raise ValueError("input must be a string, a list of strings, or token ids")
