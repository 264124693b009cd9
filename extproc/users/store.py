"""The users store: who the users are, their limits, and what they consumed in the window.

Two implementations behind ``UserStore``: ``RedisUserStore`` (shared by every gateway replica;
one atomic script call per check, ``users.lua``) and ``MemoryUserStore`` (the embedded default,
one process). Both keep a user's row and its sliding windows (``sliding_window.py``) together,
so one call both reads the limits and checks them, and deleting a user forgets its usage.
Store errors (Redis down, timeouts) are raised as they come; the rate limiter and the users API
decide what they mean.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import IntEnum
from importlib import resources
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from extproc.users.sliding_window import BUCKET_MS, BUCKETS, WINDOW_MS, SlidingWindow

MAX_LIMIT = 10**12
"""Largest rpm/tpm accepted (exact in the doubles Lua computes with)."""
MAX_NAME_LENGTH = 256
REDIS_CONNECTIONS = 64
"""Connections per process; a request waiting for one counts against ``redis_timeout``."""
KEY_PREFIX = "extproc:"


@dataclass(frozen=True, slots=True)
class User:
    """A user row; a limit of 0 means no limit on that dimension."""

    name: str
    rpm: int = 0
    tpm: int = 0

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "rpm": self.rpm, "tpm": self.tpm}


class Decision(IntEnum):
    """A check's outcome; the values are what ``users.lua`` returns."""

    ADMITTED = 0
    OVER_RPM = 1
    OVER_TPM = 2
    UNKNOWN = 3


@dataclass(frozen=True, slots=True)
class Verdict:
    decision: Decision
    limit: int = 0
    """The limit exceeded (0 unless rejected)."""
    retry_after_ms: int = 0
    """When rejected: how long until the window lets a request through."""
    tpm: int = 0
    """The user's TPM limit: when > 0, the request's tokens must be charged when it ends."""


UNKNOWN = Verdict(Decision.UNKNOWN)
UNLIMITED = Verdict(Decision.ADMITTED)


class UserExists(Exception):
    pass


class UserNotFound(Exception):
    pass


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a user name, or ``None``.

    Braces are refused because Redis keys put the name in a ``{hash tag}`` (Redis Cluster keeps
    a user's keys in one slot); control characters because names end up in logs and headers.
    """
    if not name:
        return "must not be empty"
    if len(name) > MAX_NAME_LENGTH:
        return f"must be at most {MAX_NAME_LENGTH} characters"
    if any(ch in "{}" or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in name):
        return "must not contain braces or control characters"
    return None


class UserStore(ABC):
    remote: bool = False
    """True when calls leave the process (they then need a timeout and a failure policy)."""

    @abstractmethod
    async def create(self, user: User) -> None:
        """Add ``user``; ``UserExists`` if the name is taken."""

    @abstractmethod
    async def read(self, name: str) -> User:
        """The row; ``UserNotFound`` if there is none."""

    @abstractmethod
    async def update(self, name: str, rpm: int | None, tpm: int | None) -> User:
        """Change the given limits (``None`` keeps one); ``UserNotFound`` if unknown."""

    @abstractmethod
    async def delete(self, name: str) -> None:
        """Remove the row and its windows; ``UserNotFound`` if unknown."""

    @abstractmethod
    async def admit(self, name: str, defaults: tuple[int, int] | None) -> Verdict:
        """Check one request of ``name`` against its limits and, if admitted, count it.

        ``defaults`` are the ``(rpm, tpm)`` of a name with no row; ``None`` reports it unknown.
        A rejected request changes nothing.
        """

    @abstractmethod
    async def charge(self, charges: Mapping[str, int]) -> None:
        """Add tokens (user name -> count) to the users' token windows, now."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections."""


@dataclass(slots=True)
class _Windows:
    requests: SlidingWindow
    tokens: SlidingWindow
    used_at: int


class MemoryUserStore(UserStore):
    """Users and windows in this process: the embedded default, with nothing else to run."""

    def __init__(self, clock: Callable[[], int] | None = None) -> None:
        self._clock = clock or _monotonic_ms
        self._users: dict[str, User] = {}
        self._windows: OrderedDict[str, _Windows] = OrderedDict()

    async def create(self, user: User) -> None:
        if user.name in self._users:
            raise UserExists(user.name)
        self._users[user.name] = user

    async def read(self, name: str) -> User:
        user = self._users.get(name)
        if user is None:
            raise UserNotFound(name)
        return user

    async def update(self, name: str, rpm: int | None, tpm: int | None) -> User:
        old = await self.read(name)
        user = User(name, old.rpm if rpm is None else rpm, old.tpm if tpm is None else tpm)
        self._users[name] = user
        return user

    async def delete(self, name: str) -> None:
        if self._users.pop(name, None) is None:
            raise UserNotFound(name)
        self._windows.pop(name, None)

    async def admit(self, name: str, defaults: tuple[int, int] | None) -> Verdict:
        user = self._users.get(name)
        if user is not None:
            rpm, tpm = user.rpm, user.tpm
        elif defaults is not None:
            rpm, tpm = defaults
        else:
            return UNKNOWN
        if not rpm and not tpm:
            return UNLIMITED
        now = self._clock()
        windows = self._windows_of(name, now)
        if rpm:
            used = windows.requests.total(now)
            if used >= rpm:
                wait = windows.requests.retry_after_ms(now, used - rpm + 1)
                return Verdict(Decision.OVER_RPM, rpm, wait, tpm)
        if tpm:
            used = windows.tokens.total(now)
            if used >= tpm:
                wait = windows.tokens.retry_after_ms(now, used - tpm + 1)
                return Verdict(Decision.OVER_TPM, tpm, wait, tpm)
        if rpm:
            windows.requests.add(now, 1)
        return Verdict(Decision.ADMITTED, tpm=tpm)

    async def charge(self, charges: Mapping[str, int]) -> None:
        now = self._clock()
        for name, tokens in charges.items():
            self._windows_of(name, now).tokens.add(now, tokens)

    async def close(self) -> None:
        """Nothing to release."""

    def _windows_of(self, name: str, now: int) -> _Windows:
        """The name's windows, most recently used last; idle ones (all expired) are dropped."""
        windows = self._windows.get(name)
        if windows is None:
            windows = self._windows[name] = _Windows(SlidingWindow(), SlidingWindow(), now)
        else:
            windows.used_at = now
            self._windows.move_to_end(name)
        idle_before = now - WINDOW_MS - BUCKET_MS
        while True:
            oldest = next(iter(self._windows.values()))
            if oldest.used_at >= idle_before:
                return windows
            self._windows.popitem(last=False)


class RedisUserStore(UserStore):
    """Users and windows in Redis, shared by every replica; each call is one round trip.

    Keys: ``extproc:{<name>}:user`` (hash name/rpm/tpm), ``extproc:{<name>}:rpm`` and
    ``extproc:{<name>}:tpm`` (windows, expiring 61 s after their last write). Connections are
    bounded by ``timeout`` (connect, read, waiting for a free one). A connection error is retried
    once at once, so pooled connections left stale by a Redis restart cost no failed call; a
    timeout is not retried: the rate limiter decides what a failure means.
    """

    remote = True

    def __init__(self, url: str, timeout: float) -> None:
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=REDIS_CONNECTIONS,
            timeout=timeout,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )
        self._redis = Redis(connection_pool=pool)
        source = resources.files("extproc.users").joinpath("users.lua").read_text()
        self._script = self._redis.register_script(source)

    async def create(self, user: User) -> None:
        created = await self._call("create", user.name, user.name, user.rpm, user.tpm)
        if not created:
            raise UserExists(user.name)

    async def read(self, name: str) -> User:
        rpm, tpm = await self._redis.hmget(_key(name, "user"), ["rpm", "tpm"])
        if rpm is None:
            raise UserNotFound(name)
        return User(name, int(rpm), int(tpm or 0))

    async def update(self, name: str, rpm: int | None, tpm: int | None) -> User:
        row = await self._call("update", name, _arg(rpm), _arg(tpm))
        if row is None:
            raise UserNotFound(name)
        return User(name, int(row[0]), int(row[1] or 0))

    async def delete(self, name: str) -> None:
        if not await self._call("delete", name):
            raise UserNotFound(name)

    async def admit(self, name: str, defaults: tuple[int, int] | None) -> Verdict:
        rpm, tpm = defaults if defaults is not None else ("", "")
        decision, limit, wait, user_tpm = await self._call("admit", name, rpm, tpm)
        if decision == Decision.ADMITTED and not user_tpm:
            return UNLIMITED
        return Verdict(Decision(decision), int(limit), int(wait), int(user_tpm))

    async def charge(self, charges: Mapping[str, int]) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            for name, tokens in charges.items():
                await self._script(_keys(name), ("charge", BUCKET_MS, BUCKETS, tokens), pipe)
            await pipe.execute()

    async def close(self) -> None:
        await self._redis.aclose(close_connection_pool=True)

    async def _call(self, op: str, name: str, *args: str | int) -> Any:
        return await self._script(_keys(name), (op, BUCKET_MS, BUCKETS, *args))


def _key(name: str, kind: str) -> str:
    return f"{KEY_PREFIX}{{{name}}}:{kind}"


def _keys(name: str) -> tuple[str, str, str]:
    return (_key(name, "user"), _key(name, "rpm"), _key(name, "tpm"))


def _arg(value: int | None) -> int | str:
    return "" if value is None else value


def _monotonic_ms() -> int:
    return time.monotonic_ns() // 1_000_000
