"""List and watch one resource into a cache on the event loop, from background threads.

The Kubernetes client is synchronous, so each watched namespace (or the whole cluster) gets one
daemon thread that lists, then watches from the list's resourceVersion. Every result crosses to
the asyncio loop through ``loop.call_soon_threadsafe``; the cache and the listeners live only on
the loop, so nothing else needs a lock and the loop never waits on the network.

Recovery: a watch the server ends is resumed from the last resourceVersion seen (bookmarks keep it
fresh); 410 Gone (history compacted) means a full re-list, which replaces the namespace's part of
the cache, so objects deleted while nobody watched disappear too; any other error is retried with
capped exponential backoff and jitter.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from kubernetes import watch

from extproc.kube.client import ApiException, Kube, Resource
from extproc.kube.metrics import KubeMetrics

log = logging.getLogger(__name__)

ChangeType = Literal["reset", "upsert", "delete"]
Obj = dict[str, Any]


@dataclass(frozen=True)
class Change:
    """``reset``: a (re-)list replaced ``namespace``'s objects (None: all); else one object."""

    type: ChangeType
    namespace: str | None
    obj: Obj | None = None


Listener = Callable[[Change], None]

SHORT_WATCH = 1.0
"""A watch that ends sooner than this with no event counts as a failure (backoff applies)."""


@dataclass(frozen=True)
class Backoff:
    initial: float = 0.5
    maximum: float = 30.0

    def delay(self, attempt: int) -> float:
        """Full jitter: a random wait up to the capped exponential step."""
        return random.uniform(0.5, 1.0) * min(self.maximum, self.initial * 2.0**attempt)


DEFAULT_BACKOFF = Backoff()


def object_key(obj: Obj) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


class Informer:
    def __init__(
        self,
        kube: Kube,
        resource: Resource,
        namespaces: Sequence[str] | None,
        metrics: KubeMetrics,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
        transform: Callable[[Obj], Obj] | None = None,
        watch_timeout: int = 300,
        backoff: Backoff = DEFAULT_BACKOFF,
    ) -> None:
        self.resource = resource
        self._kube = kube
        self._namespaces: list[str | None] = list(namespaces) if namespaces else [None]
        self._metrics = metrics
        self._selector = label_selector
        self._fields = field_selector
        self._transform = transform
        self._watch_timeout = watch_timeout
        self._backoff = backoff
        self._cache: dict[str, Obj] = {}
        self._listed: set[str | None] = set()
        self._listeners: list[Listener] = []
        self._synced = asyncio.Event()
        self._stop = threading.Event()
        self._watches: set[watch.Watch] = set()
        self._watches_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- loop side -----------------------------------------------------------------------------

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def objects(self) -> list[Obj]:
        return list(self._cache.values())

    def get(self, namespace: str, name: str) -> Obj | None:
        return self._cache.get(f"{namespace}/{name}")

    @property
    def synced(self) -> bool:
        """True once every namespace has been listed at least once."""
        return self._synced.is_set()

    async def wait_synced(self) -> None:
        await self._synced.wait()

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for namespace in self._namespaces:
            thread = threading.Thread(
                target=self._run,
                args=(namespace,),
                name=f"watch-{self.resource.plural}-{namespace or 'all'}",
                daemon=True,
            )
            self._threads.append(thread)
            thread.start()

    async def stop(self, timeout: float = 2.0) -> None:
        """Stop the threads: open watches are shut so blocked reads return at once."""
        self._stop.set()
        with self._watches_lock:
            for stream in self._watches:
                stream.stop()  # type: ignore[no-untyped-call]
        for thread in self._threads:
            await asyncio.to_thread(thread.join, timeout)

    def _apply(self, change: Change, items: list[Obj] | None = None) -> None:
        if change.type == "reset":
            stale = [
                key
                for key, obj in self._cache.items()
                if change.namespace is None
                or (obj.get("metadata") or {}).get("namespace") == change.namespace
            ]
            for key in stale:
                del self._cache[key]
            for item in items or []:
                self._cache[object_key(item)] = item
            self._listed.add(change.namespace)
            if len(self._listed) == len(self._namespaces):
                self._synced.set()
        elif change.obj is not None:
            key = object_key(change.obj)
            if change.type == "delete":
                self._cache.pop(key, None)
            else:
                self._cache[key] = change.obj
        for listener in self._listeners:
            try:
                listener(change)
            except Exception:
                log.exception(
                    "%s listener failed", self.resource.kind, extra={"resource": self.resource.kind}
                )

    # -- thread side ---------------------------------------------------------------------------

    def _post(self, change: Change, items: list[Obj] | None = None) -> bool:
        """Hand a result to the loop; False when the loop is gone (shutting down)."""
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._apply, change, items)
        except RuntimeError:
            return False
        return True

    def _prepare(self, obj: Obj) -> Obj:
        return self._transform(obj) if self._transform is not None else obj

    def _opened(self, stream: watch.Watch, mine: list[watch.Watch]) -> None:
        mine.append(stream)
        with self._watches_lock:
            self._watches.add(stream)
        if self._stop.is_set():
            stream.stop()  # type: ignore[no-untyped-call]

    def _run(self, namespace: str | None) -> None:
        kind = self.resource.kind
        where = namespace or "all namespaces"
        resource_version: str | None = None
        failures = 0
        while not self._stop.is_set():
            mine: list[watch.Watch] = []
            try:
                if resource_version is None:
                    items, resource_version = self._kube.list(
                        self.resource, namespace, self._selector, self._fields
                    )
                    prepared = [self._prepare(item) for item in items]
                    if not self._post(Change("reset", namespace), prepared):
                        return
                    log.debug(
                        "listed %d %s objects in %s",
                        len(prepared),
                        kind,
                        where,
                        extra={"resource": kind, "namespace": where},
                    )
                    failures = 0
                opened_at = time.monotonic()
                events = 0
                for event_type, obj in self._kube.watch(
                    self.resource,
                    namespace,
                    self._selector,
                    resource_version,
                    self._watch_timeout,
                    functools.partial(self._opened, mine=mine),
                    self._fields,
                ):
                    events += 1
                    version = (obj.get("metadata") or {}).get("resourceVersion")
                    if version:
                        resource_version = str(version)
                    if event_type in ("ADDED", "MODIFIED"):
                        change = Change("upsert", namespace, self._prepare(obj))
                    elif event_type == "DELETED":
                        change = Change("delete", namespace, self._prepare(obj))
                    else:
                        continue
                    if not self._post(change):
                        return
                    failures = 0
                if not events and time.monotonic() - opened_at < SHORT_WATCH:
                    # A server (or proxy) closing watches at once would otherwise spin this loop.
                    closed = RuntimeError("watch closed at once")
                    failures = self._failed(closed, namespace, failures)
            except ApiException as exc:
                if self._stop.is_set():
                    return
                if exc.status == 410:
                    self._metrics.relists.labels(kind).inc()
                    log.info(
                        "%s watch in %s expired (410 Gone); listing again",
                        kind,
                        where,
                        extra={"resource": kind, "namespace": where},
                    )
                    resource_version = None
                    continue
                failures = self._failed(exc, namespace, failures)
                if exc.status in (401, 403, 404):
                    resource_version = None
            except Exception as exc:
                if self._stop.is_set():
                    return
                failures = self._failed(exc, namespace, failures)
            finally:
                with self._watches_lock:
                    self._watches.difference_update(mine)

    def _failed(self, exc: Exception, namespace: str | None, failures: int) -> int:
        kind = self.resource.kind
        delay = self._backoff.delay(failures)
        self._metrics.watch_errors.labels(kind).inc()
        reason = f"HTTP {exc.status} {exc.reason}" if isinstance(exc, ApiException) else repr(exc)
        log.warning(
            "%s list/watch in %s failed (%s); retrying in %.1fs",
            kind,
            namespace or "all namespaces",
            reason,
            delay,
            extra={"resource": kind, "namespace": namespace or "", "retry_in": round(delay, 2)},
        )
        self._stop.wait(delay)
        return failures + 1
