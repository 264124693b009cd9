"""Prefix hashing, the prefix index, tokenizers, and the two prefix strategies."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from extproc.prefix.hashing import block_hashes, model_seed
from extproc.prefix.index import PrefixIndex
from extproc.prefix.tokenizers import CharacterTokenizer, HfTokenizer, message_text, prompt_text
from extproc.routing.openai_request import Endpoint, InferenceRequest
from strategies.context import PodMetrics, PodSnapshot, Score
from strategies.prefix_cache import PrefixCache
from strategies.prefix_cache_and_load import PrefixCacheAndLoad
from tests.helpers import context, fleet, prefix, snapshot

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


def pods(*names: str) -> list[str]:
    return list(names)


def matches(index: PrefixIndex, hashes: list[int], names: list[str]) -> dict[str, int]:
    """The pods holding the prompt's first block, with how many leading blocks they hold."""
    matched, _ = index.lookup(hashes, names)
    return {name: depth for name, depth in zip(names, matched, strict=True) if depth}


def test_lookup_returns_leading_match_lengths() -> None:
    index = PrefixIndex(capacity=1000, ttl=60, clock=Clock())
    hashes = list(range(1, 11))
    index.record(hashes[:8], "a")
    index.record(hashes[:3], "b")
    index.record(hashes, "c")
    assert matches(index, hashes, pods("a", "b", "c", "d")) == {"a": 8, "b": 3, "c": 10}
    # Only candidates count.
    assert matches(index, hashes, pods("b", "d")) == {"b": 3}
    # A gap ends the match: the prefix must be contiguous from block 0.
    assert matches(index, [99, *hashes], pods("a", "c")) == {}


def test_lru_capacity_evicts_least_recently_used() -> None:
    index = PrefixIndex(capacity=4, ttl=60, clock=Clock())  # writes within a second coalesce
    index.record([1, 2], "a")
    index.record([3, 4], "b")
    index.lookup([1, 2], pods("a"))  # reads do not refresh recency; writes do
    index._clock.now += 1  # type: ignore[attr-defined]
    index.record([1, 2], "a")
    index.record([5, 6], "c")
    assert len(index) == 4
    assert matches(index, [3, 4], pods("b")) == {}
    assert matches(index, [1, 2], pods("a")) == {"a": 2}


def test_ttl_expires_entries() -> None:
    clock = Clock()
    index = PrefixIndex(capacity=100, ttl=10, clock=clock)
    index.record([1, 2, 3], "a")
    clock.now += 5
    assert matches(index, [1, 2, 3], pods("a")) == {"a": 3}
    clock.now += 20
    assert matches(index, [1, 2, 3], pods("a")) == {}
    index.record([7], "b")  # a write purges what expired
    assert len(index) == 1


def test_removed_pod_is_forgotten_and_its_bit_not_inherited() -> None:
    clock = Clock()
    index = PrefixIndex(capacity=100, ttl=10, clock=clock)
    index.record([1, 2, 3], "a")
    index.forget_pod("a")
    assert matches(index, [1, 2, 3], pods("a")) == {}
    index.record([9], "b")  # a new pod must not reuse a's bit while a's entries may live
    assert matches(index, [1, 2, 3], pods("b")) == {}
    index.record([1], "a")  # a pod coming back with the same name starts empty
    assert matches(index, [1, 2, 3], pods("a")) == {"a": 1}
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


def scores(
    strategy: PrefixCache | PrefixCacheAndLoad,
    pods: list[PodSnapshot],
    matched: dict[str, int],
    blocks: int = 40,
    held: dict[str, int] | None = None,
) -> list[Score]:
    found = prefix(
        [matched.get(p.name, 0) for p in pods],
        [(held or {}).get(p.name, 0) for p in pods],
        blocks=blocks,
    )
    return list(strategy.score(context(pods, prefix=found)))


def best(values: list[Score], pods: list[PodSnapshot]) -> str:
    return pods[values.index(max(values))].name  # type: ignore[type-var]


def test_prefix_cache_longest_match_wins_and_ties_go_to_least_load() -> None:
    pods = fleet(3, 1, 2)
    strategy = PrefixCache()
    assert best(scores(strategy, pods, {"p0": 30, "p2": 10}), pods) == "p0"
    assert best(scores(strategy, pods, {"p0": 30, "p2": 30}), pods) == "p2"


def test_prefix_cache_imbalance_and_misses_go_to_least_load() -> None:
    strategy = PrefixCache(imbalance_abs=4)
    imbalanced = fleet(10, 1, 5)
    assert best(scores(strategy, imbalanced, {"p0": 40}), imbalanced) == "p1"
    balanced = fleet(3, 1, 2)
    assert best(scores(strategy, balanced, {}), balanced) == "p1"
    # a one-block match is a miss, not a reason to pile onto p0
    assert best(scores(strategy, balanced, {"p0": 1}), balanced) == "p1"


def test_prefix_cache_and_load_trades_match_against_load() -> None:
    strategy = PrefixCacheAndLoad(kv_tokens=0)
    pods = fleet(2, 2, 2)
    assert best(scores(strategy, pods, {"p1": 36}), pods) == "p1"
    # the pod holding a hot prefix is queueing: an idle pod wins and will cache it too
    hot = fleet(30, 1, 2)
    assert best(scores(strategy, hot, {"p0": 40}), hot) == "p1"


def test_short_prompts_do_not_win_on_ratio() -> None:
    strategy = PrefixCacheAndLoad(kv_tokens=0)
    pods = fleet(1, 0)
    # a 2-block prompt fully matched on p0 saves 32 tokens; p0's extra request costs 512
    assert best(scores(strategy, pods, {"p0": 2}, blocks=2), pods) == "p1"
    # the same ratio on a long prompt keeps the affinity
    assert best(scores(strategy, pods, {"p0": 40}, blocks=40), pods) == "p0"


def test_kv_term_needs_fresh_metrics_everywhere() -> None:
    strategy = PrefixCacheAndLoad(load_tokens=0, kv_tokens=160)
    pods = [
        snapshot("p0", PodMetrics(kv_cache_usage=0.9)),
        snapshot("p1", PodMetrics(kv_cache_usage=0.1)),
    ]
    assert best(scores(strategy, pods, {}), pods) == "p1"
    pods[1] = snapshot("p1")
    values = scores(strategy, pods, {})
    assert values[0] == values[1]


@pytest.mark.parametrize(
    ("cls", "options"),
    [
        (PrefixCache, {"imbalance_abs": -1}),
        (PrefixCache, {"min_match_blocks": 0}),
        (PrefixCacheAndLoad, {"load_tokens": -1}),
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
    assert index.lookup([9], ["a", "b", "c"])[1] == [0, 1, 0]


def test_an_expired_entry_is_rewritten_from_scratch() -> None:
    clock = Clock()
    index = PrefixIndex(capacity=100, ttl=5, clock=clock)
    index.record([1], "a")
    clock.now += 20
    index.record([1], "b")  # a's claim expired: b alone holds block 1 now
    assert matches(index, [1], pods("a", "b")) == {"b": 1}
    assert index.held("a") == 0


def test_misses_go_to_the_pod_caching_least() -> None:
    pods = fleet(1, 1, 1)
    held = {"p0": 900, "p1": 40, "p2": 500}
    assert best(scores(PrefixCache(), pods, {}, held=held), pods) == "p1"
    assert best(scores(PrefixCacheAndLoad(), pods, {}, held=held), pods) == "p1"
    # a hit still beats room
    assert best(scores(PrefixCacheAndLoad(), pods, {"p0": 40}, held=held), pods) == "p0"


@pytest.mark.parametrize("strategy", [PrefixCache(), PrefixCacheAndLoad(kv_tokens=0)])
def test_a_prefix_every_pod_evicted_goes_back_where_it_was_sent(
    strategy: PrefixCache | PrefixCacheAndLoad,
) -> None:
    pods = fleet(1, 1, 1)
    evicted = dataclasses.replace(
        prefix([0, 0, 0], [100, 900, 100]),
        precise=(True, True, True),
        sent=(0, 40 * 16, 0),
    )
    # no pod holds it (exactly): its traffic went to p1, so p1 takes it back, full as it is
    assert best(list(strategy.score(context(pods, prefix=evicted))), pods) == "p1"
    # a pod that really holds it still wins over where it was sent
    held = dataclasses.replace(evicted, matched=(10 * 16, 0, 0))
    assert best(list(strategy.score(context(pods, prefix=held))), pods) == "p0"


@pytest.mark.parametrize("strategy", [PrefixCache(), PrefixCacheAndLoad(kv_tokens=0)])
def test_a_home_that_kept_the_head_of_the_prefix_keeps_it(
    strategy: PrefixCache | PrefixCacheAndLoad,
) -> None:
    # p1 is where the 125-block prefix was sent and still holds its first 20 blocks; two
    # requests more than p0 there do not move the prefix to p0, which holds none of it
    pods = fleet(0, 2, 0)
    tail_evicted = dataclasses.replace(
        prefix([0, 20, 0], [100, 900, 100], blocks=125),
        precise=(True, True, True),
        sent=(0, 125 * 16, 0),
    )
    assert tail_evicted.affinity(2 * 16) == (0, 125 * 16, 0)
    assert best(list(strategy.score(context(pods, prefix=tail_evicted))), pods) == "p1"


def full_caches(*loads: int, blocks: int = 300) -> list[PodSnapshot]:
    """Pods with a fresh reading of their cache size (``blocks`` of 16 tokens) and a load."""
    cache = PodMetrics(running=0, waiting=0, num_gpu_blocks=blocks, block_size=16)
    return [snapshot(f"p{i}", cache, in_flight=load) for i, load in enumerate(loads)]


def test_a_miss_on_a_full_cache_costs_the_prefix_it_evicts() -> None:
    # p0 holds the 125-block prefix and carries five requests more than p1
    pods = full_caches(5, 0)
    full = prefix([125, 0], [300, 300], blocks=125)
    empty = prefix([125, 0], [125, 0], blocks=125)
    strategy = PrefixCacheAndLoad(kv_tokens=0)
    # p1's cache is full of other prefixes: copying this one there evicts as much of them
    assert best(list(strategy.score(context(pods, prefix=full))), pods) == "p0"
    # p1 has room: the copy evicts nothing, and five requests of queue outweigh the prefill
    assert best(list(strategy.score(context(pods, prefix=empty))), pods) == "p1"
    # the term off, or a pod not saying how big its cache is: as before, load wins
    off = PrefixCacheAndLoad(kv_tokens=0, evict_weight=0)
    assert best(list(off.score(context(pods, prefix=full))), pods) == "p1"
    unknown = [pods[0], snapshot("p1", PodMetrics(running=0, waiting=0))]
    assert best(list(strategy.score(context(unknown, prefix=full))), unknown) == "p1"
