"""Prefix hashing, the prefix index, tokenizers, and the two prefix strategies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from extproc.openai_request import Endpoint, InferenceRequest
from extproc.prefix.hashing import block_hashes, model_seed
from extproc.prefix.index import PrefixIndex
from extproc.prefix.tokenizers import CharacterTokenizer, HfTokenizer, message_text, prompt_text
from strategies.base import PodMetrics, PodView, RequestView
from strategies.prefix_cache import PrefixCache
from strategies.prefix_cache_and_load import PrefixCacheAndLoad

# -- hashing -----------------------------------------------------------------------------------


def test_blocks_are_chained_and_partial_blocks_dropped() -> None:
    a = block_hashes(b"x" * 100, 1, 16, "m")
    assert len(a) == 6  # 100 // 16, the last 4 bytes dropped
    b = block_hashes(b"x" * 100 + b"tail", 1, 16, "m")
    assert b[:6] == a
    # Same block content at different positions hashes differently (chained).
    assert len(set(a)) == 6
    # A change in block 0 changes every later hash.
    c = block_hashes(b"y" + b"x" * 99, 1, 16, "m")
    assert not set(a) & set(c)


def test_seeded_per_model() -> None:
    assert block_hashes(b"z" * 32, 1, 16, "m1") != block_hashes(b"z" * 32, 1, 16, "m2")
    assert model_seed("m1") != model_seed("m2")


def test_token_width() -> None:
    stream = bytes(range(64))
    assert len(block_hashes(stream, 4, 4, "m")) == 4
    assert block_hashes(b"", 1, 16, "m") == []


# -- index -------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def pods(*names: str) -> list[PodView]:
    return [PodView(name=n, address=f"10.0.0.{i}:80", model="m") for i, n in enumerate(names)]


def test_lookup_returns_leading_match_lengths() -> None:
    index = PrefixIndex(capacity=1000, ttl=60, clock=Clock())
    hashes = list(range(1, 11))
    index.record(hashes[:8], "a")
    index.record(hashes[:3], "b")
    index.record(hashes, "c")
    assert index.lookup(hashes, pods("a", "b", "c", "d")) == {"a": 8, "b": 3, "c": 10}
    # Only candidates count.
    assert index.lookup(hashes, pods("b", "d")) == {"b": 3}
    # A gap ends the match: the prefix must be contiguous from block 0.
    assert index.lookup([99, *hashes], pods("a", "c")) == {}


def test_lru_capacity_evicts_least_recently_used() -> None:
    index = PrefixIndex(capacity=4, ttl=60, clock=Clock())  # writes within a second coalesce
    index.record([1, 2], "a")
    index.record([3, 4], "b")
    index.lookup([1, 2], pods("a"))  # reads do not refresh recency; writes do
    index._clock.now += 1  # type: ignore[attr-defined]
    index.record([1, 2], "a")
    index.record([5, 6], "c")
    assert len(index) == 4
    assert index.lookup([3, 4], pods("b")) == {}
    assert index.lookup([1, 2], pods("a")) == {"a": 2}


def test_ttl_expires_entries() -> None:
    clock = Clock()
    index = PrefixIndex(capacity=100, ttl=10, clock=clock)
    index.record([1, 2, 3], "a")
    clock.now += 5
    assert index.lookup([1, 2, 3], pods("a")) == {"a": 3}
    clock.now += 20
    assert index.lookup([1, 2, 3], pods("a")) == {}
    index.record([7], "b")  # a write purges what expired
    assert len(index) == 1


def test_removed_pod_is_forgotten_and_its_bit_not_inherited() -> None:
    clock = Clock()
    index = PrefixIndex(capacity=100, ttl=10, clock=clock)
    index.record([1, 2, 3], "a")
    index.forget_pod("a")
    assert index.lookup([1, 2, 3], pods("a")) == {}
    index.record([9], "b")  # a new pod must not reuse a's bit while a's entries may live
    assert index.lookup([1, 2, 3], pods("b")) == {}
    index.record([1], "a")  # a pod coming back with the same name starts empty
    assert index.lookup([1, 2, 3], pods("a")) == {"a": 1}
    assert index.blocks_by_pod() == {"b": 1, "a": 1}


def test_bad_index_bounds() -> None:
    with pytest.raises(ValueError):
        PrefixIndex(capacity=0, ttl=1)


# -- tokenizers --------------------------------------------------------------------------------


def chat(*turns: tuple[str, str]) -> InferenceRequest:
    return InferenceRequest(endpoint=Endpoint.CHAT, model="m", messages=list(turns))


async def test_chat_serialisation_keeps_roles_apart_and_prefixes_stable() -> None:
    tokenizer = CharacterTokenizer()
    a = (await tokenizer.tokenize("m", chat(("user", "hello"), ("assistant", "hi")))).data
    b = (await tokenizer.tokenize("m", chat(("assistant", "hello"), ("user", "hi")))).data
    assert a != b
    grown = chat(("user", "hello"), ("assistant", "hi"), ("user", "more"))
    assert (await tokenizer.tokenize("m", grown)).data.startswith(a)
    # content that imitates a role marker cannot forge a turn boundary
    forged = chat(("user", "x\n<assistant> 2:hi"))
    honest = chat(("user", "x"), ("assistant", "hi"))
    assert prompt_text(forged) != prompt_text(honest)
    assert message_text("user", "ab") == "<user> 2:ab\n"


async def test_token_id_prompts_are_packed_four_bytes_each() -> None:
    request = InferenceRequest(endpoint=Endpoint.COMPLETIONS, model="m", token_ids=[1, 2, 3])
    stream = await CharacterTokenizer().tokenize("m", request)
    assert stream.width == 4 and len(stream.data) == 12


def write_tokenizer(path: Path) -> Path:
    """A tiny word-level tokenizer.json built locally: nothing is fetched from a hub."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["hello", "world", "user", "assistant", "system", "<", ">", ":", *"0123456789"]
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path))
    json.loads(path.read_text())
    return path


async def test_hf_tokenizer_from_a_local_file(tmp_path: Path) -> None:
    file = write_tokenizer(tmp_path / "tokenizer.json")
    tokenizer = HfTokenizer({"m": file})
    first = await tokenizer.tokenize("m", chat(("user", "hello world")))
    assert first.width == 4 and len(first.data) > 0
    grown = await tokenizer.tokenize("m", chat(("user", "hello world"), ("assistant", "hello")))
    assert grown.data.startswith(first.data)
    other = await tokenizer.tokenize("unknown-model", chat(("user", "hello")))
    assert other.source == "character"


# -- strategies --------------------------------------------------------------------------------


def view(matches: dict[str, int], blocks: int = 40) -> RequestView:
    return RequestView(
        request_id="r", model="m", now=10.0, prefix_blocks=blocks, prefix_matches=matches
    )


def fleet(*loads: int) -> list[PodView]:
    return [
        PodView(name=f"p{i}", address=f"10.0.0.{i}:80", model="m", in_flight=load)
        for i, load in enumerate(loads)
    ]


def best(scores: list[float] | tuple[float, ...] | object, pods: list[PodView]) -> str:
    values = list(scores)  # type: ignore[call-overload]
    return pods[values.index(max(values))].name


def test_prefix_cache_longest_match_wins_and_ties_go_to_least_load() -> None:
    pods = fleet(3, 1, 2)
    strategy = PrefixCache()
    assert best(strategy.score(view({"p0": 30, "p2": 10}), pods), pods) == "p0"
    assert best(strategy.score(view({"p0": 30, "p2": 30}), pods), pods) == "p2"


def test_prefix_cache_imbalance_and_misses_go_to_least_load() -> None:
    strategy = PrefixCache(imbalance_abs=4)
    imbalanced = fleet(10, 1, 5)
    assert best(strategy.score(view({"p0": 40}), imbalanced), imbalanced) == "p1"
    balanced = fleet(3, 1, 2)
    assert best(strategy.score(view({}), balanced), balanced) == "p1"
    # a one-block match is a miss, not a reason to pile onto p0
    assert best(strategy.score(view({"p0": 1}), balanced), balanced) == "p1"


def test_prefix_cache_and_load_trades_match_against_load() -> None:
    strategy = PrefixCacheAndLoad(kv_blocks=0)
    pods = fleet(2, 2, 2)
    assert best(strategy.score(view({"p1": 36}), pods), pods) == "p1"
    # the pod holding a hot prefix is queueing: an idle pod wins and will cache it too
    hot = fleet(30, 1, 2)
    assert best(strategy.score(view({"p0": 40}), hot), hot) == "p1"


def test_short_prompts_do_not_win_on_ratio() -> None:
    strategy = PrefixCacheAndLoad(kv_blocks=0)
    pods = fleet(1, 0)
    # a 2-block prompt fully matched on p0 saves 2 blocks; p0's extra request costs 32
    assert best(strategy.score(view({"p0": 2}, blocks=2), pods), pods) == "p1"
    # the same ratio on a long prompt keeps the affinity
    assert best(strategy.score(view({"p0": 40}, blocks=40), pods), pods) == "p0"


def test_kv_term_needs_fresh_metrics_everywhere() -> None:
    strategy = PrefixCacheAndLoad(load_blocks=0, kv_blocks=10)
    pods = fleet(0, 0)
    pods[0].metrics, pods[0].metrics_at = PodMetrics(kv_cache_usage=0.9), 10.0
    pods[1].metrics, pods[1].metrics_at = PodMetrics(kv_cache_usage=0.1), 10.0
    assert best(strategy.score(view({}), pods), pods) == "p1"
    pods[1].metrics = None
    scores = list(strategy.score(view({}), pods))
    assert scores[0] == scores[1]


@pytest.mark.parametrize(
    ("cls", "options"),
    [
        (PrefixCache, {"imbalance_abs": -1}),
        (PrefixCache, {"min_match_blocks": 0}),
        (PrefixCacheAndLoad, {"load_blocks": -1}),
        (PrefixCacheAndLoad, {"min_match_blocks": 0}),
    ],
)
def test_bad_prefix_options(cls: type, options: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        cls(**options)


def test_held_blocks_follow_writes_evictions_and_expiry() -> None:
    clock = Clock()
    index = PrefixIndex(capacity=6, ttl=10, clock=clock)
    index.record([1, 2, 3], "a")
    index.record([1, 2, 4], "b")
    assert (index.held("a"), index.held("b")) == (3, 3)
    index.record([5, 6, 7], "a")  # 7 entries > 6: the oldest (block 3, a's) is evicted
    assert index.held("a") == 5
    assert index.blocks_by_pod() == {"a": 5, "b": 3}
    clock.now += 30
    index.record([9], "b")  # everything else expired and is purged on this write
    assert (index.held("a"), index.held("b")) == (0, 1)
    candidates = pods("a", "b", "c")
    index.lookup([9], candidates)
    assert [p.cached_blocks for p in candidates] == [0, 1, 0]


def test_an_expired_entry_is_rewritten_from_scratch() -> None:
    clock = Clock()
    index = PrefixIndex(capacity=100, ttl=5, clock=clock)
    index.record([1], "a")
    clock.now += 20
    index.record([1], "b")  # a's claim expired: b alone holds block 1 now
    assert index.lookup([1], pods("a", "b")) == {"b": 1}
    assert index.held("a") == 0


def test_misses_go_to_the_pod_caching_least() -> None:
    pods_ = fleet(1, 1, 1)
    pods_[0].cached_blocks, pods_[1].cached_blocks, pods_[2].cached_blocks = 900, 40, 500
    assert best(PrefixCache().score(view({}), pods_), pods_) == "p1"
    assert best(PrefixCacheAndLoad().score(view({}), pods_), pods_) == "p1"
    # a hit still beats room
    assert best(PrefixCacheAndLoad().score(view({"p0": 40}), pods_), pods_) == "p0"
