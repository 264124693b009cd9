"""Turning a prompt into tokens for prefix hashing: ``character``, ``hf`` or ``remote``.

The result is a packed ``TokenStream`` (bytes plus the width of one token), which is all the
approximate index's hashing needs, and, when the tokens are the pod's own (``pod_ids``), the
token ids exact matching hashes the way the pod does:

- ``character``: UTF-8 bytes. Chat prompts are serialised message by message with their roles
  and lengths, so the encoding is injective and prefix-preserving (a conversation's stream
  starts with the stream of any of its earlier states). Never the pod's tokens, except for
  prompts given as token ids.
- ``hf``: the model's ``tokenizer.json``; with the ``chat_template`` of the
  ``tokenizer_config.json`` beside it, a chat is rendered the way vLLM renders it (generation
  prompt, BOS from the template) and a completion prompt gets the tokenizer's special tokens:
  the pod's tokens.
- ``remote``: the pod's own ``/tokenize``: the pod's tokens by definition.
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
    pod_ids: Sequence[int] | None = None
    """The token ids a vLLM pod computes for this prompt, when known."""


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
            return token_id_stream(request.token_ids, self.name)
        return TokenStream(prompt_text(request).encode(), 1, self.name)

    async def tokenize(self, model: str, request: InferenceRequest) -> TokenStream:
        return self.encode(request)

    async def close(self) -> None:
        return None


class HfTokenizer:
    """A local ``tokenizer.json`` per model through the ``tokenizers`` library, with the
    model's chat template when its ``tokenizer_config.json`` has one.

    Without a template, chat turns are encoded one by one and concatenated (a private
    serialisation: good for the approximate index, never the pod's tokens).
    """

    name = "hf"

    def __init__(self, files: Mapping[str, Path]) -> None:
        self._models = {model: _HfModel(path) for model, path in files.items()}
        self._fallback = CharacterTokenizer()

    async def tokenize(self, model: str, request: InferenceRequest) -> TokenStream:
        if request.token_ids is not None:
            return token_id_stream(request.token_ids, self.name)
        hf = self._models.get(model) or self._models.get("*")
        if hf is None:
            return self._fallback.encode(request)
        ids, exact = hf.encode(request)
        return TokenStream(pack_ids(ids), TOKEN_ID_WIDTH, self.name, ids if exact else None)

    async def close(self) -> None:
        return None


class _HfModel:
    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer as HfModel

        self.tokenizer = HfModel.from_file(str(path))
        self.template = None
        self.specials: dict[str, str] = {}
        config_file = path.with_name("tokenizer_config.json")
        config = orjson.loads(config_file.read_bytes()) if config_file.is_file() else {}
        template = _chat_template(path.with_name("chat_template.jinja"), config)
        if template is not None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            environment.globals["raise_exception"] = _template_error
            self.template = environment.from_string(template)
        if isinstance(config, dict):
            for key in ("bos_token", "eos_token"):
                value = config.get(key)
                if isinstance(value, dict):
                    value = value.get("content")
                if isinstance(value, str):
                    self.specials[key] = value

    def encode(self, request: InferenceRequest) -> tuple[list[int], bool]:
        """The prompt's ids, and whether they are the pod's."""
        if request.messages is None:
            return self.tokenizer.encode(request.text or "", add_special_tokens=True).ids, True
        if self.template is not None:
            text = self.template.render(
                messages=[{"role": r, "content": c} for r, c in request.messages],
                add_generation_prompt=True,
                **self.specials,
            )
            return self.tokenizer.encode(text, add_special_tokens=False).ids, True
        texts = [message_text(role, content) for role, content in request.messages]
        ids: list[int] = []
        for encoding in self.tokenizer.encode_batch(texts, add_special_tokens=False):
            ids.extend(encoding.ids)
        return ids, False


def _chat_template(file: Path, config: object) -> str | None:
    """The model's default chat template as vLLM finds it: ``chat_template.jinja`` beside the
    tokenizer (what recent transformers save), else ``tokenizer_config.json``'s
    ``chat_template`` (a string, or a list of named templates)."""
    if file.is_file():
        return file.read_text()
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _template_error(message: str) -> None:
    raise ValueError(f"chat template: {message}")


def token_id_stream(ids: Sequence[int], source: str) -> TokenStream:
    """A prompt given as token ids: the pod uses them as they are."""
    return TokenStream(pack_ids(ids), TOKEN_ID_WIDTH, source, ids)


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
        self._cache: OrderedDict[tuple[str, int], list[int]] = OrderedDict()
        self._cache_size = cache_size
        self._fallback = CharacterTokenizer()
        self._session: aiohttp.ClientSession | None = None

    async def tokenize(self, model: str, request: InferenceRequest) -> TokenStream:
        if request.token_ids is not None:
            return token_id_stream(request.token_ids, self.name)
        text = prompt_text(request)
        key = (model, xxhash.xxh64_intdigest(text.encode()))
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return TokenStream(pack_ids(cached), TOKEN_ID_WIDTH, self.name, cached)
        ids = await self._remote(model, request, text)
        if ids is None:
            return self._fallback.encode(request)
        self._cache[key] = ids
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return TokenStream(pack_ids(ids), TOKEN_ID_WIDTH, self.name, ids)

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
