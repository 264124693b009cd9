"""Keeps one HTTPRoute per model (and its ReferenceGrants) in step with the cluster.

Every replica watches Deployments and Pods and renders the routes (``extproc.kube.httproutes``), so
each one reports misplaced keys and other findings; only the holder of the Lease writes. It
touches only objects carrying its ``managed-by`` label: a route of the same name made by someone
else is left alone and reported as ``not_owned``. It writes only after both watches have listed
everything once, so a restart never deletes routes of models it has not seen yet.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from extproc.kube import model_labels as keys
from extproc.kube.client import HTTPROUTE, REFERENCE_GRANT, ApiException, Kube, Resource
from extproc.kube.httproutes import OWNED_SELECTOR, Finding, Rendering, RouteOptions, render
from extproc.kube.informer import DEFAULT_BACKOFF, Backoff, Change, Informer, Obj
from extproc.kube.lease import LeaderLease
from extproc.kube.metrics import KubeMetrics
from extproc.kube.model_labels import MisplacedKeyReport
from extproc.tasks import cancel_and_wait

log = logging.getLogger(__name__)

Key = tuple[str, str, str]
"""(kind, namespace, name)"""


class NotLeader(Exception):
    """The lease was lost in the middle of applying: stop writing at once."""


def slim_deployment(deployment: Obj) -> Obj:
    """Only the metadata the render reads."""
    meta = deployment.get("metadata") or {}
    return {
        "apiVersion": deployment.get("apiVersion", "apps/v1"),
        "kind": "Deployment",
        "metadata": {
            k: meta[k] for k in ("name", "namespace", "labels", "annotations") if k in meta
        },
    }


def _key(obj: Mapping[str, Any]) -> Key:
    meta = obj["metadata"]
    return (str(obj["kind"]), str(meta["namespace"]), str(meta["name"]))


def _contains(have: Any, want: Any) -> bool:
    """``want`` is a subset of ``have``: fields the API server defaulted do not count as drift."""
    if isinstance(want, dict):
        return isinstance(have, dict) and all(
            k in have and _contains(have[k], v) for k, v in want.items()
        )
    if isinstance(want, list):
        return (
            isinstance(have, list)
            and len(have) == len(want)
            and all(_contains(h, w) for h, w in zip(have, want, strict=True))
        )
    return bool(have == want)


def _up_to_date(have: Obj, want: Obj) -> bool:
    return _contains(have.get("spec"), want["spec"]) and _contains(
        (have.get("metadata") or {}).get("labels") or {}, want["metadata"]["labels"]
    )


def _is_owned(obj: Obj) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    name, _, value = OWNED_SELECTOR.partition("=")
    return bool(labels.get(name) == value)


class HTTPRouteController:
    def __init__(
        self,
        kube: Kube,
        deployments: Informer,
        pods: Informer,
        lease: LeaderLease,
        options: RouteOptions,
        metrics: KubeMetrics,
        misplaced: MisplacedKeyReport,
        namespaces: Sequence[str] | None,
        *,
        adapters: Informer | None = None,
        resync: float = 60.0,
        debounce: float = 0.1,
        backoff: Backoff = DEFAULT_BACKOFF,
    ) -> None:
        self._kube = kube
        self._deployments = deployments
        self._pods = pods
        self._adapters = adapters
        self._lease = lease
        self._options = options
        self._metrics = metrics
        self._misplaced = misplaced
        self._namespaces: list[str | None] = list(namespaces) if namespaces else [None]
        self._resync = resync
        self._debounce = debounce
        self._backoff = backoff
        self._wake = asyncio.Event()
        self._applied: list[Obj] | None = None
        self._logged: set[str] = set()
        self._not_owned: list[Finding] = []
        # One writer thread: applies never overlap, and never wait behind the loop's shared pool.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="httproutes")
        deployments.subscribe(self._changed)
        pods.subscribe(self._changed)
        if adapters is not None:
            adapters.subscribe(self._changed)
        lease.subscribe(self.leadership_changed)

    def _changed(self, _: Change) -> None:
        self._wake.set()

    def leadership_changed(self, leading: bool) -> None:
        self._metrics.leader.set(1 if leading else 0)
        self._applied = None
        if leading:
            self._wake.set()

    async def run(self) -> None:
        lease = asyncio.create_task(self._lease.run(), name="httproute-lease")
        try:
            await asyncio.gather(self._deployments.wait_synced(), self._pods.wait_synced())
            failures = 0
            wait = 0.0
            while True:
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=wait)
                except TimeoutError:
                    self._applied = None  # periodic resync: re-read what is in the cluster
                self._wake.clear()
                await asyncio.sleep(self._debounce)
                try:
                    await self.reconcile()
                except NotLeader:
                    wait = self._resync
                except Exception as exc:
                    self._metrics.reconcile_errors.inc()
                    wait = self._backoff.delay(failures)
                    failures += 1
                    log.warning(
                        "HTTPRoute reconcile failed (%s); retrying in %.1fs",
                        exc,
                        wait,
                        extra={"retry_in": round(wait, 2)},
                    )
                    self._applied = None
                else:
                    failures = 0
                    wait = self._resync
        finally:
            await cancel_and_wait([lease])
            self._metrics.leader.set(0)
            self._executor.shutdown(wait=False)

    async def reconcile(self) -> None:
        adapters = self._adapters.objects() if self._adapters is not None else []
        rendering = render(
            [*self._deployments.objects(), *self._pods.objects(), *adapters], self._options
        )
        self._report(rendering)
        if not self._lease.is_leader():
            return
        if self._applied == rendering.objects:
            return
        loop = asyncio.get_running_loop()
        self._not_owned = await loop.run_in_executor(self._executor, self._apply, rendering.objects)
        self._report(rendering)
        self._applied = rendering.objects

    # -- reporting -----------------------------------------------------------------------------

    def _report(self, rendering: Rendering) -> None:
        misplaced: dict[keys.ObjectRef, list[keys.MisplacedKey]] = {
            ref: [] for ref in rendering.sources
        }
        counts: dict[str, int] = {}
        messages: set[str] = set()
        for finding in [*rendering.findings, *self._not_owned]:
            counts[finding.code] = counts.get(finding.code, 0) + 1
            if finding.misplaced is not None and finding.ref is not None:
                misplaced.setdefault(finding.ref, []).append(finding.misplaced)
                continue  # MisplacedKeyReport logs these once
            messages.add(finding.message)
            if finding.message not in self._logged:
                log.warning(
                    "%s",
                    finding.message,
                    extra={"code": finding.code, "model": finding.model or ""},
                )
        self._logged = messages
        for ref, found in misplaced.items():
            self._misplaced.report(ref, found)
        for ref in self._misplaced.refs():
            if ref.kind in ("Deployment", "Pod") and ref not in misplaced:
                self._misplaced.forget(ref)
        self._metrics.findings.clear()
        for code, count in counts.items():
            self._metrics.findings.labels(code).set(count)

    # -- writing (in a worker thread) ----------------------------------------------------------

    def _resource(self, kind: str) -> Resource:
        return HTTPROUTE if kind == HTTPROUTE.kind else REFERENCE_GRANT

    def _check_leader(self) -> None:
        if not self._lease.is_leader():
            raise NotLeader

    def _owned(self) -> dict[Key, Obj]:
        routes, _ = self._kube.list(HTTPROUTE, self._options.gateway_namespace, OWNED_SELECTOR)
        objects = {_key(o): o for o in routes}
        for namespace in self._namespaces:
            try:
                grants, _ = self._kube.list(REFERENCE_GRANT, namespace, OWNED_SELECTOR)
            except ApiException as exc:
                if exc.status != 404:
                    raise
                grants = []
            objects.update({_key(o): o for o in grants})
        return objects

    def _apply(self, desired: list[Obj]) -> list[Finding]:
        """Create, update and delete owned objects until the cluster matches ``desired``."""
        current = self._owned()
        wanted = {_key(o): o for o in desired}
        not_owned: list[Finding] = []
        for key, want in wanted.items():
            have = current.get(key)
            if have is None:
                self._check_leader()
                have = self._create(key, want)
                if have is None:
                    not_owned.append(
                        Finding(
                            "not_owned",
                            f"{key[0]} {key[1]}/{key[2]} exists and is not managed by extproc "
                            f"(no label {OWNED_SELECTOR}); leaving it alone",
                            want["metadata"]["labels"].get(keys.NAME),
                        )
                    )
                    continue
            if not _up_to_date(have, want):
                self._check_leader()
                self._replace(key, have, want)
        for key in current:
            if key not in wanted:
                self._check_leader()
                self._kube.delete(self._resource(key[0]), key[1], key[2])
                self._metrics.writes.labels(key[0], "delete").inc()
                log.info("deleted %s %s/%s", *key, extra={"kind": key[0], "namespace": key[1]})
        return not_owned

    def _create(self, key: Key, want: Obj) -> Obj | None:
        """Create ``want``; the existing object if one we own raced us; None if not ours."""
        resource = self._resource(key[0])
        try:
            self._kube.create(resource, want)
        except ApiException as exc:
            if exc.status != 409:
                raise
            existing = self._kube.get(resource, key[1], key[2])
            if existing is None:
                raise
            return existing if _is_owned(existing) else None
        self._metrics.writes.labels(key[0], "create").inc()
        log.info("created %s %s/%s", *key, extra={"kind": key[0], "namespace": key[1]})
        return want

    def _replace(self, key: Key, have: Obj, want: Obj) -> None:
        metadata = dict(have.get("metadata") or {})
        metadata["labels"] = {**(metadata.get("labels") or {}), **want["metadata"]["labels"]}
        body = {
            "apiVersion": want["apiVersion"],
            "kind": want["kind"],
            "metadata": metadata,
            "spec": want["spec"],
        }
        self._kube.replace(self._resource(key[0]), body)
        self._metrics.writes.labels(key[0], "update").inc()
        log.info("updated %s %s/%s", *key, extra={"kind": key[0], "namespace": key[1]})
