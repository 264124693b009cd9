"""The router's side of KV-cache events: one subscriber per publishing pod, and which pods can
be matched exactly right now.

Endpoints come from discovery (`PodSpec.kv_events`: ``tcp://ip:port``, or ``auto`` to ask the
pod's ``/kv_event_sources``). A pod is matched exactly (``hasher``) while its publisher is
connected, it has not gone quiet while busy, and its block hashes can be reproduced here: its
block size and hash algorithm (from ``vllm:cache_config_info``, else the settings) and the
pods' seed. A pod whose hashing cannot be reproduced (xxhash without a seed) is refused once,
with a log line saying why, and stays approximate; so does a pod whose events stop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import aiohttp
import orjson
import zmq.asyncio

from extproc.config import KvEventsSettings
from extproc.fleet.registry import PodRegistry, PodSpec
from extproc.kvevents.block_hash import BlockHasher, UnreproducibleHashError
from extproc.kvevents.index import ExactIndex
from extproc.kvevents.subscriber import PodEvents, Subscriber
from extproc.scraping.readings import Reading, Readings
from extproc.tasks import cancel_and_wait
from extproc.telemetry import Telemetry

log = logging.getLogger(__name__)

AUTO = "auto"


class KvEvents:
    def __init__(
        self,
        settings: KvEventsSettings,
        registry: PodRegistry,
        readings: Readings,
        telemetry: Telemetry,
    ) -> None:
        self._settings = settings
        self._registry = registry
        self._readings = readings
        self._telemetry = telemetry
        self.index = ExactIndex(settings.index_capacity)
        self.states: dict[str, PodEvents] = {}
        self._tasks: dict[str, tuple[str, asyncio.Task[None]]] = {}
        self._hashers: dict[tuple[str, int, str | None], BlockHasher | None] = {}
        self._refused: set[str] = set()
        self._context: zmq.asyncio.Context | None = None
        self._running = False

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        self._context = zmq.asyncio.Context()
        self._running = True
        self._registry.on_change(self.sync)
        self.sync()

    async def stop(self) -> None:
        self._running = False
        tasks = [task for _, task in self._tasks.values()]
        await cancel_and_wait(tasks)
        self._tasks.clear()
        if self._context is not None:
            self._context.term()

    def sync(self) -> None:
        """A subscriber for every ready pod that publishes; none for the others."""
        if not self._running:
            return
        wanted = {
            p.name: p.spec for p in self._registry.pods() if p.spec.ready and p.spec.kv_events
        }
        for name in list(self._tasks):
            key, task = self._tasks[name]
            spec = wanted.get(name)
            if spec is None or _key(spec) != key:
                task.cancel()
                del self._tasks[name]
                self.states.pop(name, None)
                self.index.forget(name)
        for name, spec in wanted.items():
            if name not in self._tasks:
                task = asyncio.get_running_loop().create_task(
                    self._follow(spec), name=f"kv-events-{name}"
                )
                self._tasks[name] = (_key(spec), task)

    async def _follow(self, spec: PodSpec) -> None:
        delay = 0.2
        while True:
            try:
                endpoint, replay = await self._endpoint(spec)
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                log.warning("KV-event source unknown (%s); retrying", exc, extra={"pod": spec.name})
                await asyncio.sleep(delay)
                delay = min(self._settings.reconnect_max, delay * 2)
                continue
            state = self.states[spec.name] = PodEvents(endpoint, replay)
            assert self._context is not None
            subscriber = Subscriber(spec.name, state, self.index, self._telemetry, self._context)
            log.info("following KV events at %s", endpoint, extra={"pod": spec.name})
            try:
                await subscriber.run()
            except zmq.ZMQError as exc:
                state.error = str(exc)
                log.warning("KV events failed (%s); retrying", exc, extra={"pod": spec.name})
                await asyncio.sleep(delay)
                delay = min(self._settings.reconnect_max, delay * 2)

    async def _endpoint(self, spec: PodSpec) -> tuple[str, str | None]:
        """``(publisher, replay endpoint or None)``, with ``*`` replaced by the pod's IP."""
        host = spec.address.rpartition(":")[0]
        if spec.kv_events != AUTO:
            return spec.kv_events.replace("*", host), None
        timeout = aiohttp.ClientTimeout(total=2.0)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(f"{spec.base_url}/kv_event_sources") as response,
        ):
            if response.status != 200:
                raise ValueError(f"/kv_event_sources answered {response.status}")
            document = orjson.loads(await response.read())
        endpoint, replay = _sources(document)
        return endpoint.replace("*", host), replay.replace("*", host) if replay else None

    # -- reads (the prefix producer, the debug API) --------------------------------------------

    def hasher(self, pod: str, now: float) -> BlockHasher | None:
        """How to name ``pod``'s blocks, when it can be matched exactly right now."""
        state = self.states.get(pod)
        if state is None or not state.connected:
            return None
        reading = self._readings.get(pod)
        metrics = reading.metrics if reading is not None else None
        if (
            metrics is not None
            and (metrics.running or 0) > 0
            and (
                state.last_event_at is None
                or now - state.last_event_at > self._settings.silence_after
            )
            and reading is not None
            and now - reading.at < self._settings.silence_after
        ):
            return None  # busy, yet silent: its events have stopped
        settings = self._settings
        size = (metrics.block_size if metrics else None) or state.block_size or settings.block_size
        if not size:
            return None
        algo = (metrics.hash_algo if metrics else None) or settings.hash_algo
        key = (algo, size, settings.hash_seed)
        if key not in self._hashers:
            try:
                self._hashers[key] = BlockHasher(algo, size, settings.hash_seed)
            except (UnreproducibleHashError, ValueError) as exc:
                self._hashers[key] = None
                log.error("exact prefix matching refused: %s", exc, extra={"pod": pod})
        hasher = self._hashers[key]
        if hasher is None and pod not in self._refused:
            self._refused.add(pod)
            log.error(
                "pod stays approximately matched: its block hashes (%s) cannot be reproduced",
                algo,
                extra={"pod": pod},
            )
        return hasher

    def lag(self, pod: str) -> float | None:
        """Seconds between the pod publishing its last event and now (wall clocks)."""
        state = self.states.get(pod)
        if state is None or state.last_published is None:
            return None
        return max(0.0, time.time() - state.last_published)


def _silent(reading: Reading, state: PodEvents, now: float, silence_after: float) -> bool:
    """Whether a pod that is running requests has published nothing for ``silence_after``."""
    busy = (reading.metrics.running or 0) > 0 and now - reading.at < silence_after
    last = state.last_event_at
    return busy and (last is None or now - last > silence_after)


def _key(spec: PodSpec) -> str:
    return f"{spec.address}|{spec.kv_events}"


def _sources(document: Any) -> tuple[str, str | None]:
    """The first publisher endpoint (and replay endpoint) in a ``/kv_event_sources`` answer."""
    found: list[tuple[str, str | None]] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            endpoint = node.get("endpoint")
            if isinstance(endpoint, str) and endpoint.startswith("tcp://"):
                replay = node.get("replay_endpoint")
                found.append((endpoint, replay if isinstance(replay, str) else None))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(document)
    if not found:
        raise ValueError("no tcp:// endpoint in /kv_event_sources")
    return found[0]
