"""The real grpcurl against the running server: reflection, the debug API, health, and a raw
ext_proc exchange written as JSON, exactly as the README shows them."""

from __future__ import annotations

import base64
import json
import subprocess
from typing import Any

from extproc.devstack.processes import bin_path
from extproc.devstack.stack import LocalStack


def grpcurl(
    stack: LocalStack, *args: str, data: str | None = None
) -> subprocess.CompletedProcess[str]:
    """``grpcurl -plaintext [-d @] ADDRESS ARGS...``, with ``data`` on stdin."""
    command = [bin_path("grpcurl"), "-plaintext", "-max-time", "10"]
    if data is not None:
        command += ["-d", "@"]
    return subprocess.run(
        [*command, stack.grpc_address, *args],
        input=data,
        capture_output=True,
        text=True,
        timeout=20,
    )


def call(stack: LocalStack, method: str, message: dict[str, Any]) -> dict[str, Any]:
    done = grpcurl(stack, method, data=json.dumps(message))
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_reflection_lists_and_describes_every_service(stack: LocalStack) -> None:
    listed = grpcurl(stack, "list")
    assert listed.returncode == 0, listed.stderr
    assert set(listed.stdout.split()) >= {
        "envoy.service.ext_proc.v3.ExternalProcessor",
        "grpc.health.v1.Health",
        "extproc.debug.v1.RouterDebug",
    }
    described = grpcurl(stack, "describe", "extproc.debug.v1.RouterDebug")
    assert described.returncode == 0, described.stderr
    for rpc in ("Explain", "ListPods", "ListModels"):
        assert f"rpc {rpc} (" in described.stdout
    message = grpcurl(stack, "describe", "extproc.debug.v1.ExplainRequest")
    assert "map<string, string> headers" in message.stdout
    ext_proc = grpcurl(stack, "describe", "envoy.service.ext_proc.v3.ExternalProcessor")
    assert "stream .envoy.service.ext_proc.v3.ProcessingRequest" in ext_proc.stdout


def test_health(stack: LocalStack) -> None:
    for service in ("", "envoy.service.ext_proc.v3.ExternalProcessor"):
        answer = call(stack, "grpc.health.v1.Health/Check", {"service": service})
        assert answer == {"status": "SERVING"}


def test_explain_list_pods_and_models(stack: LocalStack) -> None:
    answer = call(
        stack,
        "extproc.debug.v1.RouterDebug/Explain",
        {
            "model": "m1",
            "messages": [{"role": "user", "content": "Say this is a test!"}],
            "strategy": "least-request",
        },
    )
    assert answer["pod"] in {p.name for p in stack.pods}
    assert answer["upstream_headers"]["target-pod"] == answer["address"]
    assert {c["pod"] for c in answer["candidates"]} == {p.name for p in stack.pods}

    failed = grpcurl(
        stack,
        "extproc.debug.v1.RouterDebug/Explain",
        data=json.dumps({"model": "nope", "prompt": "x", "strategy": "random"}),
    )
    assert failed.returncode != 0
    assert "NotFound" in failed.stderr and "The model nope does not exist." in failed.stderr

    pods = call(stack, "extproc.debug.v1.RouterDebug/ListPods", {})["pods"]
    assert {p["name"] for p in pods} == {*(p.name for p in stack.pods), "down-0"}
    models = call(stack, "extproc.debug.v1.RouterDebug/ListModels", {})["models"]
    assert {m["id"]: m.get("ready_pods", 0) for m in models} == {"m1": 3, "m-down": 0}


def test_raw_ext_proc_exchange(stack: LocalStack) -> None:
    """Headers then body, as Envoy sends them; ``raw_value`` and ``body`` are base64 in JSON."""
    headers = {
        ":path": "/v1/chat/completions",
        ":method": "POST",
        "routing-strategy": "least-request",
        "x-request-id": "grpcurl-1",
    }
    body = {"model": "m1", "messages": [{"role": "user", "content": "hi"}]}
    stream = "\n".join(
        json.dumps(message)
        for message in (
            {
                "request_headers": {
                    "headers": {
                        "headers": [{"key": k, "raw_value": b64(v)} for k, v in headers.items()]
                    }
                }
            },
            {"request_body": {"body": b64(json.dumps(body)), "end_of_stream": True}},
        )
    )
    done = grpcurl(stack, "envoy.service.ext_proc.v3.ExternalProcessor/Process", data=stream)
    assert done.returncode == 0, done.stderr
    decoder = json.JSONDecoder()
    answers, text = [], done.stdout.strip()
    while text:
        answer, end = decoder.raw_decode(text)
        answers.append(answer)
        text = text[end:].strip()
    assert [next(iter(a)) for a in answers] == ["request_headers", "request_body"]
    routed = answers[1]["request_body"]["response"]
    assert routed["clear_route_cache"] is True
    set_headers = {
        h["header"]["key"]: base64.b64decode(h["header"]["raw_value"]).decode()
        for h in routed["header_mutation"]["set_headers"]
    }
    assert set_headers["target-pod"] in {p.address for p in stack.pods}
    assert set_headers["x-request-id"] == "grpcurl-1"
    assert set_headers["model"] == "m1"
