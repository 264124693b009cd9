"""Structured logging: text for people, JSON (one object per line) for log pipelines.

Context such as ``request_id``, ``model`` or ``pod`` is passed as ``extra=`` and printed as
fields. Nothing logs headers wholesale or prompt text, so secrets and prompts stay out.

Many fields carry what a client sent (``x-request-id``, the user, the model, the strategy), so
no line can be forged from them: in text, a value with a space, ``=``, a quote, a backslash or
any character that is not printable (controls, Unicode format and separator characters such as
U+2028 or U+202E) is quoted with those characters escaped, and the message is escaped the same
way; JSON escapes by construction. String fields are cut at ``FIELD_LIMIT`` bytes, the cut
marked with how much was left out (``prompt``, written only when ``log_prompts`` asks, is not).
"""

from __future__ import annotations

import logging
import re
import sys
import time
import unicodedata
from typing import Any

import orjson

_STANDARD = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys() | {"message", "asctime"}
)


FIELD_LIMIT = 256
"""Bytes of a string field written before the cut."""
UNCUT = frozenset({"prompt"})
_PLAIN = re.compile(r"[!#-<>-\[\]-~]*")
"""Printable ASCII but space, ``"``, ``=`` and ``\\``: written as they are."""
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def cut(value: str, limit: int = FIELD_LIMIT) -> str:
    """``value`` cut to about ``limit`` UTF-8 bytes, marked ``...(+N bytes)``."""
    if len(value) <= limit // 4:
        return value
    data = value.encode("utf-8", "surrogateescape")
    if len(data) <= limit:
        return value
    kept = data[:limit].decode("utf-8", "ignore")
    return f"{kept}...(+{len(data) - len(kept.encode())} bytes)"


def _escape_char(char: str) -> str:
    if char in _ESCAPES:
        return _ESCAPES[char]
    if char == " " or (char.isprintable() and unicodedata.category(char) not in ("Cf", "Zl", "Zp")):
        return char
    code = ord(char)
    return (
        f"\\x{code:02x}"
        if code < 0x100
        else f"\\u{code:04x}"
        if code < 0x10000
        else f"\\U{code:08x}"
    )


def escape(text: str) -> str:
    """A message with every character that could end or fake a line written as an escape, and
    no two spaces in a row (two spaces start the fields)."""
    if not _PLAIN.fullmatch(text.replace(" ", "")):
        text = "".join(_escape_char(char) for char in text)
    return text.replace("  ", " \\x20") if "  " in text else text


def text_value(value: object) -> str:
    """A field's value as the text format writes it: bare when plain, else quoted."""
    text = value if isinstance(value, str) else str(value)
    if text and _PLAIN.fullmatch(text):
        return text
    return '"' + "".join(_escape_char(char) for char in text) + '"'


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {
        k: cut(v) if isinstance(v, str) and k not in UNCUT else v
        for k, v in record.__dict__.items()
        if k not in _STANDARD
    }


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(_fields(record))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        extras = " ".join(f"{k}={text_value(v)}" for k, v in _fields(record).items())
        line = f"{stamp}.{int(record.msecs):03d} {record.levelname:<7} {record.name}: "
        line += escape(record.getMessage()) + (f"  {extras}" if extras else "")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class BufferedStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes in batches: one write per routed request would be a system call per request on
    the hot path. Flushes when ``FLUSH_BYTES`` are waiting, when ``FLUSH_SECONDS`` have passed,
    at once for warnings and errors, on ``flush()`` (the server calls it every second) and at
    exit."""

    FLUSH_BYTES = 64 * 1024
    FLUSH_SECONDS = 0.5

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self._pending: list[str] = []
        self._size = 0
        self._flushed_at = time.monotonic()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
        except Exception:
            self.handleError(record)
            return
        self._pending.append(line)
        self._size += len(line)
        if (
            record.levelno >= logging.WARNING
            or self._size >= self.FLUSH_BYTES
            or time.monotonic() - self._flushed_at >= self.FLUSH_SECONDS
        ):
            self.flush()

    def flush(self) -> None:
        self.acquire()
        try:
            if self._pending:
                self.stream.write("".join(self._pending))
                self._pending.clear()
                self._size = 0
            self.stream.flush()
            self._flushed_at = time.monotonic()
        finally:
            self.release()


def flush() -> None:
    """Write out what the buffered handler holds (called periodically by the server)."""
    for handler in logging.getLogger().handlers:
        handler.flush()


def setup(fmt: str = "text", level: str = "info", access_log: bool = True) -> None:
    handler = BufferedStreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("extproc.access").setLevel(logging.INFO if access_log else logging.WARNING)
    for noisy in ("aiohttp.access", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
