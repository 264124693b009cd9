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

CASES = sorted((Path(__file__).parents[1] / "fixtures" / "vllm" / "kv-events").iterdir())


def load(case: Path) -> tuple[dict[str, Any], list[list[bytes]], list[dict[str, Any]]]:
    """A capture: the server's setup, its ZMQ messages, the requests sent with their tokens."""
    setup = json.loads((case / "case.json").read_text())
    messages = [
        [bytes.fromhex(m["topic"]), bytes.fromhex(m["seq"]), bytes.fromhex(m["payload"])]
        for m in map(json.loads, (case / "frames.jsonl").read_text().splitlines())
    ]
    requests = [json.loads(line) for line in (case / "requests.jsonl").read_text().splitlines()]
    return setup, messages, requests


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_real_messages_decode_in_sequence(case: Path) -> None:
    _, messages, _ = load(case)
    batches = [decode(m) for m in messages]
    assert [b.seq for b in batches] == list(range(len(batches)))
    kinds = {type(e) for b in batches for e in b.events}
    assert Stored in kinds


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_every_request_hashed_here_gets_the_names_the_pod_published(case: Path) -> None:
    """Chat and completions, with and without LoRA, for sha256 with a seed and sha256_cbor
    without: the block names computed from the pod's tokens are the ones it published."""
    setup, messages, requests = load(case)
    published = {
        h for m in messages for e in decode(m).events if isinstance(e, Stored) for h in e.hashes
    }
    hasher = BlockHasher(setup["hash_algo"], setup["block_size"], setup.get("PYTHONHASHSEED"))
    checked = 0
    for request in requests:
        ids = request.get("prompt_token_ids")
        if not ids or len(ids) < setup["block_size"]:
            continue
        lora = (request["lora_name"], request["lora_path"]) if request.get("lora_name") else None
        names = hasher.hashes(ids, lora=lora)
        assert set(names) <= published, request["step"]
        if lora is not None:
            assert not set(hasher.hashes(ids)) & set(names)  # the adapter's path is in the name
        checked += 1
    assert checked >= 2


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
