"""One workload against several targets on identical simulated pods, side by side.

Each target gets a fresh stack (simulated pods with empty caches, a fresh ``extproc serve`` and
Envoy), so no target inherits another's warm caches. Targets:

- a strategy name or weighted list: our server through Envoy with that ``routing-strategy``;
- ``envoy-rr``: the same Envoy with no strategy, i.e. its own round robin over the model's pods;
- ``sglang-<policy>``: the SGLang router (``sglang-router`` from PyPI) in front of the same pods,
  e.g. ``sglang-cache_aware``, ``sglang-round_robin``;
- ``session-sticky``: each session pinned to one pod by hashing its id (the client talks to the
  pod directly): the reference for multi-turn cache reuse.
"""

from __future__ import annotations

import asyncio
import hashlib
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from extproc.devstack.processes import Managed, free_port
from extproc.devstack.stack import LocalStack, StackConfig
from extproc.scraping.parser import parse
from tools.bench.runner import Target, run
from tools.bench.workloads import Session

MODEL = "bench"


def prefix_counters(stack: LocalStack) -> tuple[float, float]:
    queries = hits = 0.0
    for pod in stack.pods:
        with urllib.request.urlopen(f"{pod.url}/metrics", timeout=5) as response:
            metrics = parse(response.read())
        queries += metrics.prefix_cache_queries or 0.0
        hits += metrics.prefix_cache_hits or 0.0
    return queries, hits


def start_sglang(stack: LocalStack, policy: str) -> tuple[Managed, str]:
    port = free_port()
    router = Managed(
        f"sglang-{policy}",
        [
            sys.executable,
            "-m",
            "sglang_router.launch_router",
            "--worker-urls",
            *[pod.url for pod in stack.pods],
            "--policy",
            policy,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--prometheus-port",
            str(free_port()),
            "--log-level",
            "warn",
        ],
        stack.workdir / "logs" / f"sglang-{policy}.log",
    ).start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    body = b'{"model": "bench", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}'
    while True:
        router.check_alive()
        try:
            request = urllib.request.Request(
                url + "/v1/chat/completions",
                data=body,
                headers={"content-type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=5) as response:
                if response.status == 200:
                    return router, url
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"SGLang router did not start\n{router.tail()}")
        time.sleep(0.3)


def make_target(name: str, stack: LocalStack, sglang_url: str | None) -> Target:
    if name == "envoy-rr":
        return Target(name, stack.gateway_url)
    if name.startswith("sglang-"):
        assert sglang_url is not None
        return Target(name, sglang_url)
    if name == "session-sticky":
        urls = [pod.url for pod in stack.pods]

        def sticky(session: Session) -> str:
            digest = hashlib.blake2b(session.id.encode(), digest_size=8).digest()
            return urls[int.from_bytes(digest, "big") % len(urls)]

        return Target(name, "", url_for=sticky)
    return Target(name, stack.gateway_url, headers={"routing-strategy": name})


def compare(
    sessions: Sequence[Session],
    targets: Sequence[str],
    config: StackConfig,
    *,
    rate: float | None,
    concurrency: int | None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    from tqdm import tqdm

    from tools.bench.report import summarize

    results = []
    turns = sum(len(s.questions) for s in sessions)
    for name in targets:
        with LocalStack(config) as stack:
            sglang: Managed | None = None
            sglang_url = None
            if name.startswith("sglang-"):
                sglang, sglang_url = start_sglang(stack, name.removeprefix("sglang-"))
            try:
                target = make_target(name, stack, sglang_url)
                queries0, hits0 = prefix_counters(stack)
                with tqdm(total=turns, desc=f"{name:>24}", unit="req", mininterval=2.0) as bar:
                    records, wall = asyncio.run(
                        run(
                            target,
                            sessions,
                            MODEL,
                            rate=rate,
                            concurrency=concurrency,
                            seed=seed,
                            progress=bar.update,
                        )
                    )
                queries1, hits1 = prefix_counters(stack)
            finally:
                if sglang is not None:
                    sglang.stop()
            results.append(
                summarize(
                    name,
                    records,
                    wall,
                    queries1 - queries0,
                    hits1 - hits0,
                    [pod.name for pod in stack.pods],
                )
            )
    return results


def write(results: list[dict[str, Any]], meta: dict[str, Any], out: Path | None) -> None:
    import json

    from tools.bench.report import chart, markdown

    print(markdown(results))
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({**meta, "results": results}, indent=2) + "\n")
    chart(results, meta.get("title", ""), out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
