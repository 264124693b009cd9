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
import unicodedata
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import IntEnum
from importlib import resources
from typing import Any

from redis.typing import EncodableT

from extproc.users.script_batcher import ScriptBatcher
from extproc.users.sliding_window import BUCKET_MS, BUCKETS, WINDOW_MS, SlidingWindow

MAX_LIMIT = 10**12
"""Largest rpm/tpm accepted (exact in the doubles Lua computes with)."""
MAX_NAME_LENGTH = 256
FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})
"""Unicode categories a user name may not contain: controls (C0, DEL, C1 such as U+0085 and
U+009B), format characters (U+200B, U+202E and the other bidi overrides), line and paragraph
separators, and lone surrogates. They would let a name hide or forge text in logs, terminals and
headers."""
CHECK_LANES = 4
"""Batches of rate-limit checks on the wire at once, one connection each (see
``script_batcher``): a batch carries every check that queued while the previous one was out."""
MAX_BATCH = 128
"""Checks per batch: a 1,000-request burst is 8 batches, on 4 connections."""
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
    a user's keys in one slot); control and format characters (``FORBIDDEN_CATEGORIES``) because
    names end up in logs, error messages and headers.
    """
    if not name:
        return "must not be empty"
    if len(name) > MAX_NAME_LENGTH:
        return f"must be at most {MAX_NAME_LENGTH} characters"
    if "{" in name or "}" in name:
        return "must not contain braces"
    if not name.isprintable():  # a superset of the forbidden categories; the common case is fast
        for ch in name:
            if unicodedata.category(ch) in FORBIDDEN_CATEGORIES:
                return f"must not contain control or format characters (found U+{ord(ch):04X})"
    return None


def printable(name: str) -> str:
    """``name`` with its forbidden characters written as ``\\uXXXX``, safe to echo or log."""
    if name.isprintable():
        return name
    return "".join(
        f"\\u{ord(ch):04x}" if unicodedata.category(ch) in FORBIDDEN_CATEGORIES else ch
        for ch in name
    )


class UserStore(ABC):
    remote: bool = False
    """True when calls leave the process: they then bound their own time (raising
    ``TimeoutError``) and may fail, and the caller applies a failure policy."""

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
    """Users and windows in Redis, shared by every replica; each call is one script call.

    Keys: ``extproc:{<name>}:user`` (hash name/rpm/tpm), ``extproc:{<name>}:rpm`` and
    ``extproc:{<name>}:tpm`` (windows, expiring 61 s after their last write). Checks go through
    their own batcher (``CHECK_LANES`` connections); charges and the users API share another
    (one connection), so neither ever waits behind the other. Every call is bounded by
    ``timeout`` of Redis's time on the wire, ``max_wait`` in all (``wire_timeout``).
    """

    remote = True

    def __init__(self, url: str, timeout: float, max_wait: float) -> None:
        source = resources.files("extproc.users").joinpath("users.lua").read_text()
        self._checks = ScriptBatcher(
            url, source, lanes=CHECK_LANES, max_batch=MAX_BATCH, timeout=timeout, max_wait=max_wait
        )
        self._writes = ScriptBatcher(
            url, source, lanes=1, max_batch=MAX_BATCH, timeout=timeout, max_wait=max_wait
        )

    async def create(self, user: User) -> None:
        created = await self._write("create", user.name, user.name, user.rpm, user.tpm)
        if not created:
            raise UserExists(user.name)

    async def read(self, name: str) -> User:
        return User(name, *_limits(name, await self._write("read", name)))

    async def update(self, name: str, rpm: int | None, tpm: int | None) -> User:
        return User(name, *_limits(name, await self._write("update", name, _arg(rpm), _arg(tpm))))

    async def delete(self, name: str) -> None:
        if not await self._write("delete", name):
            raise UserNotFound(name)

    async def admit(self, name: str, defaults: tuple[int, int] | None) -> Verdict:
        rpm, tpm = defaults if defaults is not None else ("", "")
        args = ("admit", BUCKET_MS, BUCKETS, rpm, tpm)
        decision, limit, wait, user_tpm = await self._checks.call(_keys(name), args)
        if decision == Decision.ADMITTED and not user_tpm:
            return UNLIMITED
        return Verdict(Decision(decision), int(limit), int(wait), int(user_tpm))

    async def charge(self, charges: Mapping[str, int]) -> None:
        await self._writes.call_many(
            [
                (_keys(name), ("charge", BUCKET_MS, BUCKETS, tokens))
                for name, tokens in charges.items()
            ]
        )

    async def close(self) -> None:
        await self._checks.close()
        await self._writes.close()

    async def _write(self, op: str, name: str, *args: EncodableT) -> Any:
        return await self._writes.call(_keys(name), (op, BUCKET_MS, BUCKETS, *args))


def _key(name: str, kind: str) -> str:
    return f"{KEY_PREFIX}{{{name}}}:{kind}"


def _keys(name: str) -> tuple[str, str, str]:
    return (_key(name, "user"), _key(name, "rpm"), _key(name, "tpm"))


def _limits(name: str, row: list[bytes | None] | None) -> tuple[int, int]:
    """A row's ``(rpm, tpm)``; ``UserNotFound`` when the script found none."""
    if row is None or row[0] is None:
        raise UserNotFound(name)
    return int(row[0]), int(row[1] or 0)


def _arg(value: int | None) -> int | str:
    return "" if value is None else value


def _monotonic_ms() -> int:
    return time.monotonic_ns() // 1_000_000
