"""The gateway's side of prefix-aware routing: tokenise, hash, look up, and record the pick.

Strategies see only the result (``RequestView.prefix_matches``); the I/O (a remote tokenizer)
and the mutable index live here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from extproc.config import Settings
from extproc.openai_request import InferenceRequest
from extproc.pods import PodRegistry
from extproc.prefix.hashing import block_hashes
from extproc.prefix.index import PrefixIndex
from extproc.prefix.tokenizers import CharacterTokenizer, HfTokenizer, RemoteTokenizer, Tokenizer
from extproc.telemetry import Telemetry
from strategies.base import PodView


class PrefixTracker:
    def __init__(
        self,
        tokenizer: Tokenizer,
        index: PrefixIndex,
        block_chars: int,
        block_tokens: int,
        telemetry: Telemetry,
    ) -> None:
        self.tokenizer = tokenizer
        self.index = index
        self._block_chars = block_chars
        self._block_tokens = block_tokens
        self._telemetry = telemetry

    async def hashes(
        self, model: str, request: InferenceRequest, *, count_fallback: bool = True
    ) -> list[int]:
        """The prompt's block hashes; ``count_fallback=False`` for read-only callers (Explain)."""
        stream = await self.tokenizer.tokenize(model, request)
        if count_fallback and stream.source != self.tokenizer.name:
            self._telemetry.tokenizer_fallbacks.labels(self.tokenizer.name).inc()
        block = self._block_chars if stream.width == 1 else self._block_tokens
        return block_hashes(stream.data, stream.width, block, model)

    def lookup(self, hashes: Sequence[int], pods: Sequence[PodView]) -> dict[str, int]:
        return self.index.lookup(hashes, pods)

    def record(self, hashes: Sequence[int], pod: PodView, matched: int) -> None:
        self.index.record(hashes, pod.name)
        if hashes:
            self._telemetry.prefix_match_ratio.observe(matched / len(hashes))

    def forget_pod(self, name: str) -> None:
        self.index.forget_pod(name)

    async def close(self) -> None:
        await self.tokenizer.close()


def build(settings: Settings, registry: PodRegistry, telemetry: Telemetry) -> PrefixTracker:
    """The tracker the settings ask for."""
    tokenizer: Tokenizer
    if settings.tokenizer == "hf":
        tokenizer = HfTokenizer({m: Path(p) for m, p in settings.hf_tokenizers.items()})
    elif settings.tokenizer == "remote":

        def pod_url(model: str) -> str | None:
            pods = registry.candidates(model)
            return f"http://{pods[0].address}" if pods else None

        tokenizer = RemoteTokenizer(pod_url, settings.remote_tokenizer_timeout)
    else:
        tokenizer = CharacterTokenizer()
    index = PrefixIndex(settings.prefix_index_capacity, settings.prefix_index_ttl)
    return PrefixTracker(
        tokenizer, index, settings.prefix_block_chars, settings.prefix_block_tokens, telemetry
    )
