"""Requests in flight and held per model, for this replica alone or for every replica.

KEDA asks one replica of the router (through its Service) and must get the answer every replica
would give. The pods' own metrics are shared already (every replica scrapes the same pods); the
requests each replica holds or has in flight are not. ``LocalCounts`` answers from this process
only; ``RedisCounts`` also publishes this replica's counts to Redis (one key per replica, expiring
a few seconds after its last refresh) and adds up the others'. Redis is only touched from
background tasks: the request path never waits for it.

Both tell listeners at once when a name's local activity starts or ends (a request held for a
model with no ready pod is reported the moment it is held); ``RedisCounts`` also when another
replica's does, through a Redis channel every replica subscribes to.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from extproc.fleet.registry import PodRegistry
from extproc.routing.accounting import Accounting
from extproc.routing.holds import Holds
from extproc.tasks import cancel_and_wait
from extproc.telemetry import Telemetry

log = logging.getLogger(__name__)

Listener = Callable[[str], None]

POLL_SECONDS = 0.05
"""How often local in-flight counts are compared for a name going idle or busy (accounting has no
per-model listener; holds do, so a held request is seen without waiting for this)."""
PUBLISH_SECONDS = 1.0
"""How often a replica refreshes its key and reads the others' when nothing changed."""
KEY_TTL_MS = 5000
"""A replica's key expires this long after its last refresh: a replica that died stops counting."""
MIN_GAP_SECONDS = 0.02
"""At least this long between two Redis exchanges of one replica, however busy the traffic."""
PREFIX = "extproc:{autoscaling}:"
"""One hash tag for every key, so they share a Redis Cluster slot and MGET works."""
INDEX_KEY = PREFIX + "replicas"
CHANNEL = PREFIX + "changed"


def replica_key(replica: str) -> str:
    return f"{PREFIX}replica:{replica}"


def replica_id() -> str:
    """The pod's name (the hostname in Kubernetes) and a random suffix: unique per process."""
    base = os.environ.get("POD_NAME") or socket.gethostname()
    return f"{base}-{uuid.uuid4().hex[:8]}"


@dataclass(slots=True)
class Tally:
    """Counts per model name (only names the registry knows)."""

    in_flight: dict[str, int] = field(default_factory=dict)
    held: dict[str, int] = field(default_factory=dict)

    def active(self) -> set[str]:
        return {name for name, n in self.in_flight.items() if n > 0} | {
            name for name, n in self.held.items() if n > 0
        }

    def held_names(self) -> set[str]:
        return {name for name, n in self.held.items() if n > 0}

    def add(self, other: Tally) -> None:
        for name, n in other.in_flight.items():
            self.in_flight[name] = self.in_flight.get(name, 0) + n
        for name, n in other.held.items():
            self.held[name] = self.held.get(name, 0) + n


class LocalCounts:
    """This process's counts; change notices from its holds and a short local poll."""

    shared = False

    def __init__(self, registry: PodRegistry, accounting: Accounting, holds: Holds) -> None:
        self._registry = registry
        self._accounting = accounting
        self._holds = holds
        self._listeners: list[Listener] = []
        self._active: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        holds.on_change(self._held_changed)

    def on_change(self, listener: Listener) -> None:
        """Call ``listener(name)`` when requests for ``name`` may have started or ended."""
        self._listeners.append(listener)

    def in_flight(self, name: str) -> int:
        return self._accounting.model_in_flight(name)

    def held(self, name: str) -> int:
        return self._holds.held(name)

    def local(self) -> Tally:
        """This process's counts for the names the registry knows."""
        known = self._registry.knows_model
        return Tally(
            {n: c for n, c in self._accounting.in_flight_by_model().items() if known(n)},
            {n: c for n, c in self._holds.held_by_model().items() if known(n)},
        )

    async def start(self) -> None:
        self._task = asyncio.create_task(self._poll(), name="autoscaling-poll")

    async def stop(self) -> None:
        await cancel_and_wait([self._task])
        self._task = None

    def _notify(self, names: set[str]) -> None:
        for name in sorted(names):
            for listener in self._listeners:
                listener(name)

    def _held_changed(self, name: str) -> None:
        self._local_changed()
        self._notify({name})

    def _local_changed(self) -> None:
        """This replica's activity changed (``RedisCounts`` tells the others)."""

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(POLL_SECONDS)
            active = self.local().active()
            changed = active ^ self._active
            self._active = active
            if changed:
                self._local_changed()
                self._notify(changed)


class RedisCounts(LocalCounts):
    """Every replica's counts: this one's live, the others' as last read from Redis.

    When Redis cannot be reached, the others' counts are kept until their keys would have expired
    and then dropped: the replica answers from itself, and says so in the log.
    """

    shared = True

    def __init__(
        self,
        registry: PodRegistry,
        accounting: Accounting,
        holds: Holds,
        *,
        url: str,
        timeout: float,
        telemetry: Telemetry,
        replica: str | None = None,
    ) -> None:
        super().__init__(registry, accounting, holds)
        self.replica = replica or replica_id()
        self._timeout = timeout
        self._redis = Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, max_connections=4
        )
        self._subscriber = Redis.from_url(
            url, socket_connect_timeout=timeout, health_check_interval=30
        )
        self._errors = telemetry.redis_errors.labels("autoscaling")
        self._others = Tally()
        self._others_at = 0.0
        self._wake = asyncio.Event()
        self._announce = False
        self._failing = False
        self._tasks: list[asyncio.Task[None]] = []

    def in_flight(self, name: str) -> int:
        return super().in_flight(name) + self._fresh_others().in_flight.get(name, 0)

    def held(self, name: str) -> int:
        return super().held(name) + self._fresh_others().held.get(name, 0)

    async def start(self) -> None:
        await super().start()
        self._tasks = [
            asyncio.create_task(self._sync(), name="autoscaling-redis-sync"),
            asyncio.create_task(self._listen(), name="autoscaling-redis-listen"),
        ]

    async def stop(self) -> None:
        await super().stop()
        await cancel_and_wait(self._tasks)
        self._tasks = []
        # Leave at once rather than when the key expires; best effort, bounded.
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            async with asyncio.timeout(self._timeout):
                async with self._redis.pipeline(transaction=False) as pipe:
                    pipe.delete(replica_key(self.replica))
                    pipe.zrem(INDEX_KEY, self.replica)
                    pipe.publish(CHANNEL, self._message())
                    await pipe.execute()
        await self._redis.aclose()
        await self._subscriber.aclose()

    def _fresh_others(self) -> Tally:
        if time.monotonic() - self._others_at > KEY_TTL_MS / 1000:
            return Tally()
        return self._others

    def _local_changed(self) -> None:
        self._announce = True
        self._wake.set()

    def _message(self) -> bytes:
        return orjson.dumps({"replica": self.replica})

    async def _sync(self) -> None:
        """Publish this replica's counts and read the others': at once after a change, and every
        ``PUBLISH_SECONDS`` anyway (which also keeps the key alive)."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(PUBLISH_SECONDS):
                    await self._wake.wait()
            self._wake.clear()
            announce, self._announce = self._announce, False
            try:
                async with asyncio.timeout(self._timeout):
                    others = await self._exchange(announce)
            except (RedisError, OSError, TimeoutError) as exc:
                self._failed(exc)
            else:
                self._recovered()
                self._replace_others(others)
            await asyncio.sleep(MIN_GAP_SECONDS)

    async def _exchange(self, announce: bool) -> Tally:
        mine = self.local()
        value = orjson.dumps({"in_flight": mine.in_flight, "held": mine.held})
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.set(replica_key(self.replica), value, px=KEY_TTL_MS)
            pipe.zadd(INDEX_KEY, {self.replica: 0})
            pipe.zrange(INDEX_KEY, 0, -1)
            if announce:
                pipe.publish(CHANNEL, self._message())
            results = await pipe.execute()
        replicas = [r.decode() for r in results[2] if r.decode() != self.replica]
        others = Tally()
        if not replicas:
            return others
        values = await self._redis.mget([replica_key(r) for r in replicas])
        gone = [r for r, v in zip(replicas, values, strict=True) if v is None]
        for raw in values:
            if raw is None:
                continue
            try:
                document = orjson.loads(raw)
                others.add(Tally(_counts(document.get("in_flight")), _counts(document.get("held"))))
            except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
                continue  # a replica of another version, or garbage: not ours to count
        if gone:
            await self._redis.zrem(INDEX_KEY, *gone)
        return others

    def _replace_others(self, others: Tally) -> None:
        before, before_held = self._others.active(), self._others.held_names()
        self._others, self._others_at = others, time.monotonic()
        changed = (others.active() ^ before) | (others.held_names() - before_held)
        if changed:
            self._notify(changed)

    async def _listen(self) -> None:
        """Another replica's activity changed: read every replica's counts again at once."""
        while True:
            pubsub = self._subscriber.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(CHANNEL)
                while True:
                    message = await pubsub.get_message(timeout=PUBLISH_SECONDS)
                    if message is None or message.get("type") != "message":
                        continue
                    with contextlib.suppress(orjson.JSONDecodeError, AttributeError):
                        if orjson.loads(message["data"]).get("replica") == self.replica:
                            continue
                    self._wake.set()
            except (RedisError, OSError, TimeoutError) as exc:
                self._failed(exc)
                await asyncio.sleep(PUBLISH_SECONDS)
            finally:
                with contextlib.suppress(RedisError, OSError, TimeoutError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _failed(self, exc: BaseException) -> None:
        self._errors.inc()
        if not self._failing:
            self._failing = True
            log.warning(
                "autoscaling: cannot share request counts through Redis (%s); KEDA answers "
                "from this replica's own counts once the others' expire",
                exc or type(exc).__name__,
            )

    def _recovered(self) -> None:
        if self._failing:
            self._failing = False
            log.info("autoscaling: sharing request counts through Redis again")


def _counts(value: object) -> dict[str, int]:
    if not isinstance(value, dict):
        return {}
    return {str(k): int(v) for k, v in value.items() if isinstance(v, int) and v > 0}
