"""A minimal keep-alive HTTP/1.1 client that fetches one URL again and again.

The scraper GETs every pod's ``/metrics`` ten times a second. A general HTTP client spends most
of its time on what this job never needs (redirects, cookies, a coroutine and a timer per
request); this one is an ``asyncio.Protocol`` on one persistent connection per pod: a request is
one ``write``; the socket reads straight into a buffer the fetcher keeps (``BufferedProtocol``,
no allocation per read) and a complete response is handed to a callback. Timeouts are
enforced by the caller (``abort``), so no timer is armed per request.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import cast
from urllib.parse import urlsplit

PageCallback = Callable[[bytes | None, str], None]
"""``(page, "")`` on success, ``(None, reason)`` on failure."""

MAX_PAGE = 16 * 1024 * 1024
READ_SIZE = 64 * 1024
HEADER_END = b"\r\n\r\n"


class PageFetcher(asyncio.BufferedProtocol):
    def __init__(self, url: str, on_page: PageCallback) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._tls = parts.scheme == "https"
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        authority = parts.netloc.rpartition("@")[2]
        self._request = (
            f"GET {path} HTTP/1.1\r\nHost: {authority}\r\nAccept: text/plain\r\n"
            "User-Agent: extproc-scraper\r\n\r\n"
        ).encode()
        self._on_page = on_page
        self._transport: asyncio.Transport | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._buffer = bytearray(READ_SIZE)
        self._filled = 0
        self._waiting = False
        self._body_start = -1
        self._length = -1
        self._chunked = False
        self._close_after = False
        self._status = 0

    # -- the caller's side ---------------------------------------------------------------------

    def fetch(self) -> None:
        """Send one GET; the callback fires once with the page or a failure reason."""
        self._waiting = True
        self._reset_response()
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(self._request)
        elif self._connecting is None:
            self._connecting = asyncio.get_running_loop().create_task(self._connect())

    def abort(self) -> None:
        """Drop the connection (after a timeout); the next fetch reconnects."""
        self._waiting = False
        if self._connecting is not None:
            self._connecting.cancel()
            self._connecting = None
        if self._transport is not None:
            self._transport.abort()
            self._transport = None

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        context = ssl.create_default_context() if self._tls else None
        try:
            await loop.create_connection(lambda: self, self._host, self._port, ssl=context)
        except (OSError, ssl.SSLError):
            self._connecting = None
            self._fail("connect")
            return
        self._connecting = None

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self._transport = cast(asyncio.Transport, transport)
        if self._waiting:
            self._transport.write(self._request)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if not self._waiting:
            return
        if self._body_start >= 0 and self._length < 0 and not self._chunked:
            body = bytes(memoryview(self._buffer)[self._body_start : self._filled])
            self._deliver(body)  # a body delimited by the connection closing
        else:
            self._fail("connect")

    def get_buffer(self, sizehint: int) -> memoryview:
        if len(self._buffer) - self._filled < READ_SIZE:
            # A new buffer, not an in-place resize: an event loop may still hold a view of
            # the old one (uvloop does), and a bytearray with live views cannot be resized.
            bigger = bytearray(max(2 * len(self._buffer), self._filled + READ_SIZE))
            bigger[: self._filled] = memoryview(self._buffer)[: self._filled]
            self._buffer = bigger
        return memoryview(self._buffer)[self._filled :]

    def buffer_updated(self, nbytes: int) -> None:
        self._filled += nbytes
        if not self._waiting:
            self._filled = 0
            return
        if self._filled > MAX_PAGE:
            self._fail("too-large")
            self.abort()
            return
        if self._body_start < 0 and not self._read_head():
            return
        start = self._body_start
        view = memoryview(self._buffer)[: self._filled]
        if self._chunked:
            if self._buffer[self._filled - 5 : self._filled] != b"0\r\n\r\n":
                return
            body = _dechunk(bytes(view[start:]))
            if body is None:
                self._fail("protocol")
                self.abort()
                return
            self._deliver(body)
        elif self._length >= 0:
            if self._filled - start < self._length:
                return
            self._deliver(bytes(view[start : start + self._length]))

    # -- response parsing ----------------------------------------------------------------------

    def _reset_response(self) -> None:
        self._filled = 0
        self._body_start = -1
        self._length = -1
        self._chunked = False
        self._close_after = False
        self._status = 0

    def _read_head(self) -> bool:
        end = self._buffer.find(HEADER_END, 0, self._filled)
        if end < 0:
            return False
        head = bytes(self._buffer[:end]).decode("latin-1").split("\r\n")
        try:
            self._status = int(head[0].split(" ", 2)[1])
        except (IndexError, ValueError):
            self._fail("protocol")
            self.abort()
            return False
        for line in head[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            value = value.strip().lower()
            if name == "content-length":
                self._length = int(value) if value.isdigit() else -1
            elif name == "transfer-encoding" and "chunked" in value:
                self._chunked = True
            elif name == "connection" and value == "close":
                self._close_after = True
        self._body_start = end + len(HEADER_END)
        return True

    def _deliver(self, body: bytes) -> None:
        self._waiting = False
        close = self._close_after
        status = self._status
        self._reset_response()
        if close and self._transport is not None:
            self._transport.close()
            self._transport = None
        if status != 200:
            self._on_page(None, "status")
        else:
            self._on_page(body, "")

    def _fail(self, reason: str) -> None:
        if self._waiting:
            self._waiting = False
            self._reset_response()
            self._on_page(None, reason)


def _dechunk(data: bytes) -> bytes | None:
    parts: list[bytes] = []
    index = 0
    while True:
        line_end = data.find(b"\r\n", index)
        if line_end < 0:
            return None
        try:
            size = int(data[index:line_end].split(b";")[0], 16)
        except ValueError:
            return None
        if size == 0:
            return b"".join(parts)
        start = line_end + 2
        parts.append(data[start : start + size])
        index = start + size + 2
