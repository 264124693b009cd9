"""Shared fixtures: an in-process server on free loopback ports, and the local stack."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc import config
from extproc.app import Server
from extproc.devstack.processes import free_port
from tools.redis_server import RedisServer

ServerFactory = Callable[..., "asyncio.Future[Server]"]


def write_pods(path: Path, pods: list[dict[str, Any]], **settings: Any) -> Path:
    path.write_text(yaml.safe_dump({**settings, "pods": pods}))
    return path


DEFAULT_PODS = [
    {"name": "pod-a", "address": "127.0.0.1:18001", "model": "m1"},
    {"name": "pod-b", "address": "127.0.0.1:18002", "model": "m1", "adapters": ["m1-lora"]},
    {"name": "pod-c", "address": "127.0.0.1:18003", "model": "m2", "ready": False},
]


@pytest.fixture
async def make_server(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """Start an in-process ``Server``; ``await make_server(pods=..., **flags)``."""
    servers: list[Server] = []

    async def start(pods: list[dict[str, Any]] | None = None, **flags: Any) -> Server:
        file = write_pods(
            tmp_path / f"pods-{len(servers)}.yaml", DEFAULT_PODS if pods is None else pods
        )
        values = {
            "config": str(file),
            "host": "127.0.0.1",
            "port": free_port(),
            "http_port": free_port(),
            "users_port": free_port(),
            **{k: v for k, v in flags.items()},
        }
        server = Server(config.load(values, {}))
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop(grace=0.5)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real ``redis-server`` on a free loopback port for one test, stopped afterwards."""
    with RedisServer(tmp_path / "redis") as server:
        yield server
