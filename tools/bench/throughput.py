"""The most routed requests per second one server process sustains, before p99 passes 10 ms.

Envoy in front of a stub pod (an Envoy listener answering every request itself, so no pod is
the bottleneck), ``wrk`` (C) as the client at rising connection counts, and beside our server,
in the same Envoy, the no-op ext_proc (Python's floor). Variants:

- ``body NONE``: ``least-request``, the response body never shown to the server;
- ``body STREAMED``: ``vtc-basic``, which counts tokens, so the server reads every response's
  ``usage`` (mode override to STREAMED);
- ``no-op floor``: ``tools/bench/noop_extproc.py``.

Run once per ``response_phase`` (a server setting).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from extproc.devstack.processes import Managed, bin_path, envoy_command, free_port
from extproc.envoy_config import GatewayLayout, bootstrap

BODY = '{"model": "m", "messages": [{"role": "user", "content": "Say this is a test!"}]}'
P99_LIMIT_MS = 10.0


def _lua(headers: dict[str, str]) -> str:
    lines = [
        'wrk.method = "POST"',
        f"wrk.body = '{BODY}'",
        'wrk.headers["Content-Type"] = "application/json"',
    ]
    lines += [f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items()]
    return "\n".join(lines) + "\n"


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _wrk(url: str, script: Path, connections: int, seconds: int) -> dict[str, float]:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 30,
    ).stdout
    result: dict[str, float] = {"connections": connections}
    for label, key in (("50%", "p50_ms"), ("99%", "p99_ms")):
        match = re.search(rf"^\s+{re.escape(label)}\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        result[key] = round(float(match.group(1)) * _UNITS[match.group(2)], 3) if match else -1
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    result["rps"] = float(match.group(1)) if match else 0.0
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    result["non_2xx"] = float(errors.group(1)) if errors else 0.0
    return result


def run(response_phase: str, connections: list[int], seconds: int, pods: int) -> dict[str, Any]:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: run tools/bench/setup.sh")
    with tempfile.TemporaryDirectory(prefix="bench-throughput-") as tmp:
        work = Path(tmp)
        gateway, noop, grpc_port, http_port, admin, stub, noop_grpc = (
            free_port() for _ in range(7)
        )
        stub_address = f"127.0.0.1:{stub}"
        pods_file = work / "pods.yaml"
        pods_file.write_text(
            yaml.safe_dump(
                {
                    "pods": [
                        {
                            "name": f"stub-{i}",
                            "address": stub_address,
                            "model": "m",
                            "metrics_url": f"http://{stub_address}/metrics",
                        }
                        for i in range(pods)
                    ]
                }
            )
        )
        layout = GatewayLayout(
            listen_port=gateway,
            admin_port=admin,
            extproc_port=grpc_port,
            models={"m": [stub_address]},
            stub_pod_port=stub,
            noop_port=noop,
            noop_extproc_port=noop_grpc,
        )
        envoy_file = work / "envoy.yaml"
        envoy_file.write_text(yaml.safe_dump(bootstrap(layout)))
        processes = [
            Managed(
                "extproc",
                [
                    bin_path("extproc"),
                    "serve",
                    "--config",
                    str(pods_file),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(grpc_port),
                    "--http-port",
                    str(http_port),
                    "--users-port",
                    str(free_port()),
                    "--response-phase",
                    response_phase,
                    "--log-level",
                    "warning",
                ],
                work / "extproc.log",
            ).start(),
            Managed(
                "noop",
                [
                    sys.executable,
                    "-m",
                    "tools.bench.noop_extproc",
                    "--port",
                    str(noop_grpc),
                    "--target",
                    stub_address,
                ],
                work / "noop.log",
            ).start(),
        ]
        try:
            processes[0].wait_http(f"http://127.0.0.1:{http_port}/readyz")
            processes[1].wait_port(noop_grpc)
            envoy = Managed(
                "envoy",
                envoy_command(envoy_file, "error"),
                work / "envoy.log",
            ).start()
            processes.append(envoy)
            envoy.wait_http(f"http://127.0.0.1:{admin}/ready")
            variants = {
                "body NONE (least-request)": (gateway, {"routing-strategy": "least-request"}),
                "body STREAMED (vtc-basic, usage read)": (
                    gateway,
                    {"routing-strategy": "vtc-basic"},
                ),
                "no-op floor": (noop, {}),
            }
            results: list[dict[str, Any]] = []
            for label, (port, headers) in variants.items():
                script = work / f"{len(results)}.lua"
                script.write_text(_lua(headers))
                url = f"http://127.0.0.1:{port}/v1/chat/completions"
                _wrk(url, script, 2, 2)  # warm up
                steps = [_wrk(url, script, c, seconds) for c in connections]
                within = [s for s in steps if 0 <= s["p99_ms"] <= P99_LIMIT_MS]
                results.append(
                    {
                        "variant": label,
                        "max_rps_p99_under_10ms": max((s["rps"] for s in within), default=0.0),
                        "steps": steps,
                    }
                )
        finally:
            for process in reversed(processes):
                process.stop()
    return {
        "benchmark": "throughput",
        "response_phase": response_phase,
        "pods": pods,
        "results": results,
    }
