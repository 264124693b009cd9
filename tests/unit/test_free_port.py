"""Ports for the processes tests and benchmarks start: free, distinct, and never ones the
kernel may hand to an outgoing connection meanwhile."""

from __future__ import annotations

import socket

import pytest

from extproc.devstack import processes
from extproc.devstack.processes import LOWEST_PORT, free_port


def test_ports_are_distinct_free_and_below_the_ephemeral_range() -> None:
    ceiling = processes._ephemeral_floor()
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports)
    assert all(LOWEST_PORT <= port < ceiling for port in ports)
    for port in ports[:5]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", port))


class Scripted:
    """Draws the given ports in order."""

    def __init__(self, *ports: int) -> None:
        self._ports = list(ports)

    def randrange(self, start: int, stop: int) -> int:
        return self._ports.pop(0)


def test_a_port_in_use_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as spare:
        spare.bind(("127.0.0.1", 0))
        unused = spare.getsockname()[1]
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        monkeypatch.setattr(processes, "_ephemeral_floor", lambda: 65536)
        monkeypatch.setattr(processes, "_ports", Scripted(taken, unused))
        assert free_port() == unused
