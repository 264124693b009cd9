"""Every body shape the gateway accepts, and every bad body it must reject with a clear 400."""

from __future__ import annotations

import orjson
import pytest

from extproc.errors import GatewayError
from extproc.routing.openai_request import Endpoint, parse


def body(**fields: object) -> bytes:
    return orjson.dumps(fields)


def test_chat_messages_with_roles_and_content_parts() -> None:
    request = parse(
        Endpoint.CHAT,
        body(
            model="m",
            stream=True,
            stream_options={"include_usage": True},
            max_tokens=7,
            messages=[
                {"role": "system", "content": "be brief"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "hi"}, {"type": "image_url"}],
                },
                {"role": "assistant", "content": None, "tool_calls": []},
            ],
        ),
    )
    assert request.model == "m"
    assert request.stream and request.include_usage
    assert request.max_tokens == 7
    assert request.messages == [("system", "be brief"), ("user", "hi"), ("assistant", "")]
    assert request.prompt_chars > 0 and request.prompt_tokens == -(-request.prompt_chars // 4)


@pytest.mark.parametrize(
    ("prompt", "text", "tokens"),
    [
        ("once upon", "once upon", None),
        (["first", "second"], "first", None),
        ([1, 2, 3], None, [1, 2, 3]),
        ([[4, 5], [6]], None, [4, 5]),
    ],
)
def test_completion_prompt_shapes(
    prompt: object, text: str | None, tokens: list[int] | None
) -> None:
    request = parse(Endpoint.COMPLETIONS, body(model="m", prompt=prompt))
    assert request.text == text
    assert request.token_ids == tokens


def test_embeddings_and_responses() -> None:
    assert parse(Endpoint.EMBEDDINGS, body(model="e", input=["a", "b"])).text == "a"
    assert parse(Endpoint.EMBEDDINGS, body(model="e", input=[1, 2])).token_ids == [1, 2]
    assert parse(Endpoint.RESPONSES, body(model="r", input="hello")).text == "hello"
    items = parse(
        Endpoint.RESPONSES,
        body(model="r", input=[{"role": "user", "content": [{"type": "input_text", "text": "q"}]}]),
    )
    assert items.messages == [("user", "q")]
    assert parse(Endpoint.RESPONSES, body(model="r", max_output_tokens=3)).max_tokens == 3


def test_max_completion_tokens_is_read() -> None:
    request = parse(
        Endpoint.CHAT,
        body(model="m", max_completion_tokens=9, messages=[{"role": "user", "content": "x"}]),
    )
    assert request.max_tokens == 9


BAD = [
    (Endpoint.CHAT, b"", "invalid_json", None, "empty"),
    (Endpoint.CHAT, b"{not json", "invalid_json", None, "not valid JSON"),
    (Endpoint.CHAT, b"[1, 2]", "invalid_body", None, "not an array"),
    (Endpoint.CHAT, b'"text"', "invalid_body", None, "JSON object"),
    (Endpoint.CHAT, body(messages=[]), "model_required", "model", "`model` is required"),
    (Endpoint.CHAT, body(model=""), "model_required", "model", "`model` is required"),
    (Endpoint.CHAT, body(model=3), "invalid_type", "model", "`model` must be a string"),
    (Endpoint.CHAT, body(model="m"), "missing_field", "messages", "`messages` is required"),
    (Endpoint.CHAT, body(model="m", messages=[]), "invalid_type", "messages", "non-empty"),
    (Endpoint.CHAT, body(model="m", messages="hi"), "invalid_type", "messages", "non-empty"),
    (Endpoint.CHAT, body(model="m", messages=[1]), "invalid_type", "messages[0]", "an object"),
    (
        Endpoint.CHAT,
        body(model="m", messages=[{"content": "x"}]),
        "invalid_type",
        "messages[0].role",
        "role",
    ),
    (
        Endpoint.CHAT,
        body(model="m", messages=[{"role": "user", "content": 5}]),
        "invalid_type",
        "messages[0].content",
        "content",
    ),
    (
        Endpoint.CHAT,
        body(model="m", stream="yes", messages=[{"role": "u", "content": ""}]),
        "invalid_type",
        "stream",
        "boolean",
    ),
    (
        Endpoint.CHAT,
        body(model="m", max_tokens=-1, messages=[{"role": "u"}]),
        "invalid_type",
        "max_tokens",
        "non-negative",
    ),
    (
        Endpoint.CHAT,
        body(model="m", stream_options=[], messages=[{"role": "u"}]),
        "invalid_type",
        "stream_options",
        "an object",
    ),
    (Endpoint.COMPLETIONS, body(model="m"), "missing_field", "prompt", "`prompt` is required"),
    (Endpoint.COMPLETIONS, body(model="m", prompt=5), "invalid_type", "prompt", "token ids"),
    (Endpoint.COMPLETIONS, body(model="m", prompt=[]), "invalid_type", "prompt", "token ids"),
    (Endpoint.COMPLETIONS, body(model="m", prompt=["a", 1]), "invalid_type", "prompt", "string"),
    (Endpoint.COMPLETIONS, body(model="m", prompt=[1, -2]), "invalid_type", "prompt", "token"),
    (Endpoint.EMBEDDINGS, body(model="m"), "missing_field", "input", "`input` is required"),
    (Endpoint.RESPONSES, body(model="m", input=7), "invalid_type", "input", "input items"),
]


@pytest.mark.parametrize(("endpoint", "raw", "code", "param", "text"), BAD)
def test_bad_bodies_are_400_with_a_clear_message(
    endpoint: Endpoint, raw: bytes, code: str, param: str | None, text: str
) -> None:
    with pytest.raises(GatewayError) as caught:
        parse(endpoint, raw)
    err = caught.value
    assert err.status == 400
    assert err.code == code
    assert err.param == param
    assert text in err.message
    payload = orjson.loads(err.body())
    assert set(payload["error"]) == {"message", "type", "code", "param"}
