"""Turning a prompt into tokens for prefix hashing: ``character``, ``hf`` or ``remote``.

The result is a packed ``TokenStream`` (bytes plus the width of one token), which is all
``prefix_hashing`` needs. Chat prompts are serialised message by message with their roles and
lengths, so the encoding is injective (two different conversations never produce the same
stream) and prefix-preserving (a conversation's stream starts with the stream of any of its
earlier states), which is what makes multi-turn chats find their history in the index.
"""

from __future__ import annotations

import array
import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import aiohttp
import orjson
import xxhash

from extproc.routing.openai_request import InferenceRequest

log = logging.getLogger(__name__)

TOKEN_ID_WIDTH = 4


@dataclass(frozen=True, slots=True)
class TokenStream:
    data: bytes
    width: int
    """Bytes per token: 1 for UTF-8 characters, 4 for packed token ids."""
    source: str
    """The tokenizer that produced it (``character`` after a ``remote`` fallback)."""


def pack_ids(ids: Sequence[int]) -> bytes:
    return array.array("I", (i & 0xFFFFFFFF for i in ids)).tobytes()


def message_text(role: str, content: str) -> str:
    """One chat turn: ``<role> <length>:<content>``, so turns cannot run into each other."""
    return f"<{role}> {len(content)}:{content}\n"


def prompt_text(request: InferenceRequest) -> str:
    if request.messages is not None:
        return "".join(message_text(role, content) for role, content in request.messages)
    return request.text or ""


class Tokenizer(Protocol):
    name: str

    async def tokenize(self, model: str, request: InferenceRequest) -> TokenStream: ...

    async def close(self) -> None: ...


class CharacterTokenizer:
    """UTF-8 bytes: no files, no model knowledge, and prefix-exact by construction."""

    name = "character"

    def encode(self, request: InferenceRequest) -> TokenStream:
        if request.token_ids is not None:
            return TokenStream(pack_ids(request.token_ids), TOKEN_ID_WIDTH, self.name)
        return TokenStream(prompt_text(request).encode(), 1, self.name)

    async def tokenize(self, model: str, request: InferenceRequest) -> TokenStream:
        return self.encode(request)

    async def close(self) -> None:
        return None


class HfTokenizer:
    """A local ``tokenizer.json`` per model through the ``tokenizers`` library.

    Chat turns are encoded one by one and concatenated, so adding a turn never changes the
    tokens of the turns before it (encoding the joined text could merge across the boundary).
    """

    name = "hf"

    def __init__(self, files: Mapping[str, Path]) -> None:
        from tokenizers import Tokenizer as HfModel

        self._models = {model: HfModel.from_file(str(path)) for model, path in files.items()}
        self._fallback = CharacterTokenizer()

    async def tokenize(self, model: str, request: InferenceRequest) -> TokenStream:
        if request.token_ids is not None:
            return TokenStream(pack_ids(request.token_ids), TOKEN_ID_WIDTH, self.name)
        hf = self._models.get(model) or self._models.get("*")
        if hf is None:
            return self._fallback.encode(request)
        if request.messages is not None:
            texts = [message_text(role, content) for role, content in request.messages]
        else:
            texts = [request.text or ""]
        ids: list[int] = []
        for encoding in hf.encode_batch(texts, add_special_tokens=False):
            ids.extend(encoding.ids)
        return TokenStream(pack_ids(ids), TOKEN_ID_WIDTH, self.name)

    async def close(self) -> None:
        return None


PodUrl = Callable[[str], str | None]
"""Model -> base URL of a ready pod serving it (``None`` when there is none)."""


class RemoteTokenizer:
    """The pod's own vLLM ``/tokenize``: exact tokens, one HTTP call per new prompt.

    Results are cached (LRU by prompt hash). A call that fails or exceeds ``timeout`` falls
    back to the character tokenizer for that request, and is counted by the caller.
    """

    name = "remote"

    def __init__(self, pod_url: PodUrl, timeout: float, cache_size: int = 4096) -> None:
        self._pod_url = pod_url
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._cache: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._cache_size = cache_size
        self._fallback = CharacterTokenizer()
        self._session: aiohttp.ClientSession | None = None

    async def tokenize(self, model: str, request: InferenceRequest) -> TokenStream:
        if request.token_ids is not None:
            return TokenStream(pack_ids(request.token_ids), TOKEN_ID_WIDTH, self.name)
        text = prompt_text(request)
        key = (model, xxhash.xxh64_intdigest(text.encode()))
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return TokenStream(cached, TOKEN_ID_WIDTH, self.name)
        ids = await self._remote(model, request, text)
        if ids is None:
            return self._fallback.encode(request)
        packed = pack_ids(ids)
        self._cache[key] = packed
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return TokenStream(packed, TOKEN_ID_WIDTH, self.name)

    async def _remote(self, model: str, request: InferenceRequest, text: str) -> list[int] | None:
        base = self._pod_url(model)
        if base is None:
            return None
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        body: dict[str, object] = {"model": model}
        if request.messages is not None:
            body["messages"] = [{"role": r, "content": c} for r, c in request.messages]
        else:
            body["prompt"] = text
        try:
            async with self._session.post(
                f"{base}/tokenize",
                data=orjson.dumps(body),
                headers={"content-type": "application/json"},
            ) as resp:
                if resp.status != 200:
                    return None
                tokens = orjson.loads(await resp.read()).get("tokens")
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError, AttributeError):
            return None
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            return None
        return tokens

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
