"""The `hf` tokenizer gives the pod's own tokens: vLLM's /tokenize is the reference (the chat
template with its generation prompt and BOS for chat, BOS for a plain prompt)."""

from __future__ import annotations

import json
import urllib.request

import pytest

from extproc.prefix.tokenizers import HfTokenizer
from extproc.routing.openai_request import Endpoint, parse
from tests.realvllm.conftest import MODEL, Fleet

BODIES = [
    {"prompt": "Once upon a time, in a land far away"},
    {"prompt": ""},
    {"messages": [{"role": "user", "content": "hi there"}]},
    {
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3? Ünïcödé, emoji 🙂, tabs\tand\nnewlines."},
        ]
    },
]


def vllm_tokens(fleet: Fleet, body: dict[str, object]) -> list[int]:
    request = urllib.request.Request(
        f"{fleet.plain.base_url}/tokenize",
        data=json.dumps({"model": MODEL, **body}).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        tokens: list[int] = json.loads(response.read())["tokens"]
    return tokens


@pytest.mark.parametrize("body", BODIES, ids=["prompt", "empty", "chat", "conversation"])
async def test_hf_tokenizer_gives_vllms_tokens(fleet: Fleet, body: dict[str, object]) -> None:
    tokenizer = HfTokenizer({MODEL: fleet.setup.model_dir / "tokenizer.json"})
    endpoint = Endpoint.CHAT if "messages" in body else Endpoint.COMPLETIONS
    request = parse(endpoint, json.dumps({"model": MODEL, **body}).encode())
    stream = await tokenizer.tokenize(MODEL, request)
    assert stream.pod_ids is not None
    assert list(stream.pod_ids) == vllm_tokens(fleet, body)
