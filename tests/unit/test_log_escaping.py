"""No log line can be forged from a client's values, and none is written at full size."""

from __future__ import annotations

import logging
import re

import orjson
import pytest

from extproc.logs import FIELD_LIMIT, JsonFormatter, TextFormatter, cut, text_value

FORGERIES = [
    "abc model=evil pod=evil-pod status=200",
    "abc  model=evil  pod=evil-pod",
    'abc" pod="evil',
    "abc\nINFO extproc.access: request served  pod=evil",
    "abc\r\x00\x1b[31m",
    "abc\u0085\u2028\u2029\u202e\u200b\u009b",
    "back\\slash",
]
FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


def record(request_id: str, message: str = "request served") -> logging.LogRecord:
    made = logging.LogRecord("extproc.access", logging.INFO, __file__, 1, message, (), None)
    made.request_id = request_id
    made.pod = "sim-0"
    made.status = 200
    return made


@pytest.mark.parametrize("value", FORGERIES)
def test_text_lines_cannot_be_forged(value: str) -> None:
    line = TextFormatter().format(record(value, f"user {value} refused"))
    assert "\n" not in line and "\r" not in line
    assert line.isprintable()
    message_and_fields = line.split(": ", 1)[1]
    fields = dict(FIELD.findall(message_and_fields.split("  ", 1)[1]))
    assert fields["pod"] == "sim-0" and fields["status"] == "200"
    assert list(fields) == ["request_id", "pod", "status"]


@pytest.mark.parametrize("value", FORGERIES)
def test_json_lines_cannot_be_forged(value: str) -> None:
    line = JsonFormatter().format(record(value))
    assert "\n" not in line
    entry = orjson.loads(line)
    assert entry["request_id"] == value and entry["pod"] == "sim-0"


def test_long_values_are_cut_and_marked() -> None:
    huge = "x" * 500_000
    for formatter in (TextFormatter(), JsonFormatter()):
        line = formatter.format(record(huge))
        assert len(line) < 1000
        assert "...(+499744 bytes)" in line
    assert cut("é" * 200).endswith("...(+144 bytes)")  # never half a character
    assert len(cut("y" * 10_000).encode()) <= FIELD_LIMIT + 20


def test_plain_values_stay_bare() -> None:
    assert text_value("req-1_a.b:c/d") == "req-1_a.b:c/d"
    assert text_value(3.5) == "3.5"
    assert text_value("") == '""'
    assert text_value("a b") == '"a b"'
