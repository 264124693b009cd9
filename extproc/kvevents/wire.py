"""Decoding vLLM's KV-cache event messages (ZMQ, msgpack), as a real vLLM 0.32 sends them.

A message is three frames: the topic, the sequence number (8 bytes, big-endian, from 0 for the
life of the publisher) and the payload, a msgpack array ``[ts, [event, ...],
data_parallel_rank]``. Each event is a map tagged by ``"type"``; fields at their defaults are
left out. Only what the index needs is kept: the published block hashes (64-bit integers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack


class WireError(ValueError):
    """A message that is not a KV-event batch."""


@dataclass(frozen=True, slots=True)
class Stored:
    hashes: tuple[int, ...]
    block_size: int | None
    lora_name: str | None


@dataclass(frozen=True, slots=True)
class Removed:
    hashes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Cleared:
    pass


Event = Stored | Removed | Cleared


@dataclass(frozen=True, slots=True)
class Batch:
    seq: int
    ts: float
    events: tuple[Event, ...]


def decode(frames: list[bytes]) -> Batch:
    """One ZMQ message's frames; raises ``WireError`` for anything else."""
    if len(frames) != 3 or len(frames[1]) != 8:
        raise WireError(f"expected topic, 8-byte sequence and payload, got {len(frames)} frames")
    seq = int.from_bytes(frames[1], "big")
    try:
        payload = msgpack.unpackb(frames[2], raw=False, strict_map_key=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise WireError(f"payload is not msgpack: {exc}") from None
    if not isinstance(payload, list) or len(payload) < 2 or not isinstance(payload[1], list):
        raise WireError("payload is not [ts, events, rank]")
    ts = float(payload[0]) if isinstance(payload[0], int | float) else 0.0
    return Batch(seq, ts, tuple(e for e in map(_event, payload[1]) if e is not None))


def _event(raw: Any) -> Event | None:
    """One event, or ``None`` for a kind the index has no use for."""
    if isinstance(raw, dict):
        kind = raw.get("type")
        fields = raw
    elif isinstance(raw, list) and raw and isinstance(raw[0], str):
        return None  # tagged arrays are not what vLLM 0.32 sends
    else:
        raise WireError(f"an event is a map with a type, not {type(raw).__name__}")
    if kind == "BlockStored":
        size = fields.get("block_size")
        lora = fields.get("lora_name")
        return Stored(
            _hashes(fields), size if isinstance(size, int) else None, lora if lora else None
        )
    if kind == "BlockRemoved":
        return Removed(_hashes(fields))
    if kind == "AllBlocksCleared":
        return Cleared()
    return None


def _hashes(fields: dict[str, Any]) -> tuple[int, ...]:
    hashes = fields.get("block_hashes", [])
    if not isinstance(hashes, list):
        raise WireError("block_hashes is not a list")
    out = []
    for value in hashes:
        if isinstance(value, bytes):
            value = int.from_bytes(value[-8:], "big")  # with VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0
        if not isinstance(value, int):
            raise WireError("a block hash is neither an integer nor bytes")
        out.append(value)
    return tuple(out)
