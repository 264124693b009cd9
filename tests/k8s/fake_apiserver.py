"""A small in-memory fake of the Kubernetes API, enough for the real ``kubernetes`` client.

It serves list, watch (chunked JSON lines, resourceVersion resume, label selectors and
``metadata.name``/``metadata.namespace`` field selectors, 410 Gone after ``compact()``), get,
create, replace (409 on a stale resourceVersion) and delete for Pods, Deployments, ModelAdapters,
InferencePools, HTTPRoutes, ReferenceGrants and Leases, on a free loopback port, from its own
thread and event loop so that synchronous and asynchronous tests can both use it.
It is a fake: no admission, no defaulting, no field validation, no authentication.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from extproc.devstack.processes import free_port

Obj = dict[str, Any]


@dataclass(frozen=True)
class Kind:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


KINDS = [
    Kind("", "v1", "pods", "Pod"),
    Kind("apps", "v1", "deployments", "Deployment"),
    Kind("model.aibrix.ai", "v1alpha1", "modeladapters", "ModelAdapter"),
    Kind("inference.networking.k8s.io", "v1", "inferencepools", "InferencePool"),
    Kind("gateway.networking.k8s.io", "v1", "httproutes", "HTTPRoute"),
    Kind("gateway.networking.k8s.io", "v1beta1", "referencegrants", "ReferenceGrant"),
    Kind("coordination.k8s.io", "v1", "leases", "Lease"),
]
BY_KIND = {k.kind: k for k in KINDS}
BY_PATH = {(k.group, k.version, k.plural): k for k in KINDS}


@dataclass
class Event:
    rv: int
    kind: Kind
    type: str
    obj: Obj
    old: Obj | None


@dataclass
class Failure:
    status: int
    method: str | None
    path_contains: str | None
    times: int


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    user_agent: str


@dataclass(eq=False)
class _Watcher:
    kind: Kind
    namespace: str | None
    selector: str | None
    fields: str | None
    queue: asyncio.Queue[Event | None] = field(default_factory=asyncio.Queue)


def selector_matches(selector: str | None, labels: dict[str, str]) -> bool:
    """Equality-based label selectors: ``a``, ``!a``, ``a=b``, ``a==b``, ``a!=b``, comma = and."""
    for term in filter(None, (t.strip() for t in (selector or "").split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key) != value:
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


FIELDS = ("metadata.name", "metadata.namespace")
"""The field selectors every kind supports; other fields are refused with 400, as the API does."""


def fields_match(selector: str | None, obj: Obj) -> bool:
    """Field selectors on ``metadata.name``/``metadata.namespace``: ``=``, ``==``, ``!=``."""
    meta = obj.get("metadata") or {}
    for term in filter(None, (t.strip() for t in (selector or "").split(","))):
        negate = "!=" in term
        key, value = term.replace("!=", "=").replace("==", "=").split("=", 1)
        actual = meta.get(key.removeprefix("metadata."), "")
        if (actual == value) == negate:
            return False
    return True


def bad_fields(selector: str | None) -> str | None:
    """The first term of ``selector`` this fake (and the API, for most kinds) cannot select on."""
    for term in filter(None, (t.strip() for t in (selector or "").split(","))):
        key = term.replace("!=", "=").split("=", 1)[0]
        if "=" not in term or key not in FIELDS:
            return term
    return None


def _labels(obj: Obj | None) -> dict[str, str]:
    return dict(((obj or {}).get("metadata") or {}).get("labels") or {})


def _status(code: int, reason: str, message: str) -> Obj:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure" if code >= 400 else "Success",
        "message": message,
        "reason": reason,
        "code": code,
    }


class FakeApiServer:
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.requests: list[Request] = []
        self._lock = threading.RLock()
        self._objects: dict[tuple[str, str, str], Obj] = {}
        self._history: list[Event] = []
        self._rv = 1000
        self._compacted = 0
        self._failures: list[Failure] = []
        self._watchers: set[_Watcher] = set()
        self._muted = False
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> FakeApiServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(5)
        return self

    async def _serve(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    def stop(self) -> None:
        async def shutdown() -> None:
            for watcher in list(self._watchers):
                watcher.queue.put_nowait(None)
            if self._runner is not None:
                await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def write_kubeconfig(self, path: Path) -> Path:
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
                    "users": [{"name": "fake", "user": {"token": "fake-token"}}],
                    "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
                    "current-context": "fake",
                }
            )
        )
        return path

    # -- what tests call (any thread) ----------------------------------------------------------

    def put(self, obj: Obj) -> Obj:
        """Create or update ``obj`` (kind, metadata.name and namespace required)."""
        kind = BY_KIND[obj["kind"]]
        meta = obj["metadata"]
        with self._lock:
            return self._store(kind, meta.get("namespace", "default"), copy.deepcopy(obj))

    def delete(self, kind_name: str, namespace: str, name: str) -> None:
        with self._lock:
            self._remove(BY_KIND[kind_name], namespace, name)

    def get(self, kind_name: str, namespace: str, name: str) -> Obj | None:
        with self._lock:
            obj = self._objects.get((kind_name, namespace, name))
            return copy.deepcopy(obj) if obj is not None else None

    def objects(self, kind_name: str) -> list[Obj]:
        with self._lock:
            return [copy.deepcopy(o) for (k, _, _), o in self._objects.items() if k == kind_name]

    @contextlib.contextmanager
    def unobserved(self) -> Iterator[None]:
        """Changes made inside reach no open watch; on exit history is compacted, so every
        watcher is behind and gets 410 Gone: only a re-list can show what happened."""
        with self._lock:
            self._muted = True
        try:
            yield
        finally:
            with self._lock:
                self._muted = False
                self.compact()

    def compact(self) -> None:
        """Forget all history (as etcd compaction does): open watches end with 410 Gone."""
        with self._lock:
            self._compacted = self._rv
            self._history.clear()
            for watcher in list(self._watchers):
                self._loop.call_soon_threadsafe(watcher.queue.put_nowait, None)

    def fail(
        self,
        status: int,
        *,
        method: str | None = None,
        path_contains: str | None = None,
        times: int = 1,
    ) -> None:
        with self._lock:
            self._failures.append(Failure(status, method, path_contains, times))

    def heal(self) -> None:
        """Drop the failures ``fail`` injected that have not happened yet."""
        with self._lock:
            self._failures.clear()

    def writes(self, kind_name: str | None = None) -> list[Request]:
        """Create/replace/delete requests, optionally only those for one kind."""
        plural = BY_KIND[kind_name].plural if kind_name else ""
        with self._lock:
            return [
                r
                for r in self.requests
                if r.method in ("POST", "PUT", "DELETE") and f"/{plural}" in r.path
            ]

    @property
    def watch_count(self) -> int:
        return len(self._watchers)

    # -- storage (under the lock) --------------------------------------------------------------

    def _next_rv(self) -> int:
        self._rv += 1
        return self._rv

    def _store(self, kind: Kind, namespace: str, obj: Obj) -> Obj:
        key = (kind.kind, namespace, obj["metadata"]["name"])
        old = self._objects.get(key)
        rv = self._next_rv()
        obj["apiVersion"] = kind.api_version
        obj["kind"] = kind.kind
        meta = obj["metadata"]
        meta["namespace"] = namespace
        meta["resourceVersion"] = str(rv)
        meta.setdefault("uid", old["metadata"]["uid"] if old else str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", "2025-01-01T00:00:00Z")
        self._objects[key] = obj
        self._emit(Event(rv, kind, "MODIFIED" if old else "ADDED", obj, old))
        return copy.deepcopy(obj)

    def _remove(self, kind: Kind, namespace: str, name: str) -> Obj | None:
        old = self._objects.pop((kind.kind, namespace, name), None)
        if old is not None:
            rv = self._next_rv()
            gone = copy.deepcopy(old)
            gone["metadata"]["resourceVersion"] = str(rv)
            self._emit(Event(rv, kind, "DELETED", gone, old))
        return old

    def _emit(self, event: Event) -> None:
        self._history.append(event)
        if self._muted:
            return
        for watcher in list(self._watchers):
            if watcher.kind == event.kind:
                self._loop.call_soon_threadsafe(watcher.queue.put_nowait, event)

    # -- HTTP ----------------------------------------------------------------------------------

    def _route(self, path: str) -> tuple[Kind, str | None, str | None]:
        parts = [p for p in path.split("/") if p]
        if parts[:1] == ["api"]:
            group, rest = "", parts[1:]
        elif parts[:1] == ["apis"] and len(parts) >= 3:
            group, rest = parts[1], parts[2:]
        else:
            raise KeyError(path)
        version, rest = rest[0], rest[1:]
        namespace = None
        if rest[:1] == ["namespaces"] and len(rest) >= 3:
            namespace, rest = rest[1], rest[2:]
        plural, name = rest[0], (rest[1] if len(rest) > 1 else None)
        return BY_PATH[(group, version, plural)], namespace, name

    def _injected_failure(self, request: web.Request) -> int | None:
        with self._lock:
            for failure in self._failures:
                if failure.method not in (None, request.method):
                    continue
                if failure.path_contains and failure.path_contains not in request.path:
                    continue
                failure.times -= 1
                if failure.times <= 0:
                    self._failures.remove(failure)
                return failure.status
        return None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        with self._lock:
            self.requests.append(
                Request(
                    request.method,
                    request.path,
                    dict(request.query),
                    request.headers.get("User-Agent", ""),
                )
            )
        try:
            kind, namespace, name = self._route(request.path)
        except (KeyError, IndexError):
            return web.json_response(_status(404, "NotFound", "no such path"), status=404)
        failed = self._injected_failure(request)
        if failed is not None:
            return web.json_response(_status(failed, "InternalError", "injected"), status=failed)
        if request.method == "GET" and name is None:
            bad = bad_fields(request.query.get("fieldSelector"))
            if bad is not None:
                message = f"field label not supported: {bad}"
                return web.json_response(_status(400, "BadRequest", message), status=400)
            if request.query.get("watch") in ("true", "1"):
                return await self._watch(request, kind, namespace)
            return self._list(request, kind, namespace)
        if request.method == "GET" and name is not None:
            return self._get(kind, namespace or "", name)
        if request.method == "POST" and namespace is not None:
            return self._create(kind, namespace, await request.json())
        if request.method == "PUT" and namespace is not None and name is not None:
            return self._replace(kind, namespace, name, await request.json())
        if request.method == "DELETE" and namespace is not None and name is not None:
            return self._delete(kind, namespace, name)
        return web.json_response(_status(405, "MethodNotAllowed", "unsupported"), status=405)

    def _selected(
        self, kind: Kind, namespace: str | None, selector: str | None, fields: str | None
    ) -> list[Obj]:
        return [
            copy.deepcopy(obj)
            for (k, ns, _), obj in sorted(self._objects.items())
            if k == kind.kind
            and (namespace is None or ns == namespace)
            and selector_matches(selector, _labels(obj))
            and fields_match(fields, obj)
        ]

    def _list(self, request: web.Request, kind: Kind, namespace: str | None) -> web.Response:
        with self._lock:
            items = self._selected(
                kind,
                namespace,
                request.query.get("labelSelector"),
                request.query.get("fieldSelector"),
            )
            rv = self._rv
        for item in items:
            if kind.group == "":
                # Built-in lists omit kind and apiVersion on items; clients must not need them.
                item.pop("kind", None)
                item.pop("apiVersion", None)
        return web.json_response(
            {
                "kind": f"{kind.kind}List",
                "apiVersion": kind.api_version,
                "metadata": {"resourceVersion": str(rv)},
                "items": items,
            }
        )

    def _get(self, kind: Kind, namespace: str, name: str) -> web.Response:
        with self._lock:
            obj = self._objects.get((kind.kind, namespace, name))
            if obj is None:
                return web.json_response(_status(404, "NotFound", f"{name} not found"), status=404)
            return web.json_response(copy.deepcopy(obj))

    def _create(self, kind: Kind, namespace: str, body: Obj) -> web.Response:
        with self._lock:
            name = body["metadata"]["name"]
            if (kind.kind, namespace, name) in self._objects:
                return web.json_response(
                    _status(409, "AlreadyExists", f"{name} already exists"), status=409
                )
            body["metadata"].pop("resourceVersion", None)
            return web.json_response(self._store(kind, namespace, body), status=201)

    def _replace(self, kind: Kind, namespace: str, name: str, body: Obj) -> web.Response:
        with self._lock:
            current = self._objects.get((kind.kind, namespace, name))
            if current is None:
                return web.json_response(_status(404, "NotFound", f"{name} not found"), status=404)
            sent = body["metadata"].get("resourceVersion")
            if sent and sent != current["metadata"]["resourceVersion"]:
                return web.json_response(
                    _status(409, "Conflict", "the object has been modified"), status=409
                )
            body["metadata"]["uid"] = current["metadata"]["uid"]
            return web.json_response(self._store(kind, namespace, body))

    def _delete(self, kind: Kind, namespace: str, name: str) -> web.Response:
        with self._lock:
            if self._remove(kind, namespace, name) is None:
                return web.json_response(_status(404, "NotFound", f"{name} not found"), status=404)
        return web.json_response(_status(200, "", "deleted"))

    async def _watch(
        self, request: web.Request, kind: Kind, namespace: str | None
    ) -> web.StreamResponse:
        selector = request.query.get("labelSelector")
        since = int(request.query.get("resourceVersion") or 0)
        timeout = float(request.query.get("timeoutSeconds") or 300)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        watcher = _Watcher(kind, namespace, selector, request.query.get("fieldSelector"))
        with self._lock:
            if since < self._compacted:
                backlog: list[Event] | None = None
            else:
                backlog = [e for e in self._history if e.kind == kind and e.rv > since]
                self._watchers.add(watcher)
        if backlog is None:
            await self._send_gone(response)
            return response
        try:
            for event in backlog:
                await self._send(response, watcher, event)
            deadline = self._loop.time() + timeout
            while True:
                remaining = deadline - self._loop.time()
                if remaining <= 0:
                    break
                try:
                    event = await asyncio.wait_for(watcher.queue.get(), remaining)
                except TimeoutError:
                    break
                if event is None:
                    with self._lock:
                        gone = self._compacted > since
                    if gone:
                        await self._send_gone(response)
                    break
                since = event.rv
                await self._send(response, watcher, event)
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            with self._lock:
                self._watchers.discard(watcher)
        with contextlib.suppress(ConnectionResetError):
            await response.write_eof()
        return response

    async def _send_gone(self, response: web.StreamResponse) -> None:
        status = _status(410, "Expired", "too old resource version")
        with contextlib.suppress(ConnectionResetError):
            await response.write(json.dumps({"type": "ERROR", "object": status}).encode() + b"\n")

    async def _send(self, response: web.StreamResponse, watcher: _Watcher, event: Event) -> None:
        if (
            watcher.namespace is not None
            and event.obj["metadata"]["namespace"] != watcher.namespace
        ):
            return
        if not fields_match(watcher.fields, event.obj):
            return  # name and namespace never change, so an object never enters or leaves
        now = selector_matches(watcher.selector, _labels(event.obj))
        before = event.old is not None and selector_matches(watcher.selector, _labels(event.old))
        if event.type == "DELETED":
            kind = "DELETED" if before else None
        elif now:
            kind = "MODIFIED" if before else "ADDED"
        else:
            kind = "DELETED" if before else None
        if kind is None:
            return
        line = json.dumps({"type": kind, "object": event.obj}).encode() + b"\n"
        await response.write(line)


@contextlib.contextmanager
def running() -> Iterator[FakeApiServer]:
    server = FakeApiServer().start()
    try:
        yield server
    finally:
        server.stop()
