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


USAGE_EVENT = b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n'
TOKENS = b'data: {"id":"c","choices":[{"delta":{"content":"usage"}}]}\n\n' * 3


@pytest.mark.parametrize("size", [1, 5, 13, 64, 10_000])
def test_the_usage_event_the_server_asked_for_is_taken_out(size: int) -> None:
    from extproc.routing.usage import UsageStripper

    stream = TOKENS + USAGE_EVENT + b"data: [DONE]\n\n"
    stripper = UsageStripper()
    pieces = chunks(stream, size)
    out = b"".join(stripper.feed(p, i == len(pieces) - 1) for i, p in enumerate(pieces))
    assert out == TOKENS + b"data: [DONE]\n\n"
    assert stripper.found


def test_only_an_event_with_empty_choices_and_a_usage_object_is_taken() -> None:
    from extproc.routing.usage import UsageStripper

    lookalike = b'data: {"choices":[{"delta":{"content":"\\"usage\\": {}"}}],"usage":null}\n\n'
    stripper = UsageStripper()
    assert stripper.feed(lookalike, True) == lookalike
    assert not stripper.found


def test_a_streamed_request_asks_the_pod_for_usage() -> None:
    from extproc.routing.openai_request import Endpoint, parse, with_usage_requested

    body = b'{"model": "m", "stream": true, "prompt": "x"}'
    rewritten = with_usage_requested(body, parse(Endpoint.COMPLETIONS, body))
    assert rewritten == b'{"model": "m", "stream": true, "prompt": "x"' + (
        b',"stream_options":{"include_usage":true}}'
    )
    asked = (
        b'{"model": "m", "stream": true, "stream_options": {"include_usage": true}, "prompt": "x"}'
    )
    assert with_usage_requested(asked, parse(Endpoint.COMPLETIONS, asked)) is None
    plain = b'{"model": "m", "prompt": "x"}'
    assert with_usage_requested(plain, parse(Endpoint.COMPLETIONS, plain)) is None
    embeddings = b'{"model": "m", "stream": true, "input": "x"}'
    assert with_usage_requested(embeddings, parse(Endpoint.EMBEDDINGS, embeddings)) is None


def vllm_stream(usage: bool) -> bytes:
    """vLLM 0.32's stream shape: ``system_fingerprint`` rides on the last event, the usage
    event when the client asked for one, else the finishing event."""
    head = b'data: {"id":"c","object":"text_completion","choices":[{"index":0,"text":'
    fingerprint = b',"system_fingerprint":"vllm-0.32.0-17d7a4ff"}'
    events = [head + b'" one","finish_reason":null}]}', head + b'" two","finish_reason":null}]}']
    finishing = head + b'" three","finish_reason":"length"}]'
    if usage:
        events.append(finishing + b"}")
        events.append(
            b'data: {"id":"c","object":"text_completion","choices":[],'
            b'"usage":{"prompt_tokens":9,"total_tokens":21,"completion_tokens":12}' + fingerprint
        )
    else:
        events.append(finishing + fingerprint)
    return b"".join(event + b"\n\n" for event in events) + b"data: [DONE]\n\n"


@pytest.mark.parametrize("size", [1, 7, 64, 10_000])
def test_the_stripped_stream_is_the_one_vllm_sends_without_usage(size: int) -> None:
    from extproc.routing.usage import UsageStripper

    stripper = UsageStripper()
    pieces = chunks(vllm_stream(usage=True), size)
    out = b"".join(stripper.feed(p, i == len(pieces) - 1) for i, p in enumerate(pieces))
    assert out == vllm_stream(usage=False)
    assert stripper.found


def test_a_finishing_event_waits_only_for_the_next_event() -> None:
    from extproc.routing.usage import UsageStripper

    stream = vllm_stream(usage=True)
    events = [event + b"\n\n" for event in stream.split(b"\n\n")[:-1]]
    stripper = UsageStripper()
    assert stripper.feed(events[0], False) == events[0]
    assert stripper.feed(events[2], False) == b""
    assert stripper.feed(events[0], False) == events[2] + events[0]
