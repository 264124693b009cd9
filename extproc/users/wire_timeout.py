"""A timeout for Redis calls that a busy event loop does not trip.

``asyncio.timeout`` measures wall time. When a burst keeps the event loop busy, Redis's answer
can sit unread in the socket while the timer comes due, and the call "times out" although Redis
answered in a millisecond; the rate limiter would then take a healthy Redis for a failed one.
``WireTimeout`` only fires once the loop has demonstrably had the chance to read an answer:

- the call has been out for ``timeout`` (its clock starts when the caller enters the block, which
  callers do when they put the command on the wire, not while they queue for a connection);
- then the loop must be seen responsive twice in a row: two ticks ``grace`` apart that each
  run no more than ``grace`` late. A late tick means the loop was stalled, so whatever Redis
  sent meanwhile is unread: the count starts over. Two punctual ticks mean the loop polled its
  sockets and ran the waiting task in between, so an answer that arrived before the deadline
  has been consumed and the block has left, whichever loop (asyncio, uvloop) runs it.
- ``max_wait`` bounds it all: a loop that stays too busy to tell still ends the call then.
"""

from __future__ import annotations

import asyncio
from types import TracebackType

GRACE_FRACTION = 0.25
"""``grace`` as a fraction of ``timeout``: the lateness that marks a stalled loop."""


class WireTimeout:
    """``async with WireTimeout(timeout, max_wait): ...`` raises ``TimeoutError`` as above."""

    __slots__ = (
        "_cancelling",
        "_due",
        "_expired",
        "_grace",
        "_handle",
        "_loop",
        "_max_wait",
        "_punctual",
        "_started",
        "_task",
        "_timeout",
    )

    def __init__(self, timeout: float, max_wait: float) -> None:
        self._timeout = timeout
        self._grace = timeout * GRACE_FRACTION
        self._max_wait = max(max_wait, timeout)

    async def __aenter__(self) -> WireTimeout:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("WireTimeout must be used inside a task")
        self._loop = loop
        self._task = task
        self._cancelling = task.cancelling()
        self._expired = False
        self._punctual = False
        self._started = loop.time()
        self._arm(self._started + self._timeout)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._handle.cancel()
        if (
            self._expired
            and exc_type is asyncio.CancelledError
            and self._task.uncancel() <= self._cancelling
        ):
            raise TimeoutError(f"no answer from Redis within {self._timeout:g}s") from exc

    def _arm(self, when: float) -> None:
        self._due = when
        self._handle = self._loop.call_at(when, self._tick)

    def _tick(self) -> None:
        now = self._loop.time()
        punctual = now - self._due <= self._grace
        if (punctual and self._punctual) or now - self._started >= self._max_wait:
            self._expired = True
            self._task.cancel()
            return
        self._punctual = punctual
        self._arm(now + self._grace)
