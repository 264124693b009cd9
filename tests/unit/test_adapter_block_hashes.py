"""A LoRA adapter's prompt matched exactly against what a real vLLM 0.32 published: its blocks
are named with the adapter and the path the pod loaded it from, as the pod's /v1/models says."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from extproc.config import PrefixSettings
from extproc.fleet.registry import PodRegistry, PodSpec
from extproc.kvevents.block_hash import BlockHasher
from extproc.kvevents.events import KvEvents
from extproc.kvevents.index import ExactIndex
from extproc.kvevents.wire import Cleared, Removed, Stored, decode
from extproc.prefix.index import PrefixIndex
from extproc.prefix.producer import Hashed, PrefixProducer
from extproc.prefix.tokenizers import CharacterTokenizer
from extproc.scraping.readings import Readings
from extproc.telemetry import Telemetry
from tests.helpers import context, snapshot
from tests.unit.test_kv_events import load

CASES = Path(__file__).parents[1] / "fixtures" / "vllm" / "kv-events"
CASE = CASES / "sha256_cbor-noseed-block32-lora"
ADAPTER = "lora-b"


class FakeKvEvents:
    """What the producer reads of ``KvEvents``: one connected pod, hashed like the capture."""

    def __init__(self, hasher: BlockHasher, index: ExactIndex) -> None:
        self.states = {"pod": object()}
        self.index = index
        self._hasher = hasher

    def hasher(self, pod: str, now: float) -> BlockHasher | None:
        return self._hasher if pod in self.states else None


def captured() -> tuple[BlockHasher, ExactIndex, list[int], str]:
    """The pod's index replayed up to the moment it held every full block of the lora-b
    request (its small cache evicts them later), that request's tokens and adapter path."""
    setup, messages, requests = load(CASE)
    (request,) = [r for r in requests if r.get("lora_name") == ADAPTER]
    ids, path = request["prompt_token_ids"], request["lora_path"]
    hasher = BlockHasher(setup["hash_algo"], setup["block_size"], setup.get("PYTHONHASHSEED"))
    names = hasher.hashes(ids, lora=(ADAPTER, path))
    index = ExactIndex(capacity=100_000)
    for message in messages:
        for event in decode(message).events:
            if isinstance(event, Stored):
                index.stored("pod", list(event.hashes))
            elif isinstance(event, Removed):
                index.removed("pod", list(event.hashes))
            elif isinstance(event, Cleared):
                index.clear("pod")
        if index.leading(names, ["pod"]) == [len(names)]:
            return hasher, index, ids, path
    raise AssertionError("the capture never held the adapter's blocks")


def matched(report: dict[str, str] | None, adapter: str | None) -> tuple[int, bool]:
    """``(tokens matched, precise)`` for the captured prompt, with the pod having reported
    ``report`` from its /v1/models (``None``: not yet)."""
    hasher, index, ids, _ = captured()
    registry = PodRegistry()
    registry.replace_all([PodSpec("pod", "127.0.0.1:1", "tiny-llama", frozenset({ADAPTER}))])
    if report is not None:
        registry.report_adapters("pod", report)
    producer = PrefixProducer(
        PrefixSettings(),
        CharacterTokenizer(),
        PrefixIndex(1000, 60.0),
        Telemetry(),
        registry,
        Readings(stale_after=3.0),
        cast(KvEvents, cast(Any, FakeKvEvents(hasher, index))),
    )
    ctx = context([snapshot("pod")])
    producer.fill(Hashed([], hasher.block_size, len(ids), ids, adapter), ctx)
    assert ctx.prefix is not None
    return ctx.prefix.matched[0], ctx.prefix.precise[0]


def test_the_adapters_blocks_match_exactly_with_the_path_the_pod_reported() -> None:
    _, _, ids, path = captured()
    full = len(ids) // 32 * 32
    assert matched({ADAPTER: path}, ADAPTER) == (full, True)


def test_the_path_is_taken_as_the_pod_spelled_it() -> None:
    # The capture loaded lora-b from ".../tiny-llama/./lora-b/": the same folder, normalised,
    # names other blocks.
    _, _, _, path = captured()
    assert path.endswith("/./lora-b/")
    assert matched({ADAPTER: path.replace("/./", "/").rstrip("/")}, ADAPTER) == (0, True)


def test_a_pod_that_has_not_said_where_it_loaded_the_adapter_stays_approximate() -> None:
    assert matched(None, ADAPTER) == (0, False)
    assert matched({ADAPTER: ""}, ADAPTER) == (0, False)
