"""KV-cache events as a real vLLM 0.32 sent them: decoding, the block names a request gets here
against the ones the pod published for it, and the exact index."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgpack
import pytest

from extproc.kvevents.block_hash import BlockHasher
from extproc.kvevents.index import ExactIndex
from extproc.kvevents.wire import Cleared, Removed, Stored, WireError, decode

FIXTURE = Path(__file__).parents[1] / "fixtures" / "vllm-kv" / "kv-events-sha256.json"
CAPTURE: dict[str, Any] = json.loads(FIXTURE.read_text())


def frames(message: dict[str, Any]) -> list[bytes]:
    return [
        message["topic"].encode(),
        message["seq"].to_bytes(8, "big"),
        bytes.fromhex(message["payload_hex"]),
    ]


def test_real_messages_decode() -> None:
    batches = [decode(frames(m)) for m in CAPTURE["messages"]]
    assert [b.seq for b in batches] == [0, 1, 2]
    for batch in batches:
        (event,) = batch.events
        assert isinstance(event, Stored) and len(event.hashes) == 4
        assert event.block_size == 128
    assert [b.events[0].lora_name for b in batches] == [None, "ad1", "ad2"]  # type: ignore[union-attr]


def test_a_chat_hashed_here_gets_the_names_the_pod_published() -> None:
    hasher = BlockHasher(CAPTURE["hash_algo"], CAPTURE["block_size"], CAPTURE["seed"])
    published = decode(frames(CAPTURE["messages"][0])).events[0]
    assert isinstance(published, Stored)
    assert tuple(hasher.hashes(CAPTURE["chat_tokens"])) == published.hashes


def test_an_adapter_request_is_named_with_the_adapters_path() -> None:
    hasher = BlockHasher(CAPTURE["hash_algo"], CAPTURE["block_size"], CAPTURE["seed"])
    published = decode(frames(CAPTURE["messages"][2])).events[0]
    assert isinstance(published, Stored)
    lora = ("ad2", "/tmp/vllmcheck-model/lora1")
    assert tuple(hasher.hashes(CAPTURE["chat_tokens"], lora=lora)) == published.hashes
    assert tuple(hasher.hashes(CAPTURE["chat_tokens"])) != published.hashes


def payload(*events: dict[str, Any]) -> list[bytes]:
    body = msgpack.packb([1.5, list(events), 0])
    return [b"kv-events", (7).to_bytes(8, "big"), body]


def test_removed_cleared_and_unknown_kinds() -> None:
    batch = decode(
        payload(
            {"type": "BlockRemoved", "block_hashes": [1, 2], "medium": "GPU"},
            {"type": "AllBlocksCleared"},
            {"type": "SomethingNew", "x": 1},
            {"type": "BlockStored", "block_hashes": [b"\x00" * 24 + (9).to_bytes(8, "big")]},
        )
    )
    assert batch.seq == 7 and batch.ts == 1.5
    assert batch.events == (Removed((1, 2)), Cleared(), Stored((9,), None, None))


@pytest.mark.parametrize(
    "bad",
    [[b"t", b"x"], [b"t", b"12345678", b"\xc1"], [b"t", b"12345678", msgpack.packb({"a": 1})]],
)
def test_malformed_messages_are_refused(bad: list[bytes]) -> None:
    with pytest.raises(WireError):
        decode(bad)


def test_the_exact_index() -> None:
    index = ExactIndex(capacity=100)
    index.stored("a", [1, 2, 3, 4])
    index.stored("b", [1, 2])
    assert index.leading([1, 2, 3, 4, 5], ["a", "b", "c"]) == [4, 2, 0]
    index.removed("a", [2])  # a gap: only the leading run counts
    assert index.leading([1, 2, 3], ["a", "b"]) == [1, 2]
    assert (index.held("a"), index.held("b")) == (3, 2)
    index.clear("b")
    assert index.leading([1, 2], ["a", "b"]) == [1, 0] and index.held("b") == 0
    index.forget("a")
    assert len(index) == 0 and index.held("a") == 0
    index.stored("c", [1])  # a pod after the one that left gets a clean slate
    assert index.leading([1], ["a", "c"]) == [0, 1]


def test_the_exact_index_is_bounded() -> None:
    index = ExactIndex(capacity=3)
    index.stored("a", [1, 2, 3, 4, 5])
    assert len(index) == 3 and index.evicted == 2 and index.held("a") == 3
    assert index.leading([3, 4, 5], ["a"]) == [3]
