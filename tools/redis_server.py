"""A real ``redis-server`` for tests and benchmarks: a free loopback port, its own directory.

The append-only file survives ``restart()``, so a test can take Redis away and bring it back
with its data, as a restarted production Redis with persistence would. ``pause()`` freezes the
process (SIGSTOP): connections stay open and calls hang, the worst case for a client.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
from pathlib import Path

from extproc.devstack.processes import Managed, free_port


class RedisServer:
    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server not found; bash tools/test.sh installs it")
        self.binary = binary
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.process: Managed | None = None
        self.paused = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        argv = [
            self.binary,
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dir",
            str(self.dir),
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--daemonize",
            "no",
        ]
        self.process = Managed("redis", argv, self.dir / "redis.log").start()
        self.process.wait_port(self.port, timeout=10.0)
        return self

    def stop(self) -> None:
        self.resume()
        if self.process is not None:
            self.process.stop()
            self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def pause(self) -> None:
        assert self.process is not None
        self.process.signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        if self.paused and self.process is not None:
            self.process.signal(signal.SIGCONT)
        self.paused = False

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self.stop()
