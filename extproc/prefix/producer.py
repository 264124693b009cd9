"""The prefix producer: tokenise the prompt, find what each candidate caches of it, and record
where the request went.

Strategies see only the result (``RoutingContext.prefix``); the I/O (a remote tokenizer) and
the indexes live here. Two sources, per pod:

- exact, for a pod that publishes KV-cache events and can be matched now
  (``KvEvents.hasher``): the prompt's token ids, as the pod computes them, are hashed into the
  pod's own block names and looked up in the exact index. A LoRA adapter's blocks also carry the
  adapter's name and the path the pod loaded it from (its ``/v1/models`` says), so a pod that has
  not said where it loaded the adapter from is matched approximately;
- approximate for the others: the prompt's blocks looked up in the index of what this server
  sent where, which the producer itself writes after each pick.

It also makes the prompt's token count exact when the tokenizer produced real tokens.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from extproc.config import PrefixSettings
from extproc.fleet.registry import PodRegistry
from extproc.kvevents.block_hash import BlockHasher
from extproc.kvevents.events import KvEvents
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
from extproc.scraping.readings import Readings
from extproc.telemetry import Telemetry
from strategies.context import PREFIX, PrefixMatches, RoutingContext

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Hashed:
    hashes: list[int]
    """The approximate index's block hashes."""
    block_tokens: int
    tokens: int | None
    """The prompt's exact token count, when the tokenizer produced real tokens."""
    pod_ids: Sequence[int] | None
    """The prompt's token ids as a vLLM pod computes them, when known (exact matching)."""
    adapter: str | None
    """The LoRA adapter the request names, if it names one."""


class PrefixProducer:
    key = PREFIX

    def __init__(
        self,
        settings: PrefixSettings,
        tokenizer: Tokenizer,
        index: PrefixIndex,
        telemetry: Telemetry,
        registry: PodRegistry,
        readings: Readings,
        kv: KvEvents | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.index = index
        self._block_chars = settings.block_chars
        self._block_tokens = settings.block_tokens
        self._track_all = settings.track_all
        self._telemetry = telemetry
        self._registry = registry
        self._readings = readings
        self._kv = kv
        self._warned = False

    def wanted(self, plan: Plan) -> bool:
        return self._track_all or PREFIX in plan.consumes

    async def prepare(self, request: InferenceRequest, *, dry_run: bool) -> Hashed:
        stream = await self.tokenizer.tokenize(request.model, request)
        if not dry_run and stream.source != self.tokenizer.name:
            self._telemetry.tokenizer_fallbacks.labels(self.tokenizer.name).inc()
        if stream.width == 1:
            block, tokens = self._block_chars, None
            block_tokens = block // CHARS_PER_TOKEN
        else:
            block = block_tokens = self._pod_block_size(request.model)
            tokens = len(stream.data) // TOKEN_ID_WIDTH
        hashes = block_hashes(stream.data, stream.width, block, request.model)
        info = self._registry.model(request.model)
        adapter = request.model if info is not None and info.parent is not None else None
        return Hashed(hashes, max(1, block_tokens), tokens, stream.pod_ids, adapter)

    def _pod_block_size(self, model: str) -> int:
        """The block size the model's pods cache in (their ``vllm:cache_config_info``), so the
        approximate index never claims a match the pod cannot have; else the setting."""
        for pod in self._registry.candidates(model):
            reading = self._readings.get(pod.spec.name)
            if reading is not None and reading.metrics.block_size:
                return reading.metrics.block_size
        return self._block_tokens

    def fill(self, prepared: object, ctx: RoutingContext) -> None:
        assert isinstance(prepared, Hashed)
        names = [pod.name for pod in ctx.pods]
        matched, held = self.index.lookup(prepared.hashes, names)
        block = prepared.block_tokens
        matched_tokens = [blocks * block for blocks in matched]
        held_tokens = [blocks * block for blocks in held]
        precise = [False] * len(names)
        prompt_tokens = len(prepared.hashes) * block
        ids = prepared.pod_ids
        sent: tuple[int, ...] = ()
        if self._kv is not None and self._kv.states:
            if ids is not None:
                prompt_tokens = max(prompt_tokens, len(ids))
                sent = tuple(matched_tokens)
                self._exact(ids, prepared.adapter, ctx.now, names, matched_tokens, precise)
            elif not self._warned:
                self._warned = True
                log.warning(
                    "pods publish KV-cache events, but exact matching needs their token ids: "
                    "set tokenizer to hf (with the model's chat template) or remote; until "
                    "then only prompts given as token ids are matched exactly"
                )
        ctx.prefix = PrefixMatches(
            block_tokens=block,
            prompt_tokens=prompt_tokens,
            matched=tuple(matched_tokens),
            held=tuple(held_tokens),
            precise=tuple(precise),
            sent=sent if any(precise) else (),
        )
        if prepared.tokens is not None:
            ctx.prompt_tokens = prepared.tokens
            ctx.prompt_tokens_exact = True

    def _exact(
        self,
        ids: Sequence[int],
        adapter: str | None,
        now: float,
        names: list[str],
        matched: list[int],
        precise: list[bool],
    ) -> None:
        """Overwrite the approximate matches of every pod that can be matched exactly: pods
        that hash alike (and, for an adapter, loaded it from the same path) share one hashing.

        ``held`` stays this server's record of what it placed where. It decides where a prompt
        nobody holds goes, so distinct prefixes spread evenly; the pods' own counts cannot:
        under cache pressure every cache is full, and the last placement shows up only once its
        prefill is done (two new prefixes in a row would land on one pod)."""
        assert self._kv is not None
        kv = self._kv
        groups: dict[tuple[int, str | None], tuple[BlockHasher, list[int]]] = {}
        for i, name in enumerate(names):
            hasher = kv.hasher(name, now)
            if hasher is None:
                continue
            path = None
            if adapter is not None:
                path = self._registry.adapter_path(name, adapter)
                if path is None:
                    continue
            groups.setdefault((id(hasher), path), (hasher, []))[1].append(i)
        for (_, path), (hasher, positions) in groups.items():
            lora = (adapter, path) if adapter is not None and path is not None else None
            hashes = hasher.hashes(ids, lora=lora)
            depths = kv.index.leading(hashes, [names[i] for i in positions])
            size = hasher.block_size
            for i, depth in zip(positions, depths, strict=True):
                matched[i] = depth * size
                precise[i] = True

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


def rotating_pod_url(registry: PodRegistry) -> Callable[[str], str | None]:
    """Where the remote tokenizer asks: the model's candidates in turn, so no one pod's API
    server does every ``/tokenize`` (the call costs its CPU, and a busy pod answers late)."""
    turn = itertools.count()

    def pod_url(model: str) -> str | None:
        pods = registry.candidates(model)
        return pods[next(turn) % len(pods)].spec.base_url if pods else None

    return pod_url


def build(
    settings: PrefixSettings,
    registry: PodRegistry,
    readings: Readings,
    telemetry: Telemetry,
    kv: KvEvents | None = None,
) -> PrefixProducer:
    """The producer the settings ask for."""
    tokenizer: Tokenizer
    if settings.tokenizer == "hf":
        tokenizer = HfTokenizer({m: Path(p) for m, p in settings.hf_tokenizers.items()})
    elif settings.tokenizer == "remote":
        tokenizer = RemoteTokenizer(rotating_pod_url(registry), settings.remote_timeout)
    else:
        tokenizer = CharacterTokenizer()
    index = PrefixIndex(settings.index_capacity, settings.index_ttl)
    return PrefixProducer(settings, tokenizer, index, telemetry, registry, readings, kv)
