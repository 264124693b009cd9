"""vLLM's prefix-cache block hashes, as pure functions.

A vLLM pod names every full KV block by a chained hash and publishes those names in its
KV-cache events. Whoever wants to match a request against the published blocks (the router's
index, the simulator publishing the same events) must compute the same names:

* ``NONE_HASH = H(seed)``: ``seed`` is the pod's ``PYTHONHASHSEED`` string, or
  ``"vllm-none-hash"`` when it is unset (sha256 variants only: unseeded xxhash pods draw a
  random per-process seed nobody outside the pod can know);
* ``h_i = H((h_{i-1} or NONE_HASH, tuple(tokens[i*B:(i+1)*B]), extra_keys_i))`` over full
  blocks only, where the chained value is the full digest;
* ``extra_keys_i``: ``None`` for plain text; ``("lora", name, path)`` on every block of a LoRA
  request; ``("cache_salt", salt)`` on block 0 only; as a tuple in that order;
* the published value is the low 64 bits of the digest read big-endian.

``H`` is the pod's ``--prefix-caching-hash-algo``: ``sha256`` (of the object's pickle,
protocol 5), ``sha256_cbor`` (of its canonical CBOR: the language-neutral choice), ``xxhash`` /
``xxhash_cbor`` (xxh3-128 over the same two encodings).
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Callable, Sequence
from typing import Any

import cbor2
import xxhash

HashFn = Callable[[Any], bytes]

DEFAULT_SEED = "vllm-none-hash"
"""vLLM's ``NONE_HASH`` seed for the sha256 variants when ``PYTHONHASHSEED`` is unset."""

ALGORITHMS = ("sha256", "sha256_cbor", "xxhash", "xxhash_cbor")
"""The values of vLLM's ``--prefix-caching-hash-algo`` (``sha256`` is its default)."""

_SEEDLESS_OK = frozenset({"sha256", "sha256_cbor"})

ExtraKeys = tuple[Any, ...] | None


class UnreproducibleHashError(ValueError):
    """The pod's hashes cannot be computed outside it (an xxhash variant with no seed)."""


def _pickle(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def _cbor(obj: Any) -> bytes:
    return cbor2.dumps(obj, canonical=True)


def _sha256(obj: Any) -> bytes:
    return hashlib.sha256(_pickle(obj)).digest()


def _sha256_cbor(obj: Any) -> bytes:
    return hashlib.sha256(_cbor(obj)).digest()


def _xxhash(obj: Any) -> bytes:
    return xxhash.xxh3_128_digest(_pickle(obj))


def _xxhash_cbor(obj: Any) -> bytes:
    return xxhash.xxh3_128_digest(_cbor(obj))


_FUNCTIONS: dict[str, HashFn] = {
    "sha256": _sha256,
    "sha256_cbor": _sha256_cbor,
    "xxhash": _xxhash,
    "xxhash_cbor": _xxhash_cbor,
}


def hash_function(algorithm: str) -> HashFn:
    """The digest function of one ``--prefix-caching-hash-algo`` value."""
    try:
        return _FUNCTIONS[algorithm]
    except KeyError:
        raise ValueError(
            f"unknown prefix-caching hash algorithm {algorithm!r} (one of {', '.join(ALGORITHMS)})"
        ) from None


def none_hash(algorithm: str, seed: str | None = None) -> bytes:
    """The parent of every chain's first block.

    ``seed`` is the pod's ``PYTHONHASHSEED`` (``None`` when unset). Raises
    ``UnreproducibleHashError`` for an xxhash variant without one.
    """
    function = hash_function(algorithm)
    if seed is None:
        if algorithm not in _SEEDLESS_OK:
            raise UnreproducibleHashError(
                f"a pod hashing with {algorithm!r} and no PYTHONHASHSEED seeds its block hashes "
                "with random bytes: set PYTHONHASHSEED on the pods (and the same seed here), "
                "or use sha256 / sha256_cbor"
            )
        seed = DEFAULT_SEED
    return function(seed)


def external_hash(digest: bytes) -> int:
    """What KV events carry for a block: the digest's low 64 bits, big-endian."""
    return int.from_bytes(digest[-8:], "big")


def lora_key(name: str, path: str) -> tuple[str, str, str]:
    """The extra key a LoRA request adds to every block (the path as the pod loaded it)."""
    return ("lora", name, path)


def block_extra_keys(
    index: int, lora: tuple[str, str] | None = None, cache_salt: str | None = None
) -> ExtraKeys:
    """Extra keys of block ``index``: LoRA ``(name, path)`` on all, the salt on block 0."""
    keys: list[Any] = []
    if lora is not None:
        keys.append(lora_key(*lora))
    if cache_salt and index == 0:
        keys.append(("cache_salt", cache_salt))
    return tuple(keys) if keys else None


class BlockHasher:
    """One pod's hashing setup: algorithm, seed and block size.

    ``chain`` extends a list of digests over newly full blocks, so a growing sequence is hashed
    once per block; ``external_hash`` turns a digest into the published integer.
    """

    __slots__ = ("_function", "algorithm", "block_size", "root", "seed")

    def __init__(self, algorithm: str = "sha256", block_size: int = 16, seed: str | None = None):
        if block_size < 1:
            raise ValueError("block_size must be >= 1")
        self.algorithm = algorithm
        self.block_size = block_size
        self.seed = seed
        self._function = hash_function(algorithm)
        self.root = none_hash(algorithm, seed)
        """``NONE_HASH`` for this setup."""

    def block(self, parent: bytes | None, tokens: Sequence[int], extra_keys: ExtraKeys) -> bytes:
        """The digest of one full block after ``parent`` (``None`` for the first block)."""
        return self._function(
            (parent if parent is not None else self.root, tuple(tokens), extra_keys)
        )

    def chain(
        self,
        token_ids: Sequence[int],
        digests: list[bytes],
        upto_blocks: int | None = None,
        lora: tuple[str, str] | None = None,
        cache_salt: str | None = None,
    ) -> list[bytes]:
        """Append to ``digests`` the digests of the full blocks of ``token_ids`` it lacks
        (up to ``upto_blocks``), and return it."""
        size = self.block_size
        full = len(token_ids) // size
        if upto_blocks is not None:
            full = min(full, upto_blocks)
        parent = digests[-1] if digests else None
        for index in range(len(digests), full):
            extra = block_extra_keys(index, lora, cache_salt)
            parent = self.block(parent, token_ids[index * size : (index + 1) * size], extra)
            digests.append(parent)
        return digests

    def hashes(
        self,
        token_ids: Sequence[int],
        lora: tuple[str, str] | None = None,
        cache_salt: str | None = None,
    ) -> list[int]:
        """The published hashes of every full block of ``token_ids``."""
        return [external_hash(d) for d in self.chain(token_ids, [], None, lora, cache_salt)]


def block_hashes(
    token_ids: Sequence[int],
    block_size: int,
    algorithm: str = "sha256",
    seed: str | None = None,
    lora: tuple[str, str] | None = None,
    cache_salt: str | None = None,
) -> list[int]:
    """The hashes a vLLM pod publishes for the full blocks of ``token_ids``."""
    return BlockHasher(algorithm, block_size, seed).hashes(token_ids, lora, cache_salt)
