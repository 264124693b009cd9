"""Stopping background tasks: every component that owns a loop stops it the same way."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import Any


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any] | None]) -> None:
    """Cancel every task, then wait for each to finish, so nothing it holds outlives the stop.

    All are cancelled before any is awaited, so stopping N loops takes one loop's unwinding,
    not N. ``None`` entries (a loop never started) are skipped; the cancellation each task ends
    with is expected and swallowed, any other exception propagates.
    """
    running = [task for task in tasks if task is not None]
    for task in running:
        task.cancel()
    for task in running:
        with contextlib.suppress(asyncio.CancelledError):
            await task
