"""KV-cache events on ZMQ, on the wire exactly as vLLM's ``ZmqEventPublisher`` sends them.

A PUB socket sends one message per engine step that changed the cache: three frames, the topic,
an 8-byte big-endian sequence number counting from 0 for the life of the publisher, and a
msgpack payload ``[ts, [event, ...], data_parallel_rank]``. Each event is a map tagged by
``"type"`` whose fields at their default values are left out, as msgspec encodes vLLM's
structs. An optional ROUTER socket replays buffered messages: a client sends
``[b"", start_seq]`` and gets ``[b"", topic, seq, payload]`` for every buffered message from
``start_seq`` on, then ``[b"", b"", -1 as 8 signed bytes, b""]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import msgpack
import zmq
import zmq.asyncio

log = logging.getLogger(__name__)

MEDIUM_GPU = "GPU"
END_SEQ = (-1).to_bytes(8, "big", signed=True)
"""The replay endpoint's end-of-replay marker."""

Event = dict[str, Any]


def block_stored(
    block_hashes: Sequence[int],
    parent_block_hash: int | None,
    token_ids: Sequence[int],
    block_size: int,
    lora_id: int | None,
    lora_name: str | None,
    extra_keys: Sequence[list[Any] | None],
) -> Event:
    """Newly cached full blocks of one request (one event per step and request).

    ``extra_keys`` has one entry per block, untagged as vLLM publishes them: the adapter's
    name, then the cache salt (block 0 only), or ``None``.
    """
    return {
        "type": "BlockStored",
        "block_hashes": list(block_hashes),
        "parent_block_hash": parent_block_hash,
        "token_ids": list(token_ids),
        "block_size": block_size,
        "lora_id": lora_id,
        "medium": MEDIUM_GPU,
        "lora_name": lora_name,
        "extra_keys": list(extra_keys),
        "group_idx": 0,
        "kv_cache_spec_kind": "full_attention",
    }


def block_removed(block_hashes: Sequence[int]) -> Event:
    """Blocks evicted from the cache to make room (one event per evicted block, as vLLM)."""
    return {
        "type": "BlockRemoved",
        "block_hashes": list(block_hashes),
        "medium": MEDIUM_GPU,
        "group_idx": 0,
    }


def all_blocks_cleared() -> Event:
    """The whole prefix cache was reset."""
    return {"type": "AllBlocksCleared"}


def encode_batch(events: Sequence[Event], ts: float, data_parallel_rank: int = 0) -> bytes:
    """The payload frame of one message."""
    payload: bytes = msgpack.packb([ts, list(events), data_parallel_rank])
    return payload


class KVEventPublisher:
    """One pod's publisher: ``start()`` binds, ``publish()`` queues a step's events (never
    blocks), a background task sends them in order and keeps the last ``buffer_steps``
    messages for replay.

    Ports of 0 are chosen by the system at bind time; ``port`` and ``replay_port`` then hold
    the bound ones.
    """

    def __init__(
        self,
        host: str,
        port: int,
        topic: str,
        replay_port: int | None = None,
        buffer_steps: int = 10_000,
        data_parallel_rank: int = 0,
        hwm: int = 100_000,
    ) -> None:
        self.host = host
        self.port = port
        self.topic = topic
        self.replay_port = replay_port
        self.data_parallel_rank = data_parallel_rank
        self._hwm = hwm
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._queue: asyncio.Queue[tuple[float, list[Event]] | None] = asyncio.Queue()
        self._seq = itertools.count()
        self._ctx: zmq.asyncio.Context | None = None
        self._pub: zmq.asyncio.Socket | None = None
        self._router: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.sent = 0
        """Messages sent so far (the next sequence number)."""

    @property
    def endpoint(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    @property
    def replay_endpoint(self) -> str | None:
        return None if self.replay_port is None else f"tcp://{self.host}:{self.replay_port}"

    def config(self, port: int, replay_port: int | None) -> dict[str, Any]:
        """The publisher's KV-events config as vLLM reports it: a configured port as
        ``tcp://*:PORT`` (bound on every address of the pod), a port chosen at bind time
        (configured 0) as the address and port bound."""

        def advertised(configured: int | None, bound: int | None) -> str | None:
            if configured is None or bound is None:
                return None
            return f"tcp://*:{configured}" if configured else f"tcp://{self.host}:{bound}"

        return {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": advertised(port, self.port),
            "replay_endpoint": advertised(replay_port, self.replay_port),
            "buffer_steps": self._buffer.maxlen,
            "hwm": self._hwm,
            "max_queue_size": self._hwm,
            "topic": self.topic,
        }

    async def start(self) -> None:
        ctx = zmq.asyncio.Context()
        self._ctx = ctx
        try:
            pub = ctx.socket(zmq.PUB)
            self._pub = pub
            pub.setsockopt(zmq.SNDHWM, self._hwm)
            pub.setsockopt(zmq.LINGER, 0)
            self.port = _bind(pub, self.host, self.port)
            if self.replay_port is not None:
                router = ctx.socket(zmq.ROUTER)
                self._router = router
                router.setsockopt(zmq.LINGER, 0)
                self.replay_port = _bind(router, self.host, self.replay_port)
                self._tasks.append(asyncio.create_task(self._serve_replay(router)))
        except BaseException:
            self._close()
            raise
        self._tasks.append(asyncio.create_task(self._send_loop(pub)))

    def publish(self, events: list[Event], ts: float | None = None) -> None:
        """Queue one step's events; an empty list sends nothing (as vLLM)."""
        if events and self._pub is not None:
            self._queue.put_nowait((time.time() if ts is None else ts, events))

    async def stop(self) -> None:
        """Send what is queued, then close the sockets."""
        if self._pub is None:
            return
        self._queue.put_nowait(None)
        sender = self._tasks[-1]
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(sender), 1.0)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        self._close()

    def _close(self) -> None:
        for sock in (self._pub, self._router):
            if sock is not None:
                sock.close(linger=0)
        self._pub = self._router = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    async def _send_loop(self, pub: zmq.asyncio.Socket) -> None:
        topic = self.topic.encode()
        while True:
            item = await self._queue.get()
            if item is None:
                return
            ts, events = item
            seq = next(self._seq)
            payload = encode_batch(events, ts, self.data_parallel_rank)
            try:
                await pub.send_multipart((topic, seq.to_bytes(8, "big"), payload))
            except zmq.ZMQError:
                log.exception("KV-event publish failed (seq %d)", seq)
            self._buffer.append((seq, payload))
            self.sent = seq + 1

    async def _serve_replay(self, router: zmq.asyncio.Socket) -> None:
        topic = self.topic.encode()
        while True:
            request = await router.recv_multipart()
            if len(request) != 3:
                log.warning("invalid KV-event replay request with %d frames", len(request))
                continue
            client, _, start = request
            first = int.from_bytes(start, "big")
            for seq, payload in list(self._buffer):
                if seq >= first:
                    reply = (client, b"", topic, seq.to_bytes(8, "big"), payload)
                    await router.send_multipart(reply)
            await router.send_multipart((client, b"", b"", END_SEQ, b""))


def _bind(sock: zmq.asyncio.Socket, host: str, port: int) -> int:
    if port == 0:
        return int(sock.bind_to_random_port(f"tcp://{host}"))
    sock.bind(f"tcp://{host}:{port}")
    return port
