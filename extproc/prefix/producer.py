"""The prefix producer: tokenise the prompt, hash its blocks, look them up in the index, and
record where the request went.

Strategies see only the result (``RoutingContext.prefix``); the I/O (a remote tokenizer) and
the mutable index live here. It also makes the prompt's token count exact when the tokenizer
produced real tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from extproc.config import PrefixSettings
from extproc.fleet.registry import PodRegistry
from extproc.prefix.hashing import block_hashes
from extproc.prefix.index import PrefixIndex
from extproc.prefix.tokenizers import (
    TOKEN_ID_WIDTH,
    CharacterTokenizer,
    HfTokenizer,
    RemoteTokenizer,
    Tokenizer,
)
from extproc.routing.openai_request import CHARS_PER_TOKEN, InferenceRequest
from extproc.routing.plans import Plan
from extproc.telemetry import Telemetry
from strategies.context import PREFIX, PrefixMatches, RoutingContext


@dataclass(frozen=True, slots=True)
class Hashed:
    hashes: list[int]
    block_tokens: int
    tokens: int | None
    """The prompt's exact token count, when the tokenizer produced real tokens."""


class PrefixProducer:
    key = PREFIX

    def __init__(
        self,
        settings: PrefixSettings,
        tokenizer: Tokenizer,
        index: PrefixIndex,
        telemetry: Telemetry,
    ) -> None:
        self.tokenizer = tokenizer
        self.index = index
        self._block_chars = settings.block_chars
        self._block_tokens = settings.block_tokens
        self._track_all = settings.track_all
        self._telemetry = telemetry

    def wanted(self, plan: Plan) -> bool:
        return self._track_all or PREFIX in plan.consumes

    async def prepare(self, request: InferenceRequest, *, dry_run: bool) -> Hashed:
        stream = await self.tokenizer.tokenize(request.model, request)
        if not dry_run and stream.source != self.tokenizer.name:
            self._telemetry.tokenizer_fallbacks.labels(self.tokenizer.name).inc()
        if stream.width == 1:
            block, block_tokens, tokens = (
                self._block_chars,
                self._block_chars // CHARS_PER_TOKEN,
                None,
            )
        else:
            block = block_tokens = self._block_tokens
            tokens = len(stream.data) // TOKEN_ID_WIDTH
        hashes = block_hashes(stream.data, stream.width, block, request.model)
        return Hashed(hashes, max(1, block_tokens), tokens)

    def fill(self, prepared: object, ctx: RoutingContext) -> None:
        assert isinstance(prepared, Hashed)
        names = [pod.name for pod in ctx.pods]
        matched, held = self.index.lookup(prepared.hashes, names)
        block = prepared.block_tokens
        ctx.prefix = PrefixMatches(
            block_tokens=block,
            prompt_tokens=len(prepared.hashes) * block,
            matched=tuple(blocks * block for blocks in matched),
            held=tuple(blocks * block for blocks in held),
            precise=(False,) * len(names),
        )
        if prepared.tokens is not None:
            ctx.prompt_tokens = prepared.tokens
            ctx.prompt_tokens_exact = True

    def claimed(self, prepared: object, ctx: RoutingContext, index: int) -> None:
        assert isinstance(prepared, Hashed)
        hashes = prepared.hashes
        if not hashes:
            return
        self.index.record(hashes, ctx.pods[index].name)
        prefix = ctx.prefix
        if prefix is not None and prefix.prompt_tokens:
            ratio = prefix.matched[index] / prefix.prompt_tokens
            self._telemetry.prefix_match_ratio.observe(min(1.0, ratio))

    def forget_pod(self, name: str) -> None:
        self.index.forget_pod(name)

    async def close(self) -> None:
        await self.tokenizer.close()


def build(settings: PrefixSettings, registry: PodRegistry, telemetry: Telemetry) -> PrefixProducer:
    """The producer the settings ask for."""
    tokenizer: Tokenizer
    if settings.tokenizer == "hf":
        tokenizer = HfTokenizer({m: Path(p) for m, p in settings.hf_tokenizers.items()})
    elif settings.tokenizer == "remote":

        def pod_url(model: str) -> str | None:
            pods = registry.candidates(model)
            return pods[0].spec.base_url if pods else None

        tokenizer = RemoteTokenizer(pod_url, settings.remote_timeout)
    else:
        tokenizer = CharacterTokenizer()
    index = PrefixIndex(settings.index_capacity, settings.index_ttl)
    return PrefixProducer(settings, tokenizer, index, telemetry)
