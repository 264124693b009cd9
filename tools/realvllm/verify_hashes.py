"""Recomputes the block hashes in captured vLLM KV events from token ids, independently of vLLM.

    python -m tools.realvllm.verify_hashes [tests/fixtures/vllm/kv-events]

For every case folder (case.json, frames.jsonl, requests.jsonl written by capture.py) it checks:
  events    each BlockStored hash, chained from its parent_block_hash over the event's own
            token_ids, equals the published 64-bit value
  requests  each request's full prompt blocks (token ids from /tokenize) hash to values that
            vLLM published as stored
  removed   each BlockRemoved hash was published as stored before
and prints one line per check and case. Exit status 1 on any mismatch.

The serializers are written out by hand (pickle protocol 5 and canonical CBOR for exactly the
shapes vLLM hashes) and cross-checked against the pickle module and cbor2 when importable: the
recipe in tests/fixtures/vllm/README.md is what this file does.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

DEFAULT_SEED = "vllm-none-hash"
"""vLLM's NONE_HASH seed for sha256 and sha256_cbor when PYTHONHASHSEED is unset."""

# The value a block hash is computed over: (parent digest, token ids, extra keys). Extra keys are
# None, or a tuple of tagged tuples such as ("lora", name, path).
Extra = tuple[tuple[str, ...], ...] | None


# -- pickle protocol 5, by hand ------------------------------------------------------------


class _Pickler:
    """pickle.dumps(obj, protocol=5) for str, bytes, int, None and tuples of them: the opcodes
    CPython's C pickler emits (FRAME header, MEMOIZE after every str/bytes/tuple)."""

    def __init__(self) -> None:
        self.out = bytearray()

    def save(self, obj: object) -> None:
        out = self.out
        if obj is None:
            out += b"N"
        elif isinstance(obj, bool):
            raise TypeError("bool not needed")
        elif isinstance(obj, int):
            if 0 <= obj < 0x100:
                out += b"K" + bytes([obj])
            elif 0 <= obj < 0x10000:
                out += b"M" + struct.pack("<H", obj)
            elif -(2**31) <= obj < 2**31:
                out += b"J" + struct.pack("<i", obj)
            else:
                raise ValueError("ints beyond 32 bits are not needed for token ids")
        elif isinstance(obj, bytes):
            if len(obj) < 0x100:
                out += b"C" + bytes([len(obj)]) + obj  # SHORT_BINBYTES
            else:
                out += b"B" + struct.pack("<I", len(obj)) + obj  # BINBYTES
            out += b"\x94"  # MEMOIZE
        elif isinstance(obj, str):
            data = obj.encode("utf-8")
            if len(data) < 0x100:
                out += b"\x8c" + bytes([len(data)]) + data  # SHORT_BINUNICODE
            else:
                out += b"X" + struct.pack("<I", len(data)) + data  # BINUNICODE
            out += b"\x94"
        elif isinstance(obj, tuple):
            if not obj:
                out += b")"  # EMPTY_TUPLE (not memoized)
                return
            if len(obj) <= 3:
                for item in obj:
                    self.save(item)
                out += (b"\x85", b"\x86", b"\x87")[len(obj) - 1]  # TUPLE1/2/3
            else:
                out += b"("  # MARK
                for item in obj:
                    self.save(item)
                out += b"t"  # TUPLE
            out += b"\x94"
        else:
            raise TypeError(f"cannot pickle {type(obj).__name__} here")


def pickle5(obj: object) -> bytes:
    """PROTO 5, one FRAME (the whole pickle is far below the 64 KiB frame size), body, STOP."""
    p = _Pickler()
    p.save(obj)
    body = bytes(p.out) + b"."
    if len(body) >= 64 * 1024:
        raise ValueError("multi-frame pickles are not implemented")
    return b"\x80\x05" + b"\x95" + struct.pack("<Q", len(body)) + body


# -- canonical CBOR, by hand ---------------------------------------------------------------


def _cbor_head(major: int, n: int) -> bytes:
    if n < 24:
        return bytes([major << 5 | n])
    for info, fmt in ((24, ">B"), (25, ">H"), (26, ">I"), (27, ">Q")):
        if n < 1 << (8 * struct.calcsize(fmt)):
            return bytes([major << 5 | info]) + struct.pack(fmt, n)
    raise ValueError(n)


def cbor_canonical(obj: object) -> bytes:
    """cbor2.dumps(obj, canonical=True) for str, bytes, int, None and tuples (as arrays)."""
    if obj is None:
        return b"\xf6"
    if isinstance(obj, bool):
        raise TypeError("bool not needed")
    if isinstance(obj, int):
        return _cbor_head(0, obj) if obj >= 0 else _cbor_head(1, -1 - obj)
    if isinstance(obj, bytes):
        return _cbor_head(2, len(obj)) + obj
    if isinstance(obj, str):
        data = obj.encode("utf-8")
        return _cbor_head(3, len(data)) + data
    if isinstance(obj, tuple):
        return _cbor_head(4, len(obj)) + b"".join(cbor_canonical(x) for x in obj)
    raise TypeError(f"cannot encode {type(obj).__name__} here")


SERIALIZERS: dict[str, Callable[[object], bytes]] = {
    "sha256": pickle5,
    "sha256_cbor": cbor_canonical,
}


def _library_serializer(algo: str) -> Callable[[object], bytes] | None:
    """The library vLLM itself uses, to cross-check the hand-written encoder (None if absent)."""
    try:
        if algo == "sha256":
            import pickle

            return lambda obj: pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        import cbor2

        return lambda obj: bytes(cbor2.dumps(obj, canonical=True))
    except ImportError:
        return None


# -- the recipe ----------------------------------------------------------------------------


@dataclass
class Hasher:
    """vLLM's prefix-cache block hash for one hash algorithm and seed."""

    algo: str
    seed: str | None  # PYTHONHASHSEED as vLLM saw it; None when unset
    cross_checks: int = 0
    _lib: Callable[[object], bytes] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.algo not in SERIALIZERS:
            raise ValueError(
                f"hash algo {self.algo!r} is not reproducible (xxhash* seeds are random)"
            )
        self._lib = _library_serializer(self.algo)

    def digest(self, obj: object) -> bytes:
        data = SERIALIZERS[self.algo](obj)
        if self._lib is not None:
            if self._lib(obj) != data:
                raise AssertionError(
                    f"hand-written {self.algo} serializer differs for {obj!r:.200}"
                )
            self.cross_checks += 1
        return hashlib.sha256(data).digest()

    @property
    def none_hash(self) -> bytes:
        """The parent of block 0: H(seed string)."""
        return self.digest(self.seed if self.seed is not None else DEFAULT_SEED)

    def block(self, parent: bytes | None, tokens: Sequence[int], extra: Extra) -> bytes:
        """H((parent digest or NONE_HASH, tuple(token ids of this full block), extra keys))."""
        return self.digest((parent if parent else self.none_hash, tuple(tokens), extra))

    def chain(
        self, tokens: Sequence[int], block_size: int, extra: Extra, parent: bytes | None = None
    ) -> list[bytes]:
        """Digests of every full block of tokens (a trailing partial block is not hashed)."""
        out = []
        for i in range(len(tokens) // block_size):
            parent = self.block(parent, tokens[i * block_size : (i + 1) * block_size], extra)
            out.append(parent)
        return out


def published(digest: bytes) -> int:
    """What KV events carry: the digest's last 8 bytes as a big-endian unsigned int (its low 64
    bits; VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1, the default)."""
    return int.from_bytes(digest[-8:], "big")


def lora_extra(name: str | None, path: str | None) -> Extra:
    """Extra keys of a LoRA request: one tagged tuple with the adapter's name and the lora_path
    string exactly as given to /v1/load_lora_adapter; None for the base model."""
    if name is None:
        return None
    if path is None:
        raise ValueError(f"no lora_path recorded for {name!r}")
    return (("lora", name, path),)


# -- checking a captured case --------------------------------------------------------------


@dataclass
class Result:
    name: str
    ok: int = 0
    bad: list[str] = field(default_factory=list)

    def line(self, case: str) -> str:
        total = self.ok + len(self.bad)
        status = "MATCH" if not self.bad and total else ("EMPTY" if not total else "MISMATCH")
        head = f"{status:8} {case:32} {self.name:10} {self.ok}/{total}"
        return head + "".join(f"\n         {b}" for b in self.bad[:5])


def verify_case(folder: Path) -> list[Result]:
    case = json.loads((folder / "case.json").read_text())
    hasher = Hasher(case["hash_algo"], case["PYTHONHASHSEED"])
    lora_paths: dict[str, str] = case.get("lora_paths") or {}
    requests = [json.loads(line) for line in (folder / "requests.jsonl").open()]
    events: list[dict[str, Any]] = []
    frames = Result("frames")
    for expected_seq, line in enumerate((folder / "frames.jsonl").open()):
        frame = json.loads(line)
        topic = bytes.fromhex(frame["topic"]).decode()
        seq = int.from_bytes(bytes.fromhex(frame["seq"]), "big")
        if frame["n_frames"] == 3 and topic == case["topic"] and seq == expected_seq:
            frames.ok += 1
        else:
            frames.bad.append(f"frame {expected_seq}: {frame['n_frames']} parts, {topic!r}, {seq}")
        _ts, batch_events, *_ = msgpack.unpackb(bytes.fromhex(frame["payload"]), raw=False)
        events.extend(batch_events)

    known: dict[int, bytes] = {}  # published value -> full digest, from events checked so far
    stored: set[int] = set()
    ev = Result("events")
    removed = Result("removed")
    for e in events:
        if e["type"] == "BlockStored":
            name = e.get("lora_name")
            extra = lora_extra(name, lora_paths.get(name) if name else None)
            parent_pub = e["parent_block_hash"]
            parent = None if parent_pub is None else known.get(parent_pub)
            if parent_pub is not None and parent is None:
                ev.bad.append(f"parent {parent_pub} of a BlockStored was never seen")
                continue
            digests = hasher.chain(e["token_ids"], e["block_size"], extra, parent)
            if len(digests) != len(e["block_hashes"]):
                ev.bad.append(f"{len(e['token_ids'])} tokens vs {len(e['block_hashes'])} hashes")
                continue
            for got, want in zip(digests, e["block_hashes"], strict=True):
                known[published(got)] = got
                stored.add(want)
                if published(got) == want:
                    ev.ok += 1
                else:
                    ev.bad.append(f"computed {published(got)} published {want}")
            if name is not None:
                expected_keys = [[name]] * len(e["block_hashes"])
                if [list(k) if k else k for k in e.get("extra_keys") or []] != expected_keys:
                    ev.bad.append(f"extra_keys {e.get('extra_keys')} (expected {expected_keys})")
        elif e["type"] == "BlockRemoved":
            for h in e["block_hashes"]:
                if h in stored:
                    removed.ok += 1
                else:
                    removed.bad.append(f"removed {h} never stored")

    req = Result("requests")
    for r in requests:
        if "prompt_token_ids" not in r:
            continue
        extra = lora_extra(r.get("lora_name"), r.get("lora_path"))
        for i, d in enumerate(hasher.chain(r["prompt_token_ids"], case["block_size"], extra)):
            if published(d) in stored:
                req.ok += 1
            else:
                req.bad.append(f"{r['step']}: block {i} ({published(d)}) not among stored")
    checks = Result("serializer")  # hand-written bytes == pickle/cbor2 bytes (else it raised)
    checks.ok = hasher.cross_checks
    return [frames, ev, req, removed, checks]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    root = Path(args[0]) if args else Path("tests/fixtures/vllm/kv-events")
    cases = sorted(p.parent for p in root.glob("*/case.json"))
    if not cases:
        print(f"no cases under {root}")
        return 1
    failed = False
    for folder in cases:
        for result in verify_case(folder):
            print(result.line(folder.name))
            failed |= bool(result.bad) or (result.name in ("frames", "events") and not result.ok)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
