"""Several simulated pods in one process, started and stopped together."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import Any

from .config import PodSpec, SimParams
from .server import SimPod


class SimulatorFleet:
    """Pods sharing one event loop; use ``async with SimulatorFleet(specs) as fleet``.

    Pods are reachable by index (``fleet[0]``), by name (``fleet.pod("sim-1")``) or by
    iteration; each has ``name``, ``model``, ``port``, ``url`` and ``set_params(...)``.
    """

    def __init__(self, specs: Iterable[PodSpec], host: str = "127.0.0.1") -> None:
        self.pods = [SimPod(spec, host) for spec in specs]
        names = [pod.name for pod in self.pods]
        if len(set(names)) != len(names):
            raise ValueError("pod names must be unique")
        self._started = False

    async def start(self) -> None:
        """Start every pod; if one fails to bind, the ones already up are stopped again."""
        started: list[SimPod] = []
        try:
            for pod in self.pods:
                await pod.start()
                started.append(pod)
        except BaseException:
            await asyncio.gather(*(pod.stop() for pod in started), return_exceptions=True)
            raise
        self._started = True

    async def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        await asyncio.gather(*(pod.stop() for pod in self.pods))

    async def __aenter__(self) -> SimulatorFleet:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def __iter__(self) -> Iterator[SimPod]:
        return iter(self.pods)

    def __len__(self) -> int:
        return len(self.pods)

    def __getitem__(self, index: int) -> SimPod:
        return self.pods[index]

    def pod(self, name: str) -> SimPod:
        for pod in self.pods:
            if pod.name == name:
                return pod
        raise KeyError(name)

    @property
    def urls(self) -> list[str]:
        return [pod.url for pod in self.pods]

    def set_params(self, name: str, **changes: Any) -> SimParams:
        """Change one pod's parameters at runtime (same rules as ``POST /sim/params``)."""
        return self.pod(name).update_params(changes)
