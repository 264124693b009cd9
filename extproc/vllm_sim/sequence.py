"""One request's state as it moves through the engine."""

from __future__ import annotations

import asyncio
import enum
import itertools
from dataclasses import dataclass, field


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True)
class TokenEvent:
    """One engine output for a streaming request: a token, or the end of the request."""

    token_id: int | None
    text: str
    finish_reason: str | None = None


_ids = itertools.count(1)


@dataclass(eq=False, slots=True)
class Sequence:
    """A request: its prompt, outputs so far, KV blocks and timestamps (loop time, seconds).

    ``max_tokens == 0`` marks a pooling (embeddings) request that ends after its prefill.
    Identity equality: two requests with the same prompt are still two requests.
    """

    prompt_ids: list[int]
    max_tokens: int
    lora: str | None = None
    """The LoRA adapter's name (``None`` for the base model)."""
    lora_path: str | None = None
    lora_id: int | None = None
    """The adapter's integer id on this pod (vLLM's ``lora_int_id``, shown in KV events)."""
    cache_salt: str | None = None
    stream: bool = False
    arrival_time: float = 0.0
    seq_id: int = field(default_factory=lambda: next(_ids))
    output_ids: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    # KV cache bookkeeping (owned by KVCacheManager).
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)
    """Digests of the full blocks hashed so far (vLLM's chained block hashes)."""
    num_registered_blocks: int = 0
    # Outcome and timing.
    num_cached_tokens: int = 0
    num_prompt_cached_tokens: int = 0
    """Prompt tokens found in the prefix cache when the request was first scheduled."""
    num_preemptions: int = 0
    prompt_counted: bool = False
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finish_time: float | None = None
    finish_reason: str | None = None
    events: asyncio.Queue[TokenEvent] = field(default_factory=asyncio.Queue)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def num_tokens(self) -> int:
        """Tokens whose KV the next step holds: the prompt plus every output so far."""
        return len(self.prompt_ids) + len(self.output_ids)

    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def is_pooling(self) -> bool:
        return self.max_tokens == 0
