"""Token usage read from JSON answers and SSE streams, split anywhere, never altered."""

from __future__ import annotations

import orjson
import pytest

from extproc.routing.usage import TAIL_BYTES, WHOLE_BODY_LIMIT, UsageReader

JSON_ANSWER = orjson.dumps(
    {
        "id": "x",
        "choices": [{"message": {"content": 'tricky "usage": {"prompt_tokens": 99}'}}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17},
    }
)


def chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize("size", [1, 7, 64, 100000])
def test_json_answer_split_anywhere(size: int) -> None:
    reader = UsageReader(streaming=False)
    for chunk in chunks(JSON_ANSWER, size):
        reader.feed(chunk)
    usage = reader.result(prompt_tokens=10)
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.estimated) == (12, 5, False)


def test_large_json_answer_is_searched_in_its_tail() -> None:
    big = orjson.dumps(
        {
            "data": [{"embedding": [0.5] * 1000}] * 400,
            "usage": {"prompt_tokens": 30, "total_tokens": 30},
        }
    )
    assert len(big) > WHOLE_BODY_LIMIT
    reader = UsageReader(streaming=False)
    for chunk in chunks(big, 65536):
        reader.feed(chunk)
    usage = reader.result(0)
    assert usage is not None and usage.prompt_tokens == 30 and usage.completion_tokens == 0


def sse(events: list[object]) -> bytes:
    return b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"


STREAM_EVENTS = [
    {"choices": [{"delta": {"role": "assistant", "content": ""}}]},
    *[{"choices": [{"delta": {"content": " tok"}}]} for _ in range(6)],
]


@pytest.mark.parametrize("size", [3, 50, 4096])
def test_stream_with_final_usage_event(size: int) -> None:
    data = sse(
        [*STREAM_EVENTS, {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 6}}]
    )
    reader = UsageReader(streaming=True)
    for chunk in chunks(data, size):
        reader.feed(chunk)
    usage = reader.result(100)
    assert usage is not None and not usage.estimated
    assert (usage.prompt_tokens, usage.completion_tokens) == (9, 6)


def test_stream_without_usage_is_estimated() -> None:
    reader = UsageReader(streaming=True)
    for chunk in chunks(sse(STREAM_EVENTS), 10):
        reader.feed(chunk)
    usage = reader.result(prompt_tokens=100)
    assert usage is not None and usage.estimated
    assert usage.completion_tokens == 6
    assert usage.prompt_tokens == 100


def test_responses_api_field_names() -> None:
    event = {
        "type": "response.completed",
        "response": {"usage": {"input_tokens": 4, "output_tokens": 2, "total_tokens": 6}},
    }
    reader = UsageReader(streaming=True)
    reader.feed(b"event: response.completed\n" + b"data: " + orjson.dumps(event) + b"\n\n")
    usage = reader.result(0)
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (4, 2)


def test_nothing_seen_and_garbage() -> None:
    assert UsageReader(streaming=False).result(10) is None
    reader = UsageReader(streaming=False)
    reader.feed(b"<html>502</html>")
    assert reader.result(10) is None
    long_stream = UsageReader(streaming=True)
    long_stream.feed(b"x" * (TAIL_BYTES * 3))
    assert long_stream.result(0) is not None
