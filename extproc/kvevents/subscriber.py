"""One publishing pod's KV-cache event stream, kept in the exact index.

A task per pod connects a ZMQ SUB socket to the pod's publisher (the pod binds it), reads every
message and applies it to the index, off the request path. ZMQ reconnects by itself; a socket
monitor says when the publisher is reachable. What the index knows about the pod is dropped
(or rebuilt through the pod's replay endpoint, when configured) whenever it may be wrong: on
connecting, on a gap in the sequence numbers, and when the sequence starts again (a restarted
pod).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import zmq
import zmq.asyncio
from zmq.utils.monitor import recv_monitor_message

from extproc.kvevents.index import ExactIndex
from extproc.kvevents.wire import Batch, Cleared, Removed, Stored, WireError, decode
from extproc.tasks import cancel_and_wait
from extproc.telemetry import Telemetry

log = logging.getLogger(__name__)

REPLAY_TIMEOUT = 2.0
END_OF_REPLAY = (-1).to_bytes(8, "big", signed=True)


@dataclass
class PodEvents:
    """What is known about one pod's event stream (read by the debug API and metrics)."""

    endpoint: str
    replay: str | None = None
    connected: bool = False
    seq: int | None = None
    last_event_at: float | None = None
    """When the last message arrived (monotonic)."""
    last_published: float | None = None
    """The publisher's own timestamp on it (wall clock): the lag is now minus this."""
    block_size: int | None = None
    received: int = 0
    gaps: int = 0
    resyncs: int = 0
    error: str = ""


class Subscriber:
    def __init__(
        self,
        pod: str,
        state: PodEvents,
        index: ExactIndex,
        telemetry: Telemetry,
        context: zmq.asyncio.Context,
    ) -> None:
        self._pod = pod
        self.state = state
        self._index = index
        self._telemetry = telemetry
        self._context = context

    async def run(self) -> None:
        state = self.state
        socket = self._context.socket(zmq.SUB)
        socket.setsockopt(zmq.SUBSCRIBE, b"")
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.RECONNECT_IVL, 100)
        socket.setsockopt(zmq.RECONNECT_IVL_MAX, 5000)
        monitor = socket.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        watcher = asyncio.get_running_loop().create_task(self._watch(monitor))
        try:
            socket.connect(state.endpoint)
            while True:
                frames = await socket.recv_multipart()
                try:
                    batch = decode(frames)
                except WireError as exc:
                    self._telemetry.kv_events.labels("malformed").inc()
                    if not state.error:
                        log.warning("bad KV-event message: %s", exc, extra={"pod": self._pod})
                    state.error = str(exc)
                    continue
                await self._take(batch)
        finally:
            await cancel_and_wait([watcher])
            socket.disable_monitor()
            monitor.close(0)
            socket.close(0)

    async def _watch(self, monitor: zmq.asyncio.Socket) -> None:
        while True:
            event = await recv_monitor_message(monitor)
            connected = event["event"] == zmq.EVENT_CONNECTED
            state = self.state
            if connected == state.connected:
                continue
            state.connected = connected
            if connected and state.received:
                # Back after a loss: whatever happened meanwhile is unknown; start over.
                self._resync("reconnected")
            log.info("KV events %s", "connected" if connected else "lost", extra={"pod": self._pod})

    async def _take(self, batch: Batch) -> None:
        state = self.state
        if state.seq is None and batch.seq > 0:
            await self._replay(0, batch.seq)  # what the pod's buffer still holds, if it can
        elif state.seq is not None and batch.seq != state.seq + 1:
            if batch.seq <= state.seq:
                self._resync("restarted")  # the publisher began again at 0
            else:
                state.gaps += 1
                self._telemetry.kv_events.labels("gap").inc()
                if not await self._replay(state.seq + 1, batch.seq):
                    self._resync("gap")
        state.seq = batch.seq
        self._apply(batch)

    def _apply(self, batch: Batch) -> None:
        state = self.state
        index = self._index
        for event in batch.events:
            if isinstance(event, Stored):
                index.stored(self._pod, event.hashes)
                if event.block_size:
                    state.block_size = event.block_size
            elif isinstance(event, Removed):
                index.removed(self._pod, event.hashes)
            elif isinstance(event, Cleared):
                index.clear(self._pod)
        state.received += 1
        state.last_event_at = time.monotonic()
        state.last_published = batch.ts
        self._telemetry.kv_events.labels("batch").inc()

    async def _replay(self, start: int, stop: int) -> bool:
        """Fetch batches ``start`` to ``stop - 1`` from the pod's replay endpoint; False when
        it has none or they cannot all be had."""
        if self.state.replay is None:
            return False
        socket = self._context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        try:
            socket.connect(self.state.replay)
            await socket.send_multipart([b"", start.to_bytes(8, "big")])
            expected = start
            while expected < stop:
                frames = await asyncio.wait_for(socket.recv_multipart(), REPLAY_TIMEOUT)
                if len(frames) >= 3 and frames[2] == END_OF_REPLAY:
                    break
                batch = decode(frames[1:])
                if batch.seq != expected:
                    return False
                self._apply(batch)
                expected += 1
            self._telemetry.kv_events.labels("replayed").inc()
            return expected >= stop
        except (TimeoutError, WireError, zmq.ZMQError):
            return False
        finally:
            socket.close(0)

    def _resync(self, reason: str) -> None:
        self.state.resyncs += 1
        self.state.seq = None
        self._index.clear(self._pod)
        self._telemetry.kv_events.labels(f"resync_{reason}").inc()
