"""A deterministic, file-free tokenizer and chat template.

Routing quality depends on prompt *lengths* and shared *prefixes*, not on real vocabularies, so
fixed-width byte chunks hashed into a vocabulary are enough: identical text prefixes give
identical token prefixes on every pod and in every process. The chat template's markup is
tokenized with the messages, so prompts cost what the template adds, as on a real model.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

#: Four-byte pieces the simulated model "generates"; one per output token.
_WORDS = (" the", " sim", " kv ", " pod", " gpu", " and", " tok", " run",
          " map", " set", " row", " key", " hit", " new", " old", " end")  # fmt: skip

UNK_TOKEN_ID = 0
BOS_TOKEN_ID = 1
EOS_TOKEN_ID = 2
FIRST_PIECE_ID = 3
"""Ids below this are special tokens; text pieces and generated tokens use the rest."""
SPECIAL_TOKENS = {UNK_TOKEN_ID: "<unk>", BOS_TOKEN_ID: "<s>", EOS_TOKEN_ID: "</s>"}


class Tokenizer:
    """UTF-8 bytes cut into ``chars_per_token``-byte pieces, ids by CRC32 into the vocab.

    Like a real model's tokenizer it has a BOS token, which prompts start with (vLLM's
    ``add_special_tokens``). It remembers the piece behind every id it has produced, so
    ``/detokenize`` can turn ids back into text; ids it never produced decode as generated
    words.
    """

    def __init__(self, chars_per_token: int = 4, vocab_size: int = 32000) -> None:
        self.chars_per_token = chars_per_token
        self.vocab_size = vocab_size
        self._pieces: dict[int, bytes] = {}

    def encode(self, text: str) -> list[int]:
        """The text's pieces, no special tokens."""
        data = text.encode("utf-8")
        step = self.chars_per_token
        span = self.vocab_size - FIRST_PIECE_ID
        crc = zlib.crc32
        pieces = [data[i : i + step] for i in range(0, len(data), step)]
        ids = [FIRST_PIECE_ID + crc(piece) % span for piece in pieces]
        self._pieces.update(zip(ids, pieces, strict=True))
        return ids

    def encode_prompt(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """A prompt as vLLM tokenizes it: BOS first unless ``add_special_tokens`` is off."""
        ids = self.encode(text)
        return [BOS_TOKEN_ID, *ids] if add_special_tokens else ids

    def piece(self, token_id: int) -> bytes:
        special = SPECIAL_TOKENS.get(token_id)
        if special is not None:
            return special.encode()
        known = self._pieces.get(token_id)
        return known if known is not None else self.decode_output(token_id).encode()

    def decode(self, ids: Iterable[int]) -> str:
        return b"".join(self.piece(t) for t in ids).decode("utf-8", errors="replace")

    def token_strs(self, ids: Iterable[int]) -> list[str]:
        return [self.piece(t).decode("utf-8", errors="replace") for t in ids]

    @staticmethod
    def output_token(previous: int, index: int, vocab_size: int) -> int:
        """The id of generated token ``index``: a cheap deterministic walk from the prompt."""
        span = vocab_size - FIRST_PIECE_ID
        return FIRST_PIECE_ID + (previous * 1103515245 + 12345 + index * 2654435761) % span

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


def prompt_token_ids(
    prompt: Any, tokenizer: Tokenizer, add_special_tokens: bool = True
) -> list[int]:
    """Token ids for a completions ``prompt``: string, list of strings (first used), ids,
    or list of id lists (first used). Text gets BOS; ids are taken as they are."""
    if isinstance(prompt, str):
        return tokenizer.encode_prompt(prompt, add_special_tokens)
    if isinstance(prompt, list) and prompt:
        if is_token_ids(prompt):
            return list(prompt)
        first = prompt[0]
        if isinstance(first, str):
            return tokenizer.encode_prompt(first, add_special_tokens)
        if is_token_ids(first):
            return list(first)
    raise ValueError("prompt must be a string, a list of strings, or token ids")


def as_token_batches(value: Any, tokenizer: Tokenizer) -> Sequence[list[int]]:
    """Every input of an embeddings request as token ids (one list per input)."""
    if isinstance(value, str):
        return [tokenizer.encode_prompt(value)]
    if isinstance(value, list) and value:
        if is_token_ids(value):
            return [list(value)]
        batches: list[list[int]] = []
        for item in value:
            if isinstance(item, str):
                batches.append(tokenizer.encode_prompt(item))
            elif is_token_ids(item):
                batches.append(list(item))
            else:
                raise ValueError("input items must be strings or token id lists")
        return batches
    raise ValueError("input must be a string, a list of strings, or token ids")
