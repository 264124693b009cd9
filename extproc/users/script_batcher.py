"""Concurrent calls of one Redis script, pipelined onto a few connections.

A burst of rate-limit checks must not become a burst of round trips queued behind a connection
pool, where waiting for a connection looks, to a timeout, like Redis being slow. Here calls wait
in one local queue, which is not Redis's time; up to ``lanes`` batches are on the wire at once,
each a single pipelined write of up to ``max_batch`` ``EVALSHA`` commands on its own connection,
and a lane that gets its answers takes whatever queued meanwhile. The busier it gets, the fewer
round trips per call, and Redis still runs each script atomically, one after the other.

Each batch is bounded by ``WireTimeout`` from the moment its lane takes a connection to send it
(connecting included), so only Redis's own slowness and real connection failures fail it. A
failed batch fails every call in it and every call still queued: they would meet the same Redis,
and their callers apply a failure policy at once instead of a timeout each. A script error
answers only its own call. A connection error is retried once, at once, for the calls not yet
answered: a pooled connection left stale by a Redis restart then costs no failed call (a batch
whose answers were lost mid-way may run twice: a limit can only come out stricter). ``NOSCRIPT``
(Redis restarted, or its scripts were flushed) loads the script and resends the calls it
refused, which had not run.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import ConnectionPool
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.typing import EncodableT

from extproc.users.wire_timeout import WireTimeout

Command = tuple[EncodableT, ...]


@dataclass(slots=True)
class _Call:
    command: Command
    future: asyncio.Future[Any]


class ScriptBatcher:
    def __init__(
        self,
        url: str,
        script: str,
        *,
        lanes: int,
        max_batch: int,
        timeout: float,
        max_wait: float,
    ) -> None:
        # One connection per lane, and a lane holds at most one at a time: the pool never waits.
        # Reads are bounded by WireTimeout, not by the socket (which measures wall time).
        self._pool = ConnectionPool.from_url(
            url,
            max_connections=lanes,
            socket_timeout=None,
            socket_connect_timeout=max(timeout, max_wait),
            retry=Retry(NoBackoff(), 0),
        )
        self._script = script
        self._sha = hashlib.sha1(script.encode()).hexdigest()
        self._lanes = lanes
        self._max_batch = max_batch
        self._timeout = timeout
        self._max_wait = max_wait
        self._queue: deque[_Call] = deque()
        self._active = 0
        """Lanes at work (a lane leaves as soon as it finds the queue empty)."""
        self._running: set[asyncio.Task[None]] = set()

    async def call(self, keys: Sequence[str], args: Sequence[EncodableT]) -> Any:
        """The script's answer for ``keys``/``args``; raises what Redis or the connection did."""
        return await self._submit(keys, args)

    async def call_many(self, calls: Sequence[tuple[Sequence[str], Sequence[EncodableT]]]) -> None:
        """Run every call; raises the first failure after all have ended."""
        futures = [self._submit(keys, args) for keys, args in calls]
        for outcome in await asyncio.gather(*futures, return_exceptions=True):
            if isinstance(outcome, BaseException):
                raise outcome

    async def close(self) -> None:
        """Stop the lanes; calls not answered yet fail with a connection error."""
        for task in list(self._running):
            task.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)
        _fail(list(self._queue), RedisConnectionError("the users store is closed"))
        self._queue.clear()
        await self._pool.aclose()

    def _submit(self, keys: Sequence[str], args: Sequence[EncodableT]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append(_Call(("EVALSHA", self._sha, len(keys), *keys, *args), future))
        if self._active < self._lanes:
            self._active += 1
            task = loop.create_task(self._lane(), name="users-store-lane")
            self._running.add(task)
            task.add_done_callback(self._running.discard)
        return future

    async def _lane(self) -> None:
        try:
            await self._drain()
        finally:
            self._active -= 1

    async def _drain(self) -> None:
        queue = self._queue
        while queue:
            batch: list[_Call] = []
            while queue and len(batch) < self._max_batch:
                call = queue.popleft()
                if not call.future.done():  # its caller may have gone
                    batch.append(call)
            if not batch:
                continue
            try:
                replies = await self._send([call.command for call in batch])
                for call, reply in zip(batch, replies, strict=True):
                    _settle(call.future, reply)
            except asyncio.CancelledError:
                _fail(batch, RedisConnectionError("the users store is closed"))
                raise
            except Exception as exc:
                _fail(batch + list(queue), exc)
                queue.clear()
                return

    async def _send(self, commands: list[Command]) -> list[Any]:
        """Every command's answer (an error answer as its exception), in order."""
        async with WireTimeout(self._timeout, self._max_wait):
            replies = await self._pipelined(commands)
            refused = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
            if refused:
                again = await self._pipelined([commands[i] for i in refused], load=True)
                for i, reply in zip(refused, again, strict=True):
                    replies[i] = reply
            return replies

    async def _pipelined(self, commands: list[Command], load: bool = False) -> list[Any]:
        replies: list[Any] = []
        try:
            await self._round_trip(commands, replies, load)
        except RedisConnectionError:
            await self._round_trip(commands, replies, load)
        return replies

    async def _round_trip(self, commands: list[Command], replies: list[Any], load: bool) -> None:
        """Send the commands not answered yet (``replies`` holds those that were) in one write,
        then read their answers into ``replies``; with ``load``, load the script first."""
        connection = await self._pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            pending = commands[len(replies) :]
            if load:
                pending = [("SCRIPT", "LOAD", self._script), *pending]
            await connection.send_packed_command(
                connection.pack_commands(pending), check_health=False
            )
            if load:
                await connection.read_response()
            for _ in range(len(pending) - load):
                replies.append(await _answer(connection))
        except BaseException:
            await connection.disconnect(nowait=True)
            raise
        finally:
            await self._pool.release(connection)


async def _answer(connection: AbstractConnection) -> Any:
    try:
        return await connection.read_response()
    except ResponseError as exc:  # an error answer: this command's, not the connection's
        return exc


def _settle(future: asyncio.Future[Any], reply: Any) -> None:
    if future.done():
        return
    if isinstance(reply, Exception):
        future.set_exception(reply)
    else:
        future.set_result(reply)


def _fail(calls: list[_Call], exc: BaseException) -> None:
    for call in calls:
        if not call.future.done():
            call.future.set_exception(exc)
