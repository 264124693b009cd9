"""Leader election over a ``coordination.k8s.io/v1`` Lease, so one replica writes at a time.

The holder renews every third of the lease duration. Another replica takes over only after it has
watched the same lease record stay unchanged for a whole duration, measured on its own monotonic
clock (never by comparing the holder's timestamps with the local wall clock, so clock skew between
nodes cannot cause two leaders). A holder that has not renewed successfully for two thirds of the
duration stops calling itself leader before anyone else may take over. Every write goes through
the API server's optimistic concurrency (resourceVersion), so two replicas racing for a free
lease cannot both win. On shutdown the holder releases the lease so a successor starts at once.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from kubernetes import client

from extproc.kube.client import ApiException

log = logging.getLogger(__name__)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class LeaderLease:
    def __init__(
        self,
        api: client.ApiClient,
        namespace: str,
        name: str,
        identity: str,
        duration: float,
    ) -> None:
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.duration = duration
        self._api = client.CoordinationV1Api(api)
        self._listeners: list[Callable[[bool], None]] = []
        # Its own thread: renewals never queue behind other blocking work on the loop's pool.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lease")
        self._renewed_at: float | None = None
        self._observed: tuple[object, ...] | None = None
        self._observed_at = 0.0
        self._leading = False

    def subscribe(self, listener: Callable[[bool], None]) -> None:
        """``listener(leading)`` on every change of leadership."""
        self._listeners.append(listener)

    @property
    def retry_period(self) -> float:
        return self.duration / 3

    @property
    def _timeout(self) -> tuple[float, float]:
        """A renewal slower than the retry period is of no use: give up on it then."""
        seconds = max(1.0, self.retry_period)
        return (seconds, seconds)

    @property
    def renew_deadline(self) -> float:
        return self.duration * 2 / 3

    def is_leader(self) -> bool:
        """Holding the lease and renewed recently enough that nobody else can have taken it."""
        renewed = self._renewed_at
        return renewed is not None and time.monotonic() - renewed < self.renew_deadline

    async def run(self) -> None:
        """Acquire and renew until cancelled; then release if held."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                started = time.monotonic()
                try:
                    held = await loop.run_in_executor(self._executor, self.try_acquire_or_renew)
                except Exception as exc:
                    # Unreachable API: keep leading until the renew deadline runs out.
                    log.warning(
                        "lease %s/%s: %s",
                        self.namespace,
                        self.name,
                        exc,
                        extra={"lease": self.name, "identity": self.identity},
                    )
                else:
                    self._renewed_at = started if held else None
                self._update()
                await asyncio.sleep(self.retry_period)
        finally:
            if self._renewed_at is not None:
                self._renewed_at = None
                self._update()
                try:
                    await asyncio.shield(loop.run_in_executor(self._executor, self.release))
                except Exception as exc:
                    log.warning(
                        "lease %s/%s not released: %s",
                        self.namespace,
                        self.name,
                        exc,
                        extra={"lease": self.name, "identity": self.identity},
                    )
            self._executor.shutdown(wait=False)

    def _update(self) -> None:
        leading = self.is_leader()
        if leading == self._leading:
            return
        self._leading = leading
        log.info(
            "%s the HTTPRoute controller lease %s/%s",
            "acquired" if leading else "lost",
            self.namespace,
            self.name,
            extra={"lease": self.name, "identity": self.identity},
        )
        for listener in self._listeners:
            listener(leading)

    def try_acquire_or_renew(self) -> bool:
        """One election round (blocking). True when this replica holds the lease afterwards."""
        try:
            lease = self._api.read_namespaced_lease(
                self.name, self.namespace, _request_timeout=self._timeout
            )
        except ApiException as exc:
            if exc.status != 404:
                raise
            return self._create()
        spec = lease.spec or client.V1LeaseSpec()
        record = (
            spec.holder_identity,
            spec.renew_time,
            spec.lease_transitions,
            spec.lease_duration_seconds,
        )
        now = time.monotonic()
        if record != self._observed:
            self._observed, self._observed_at = record, now
        holder = spec.holder_identity or ""
        held_for = float(spec.lease_duration_seconds or self.duration)
        if holder and holder != self.identity and now - self._observed_at < held_for:
            return False
        stamp = _now()
        if holder != self.identity:
            spec.lease_transitions = (spec.lease_transitions or 0) + (1 if holder else 0)
            spec.acquire_time = stamp
            spec.holder_identity = self.identity
        spec.renew_time = stamp
        spec.lease_duration_seconds = self._duration_seconds()
        lease.spec = spec
        try:
            self._api.replace_namespaced_lease(
                self.name, self.namespace, lease, _request_timeout=self._timeout
            )
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True

    def release(self) -> None:
        """Give the lease up (holder cleared) so another replica need not wait for expiry."""
        try:
            lease = self._api.read_namespaced_lease(
                self.name, self.namespace, _request_timeout=self._timeout
            )
        except ApiException as exc:
            if exc.status == 404:
                return
            raise
        if lease.spec is None or lease.spec.holder_identity != self.identity:
            return
        lease.spec.holder_identity = None
        lease.spec.renew_time = _now()
        try:
            self._api.replace_namespaced_lease(
                self.name, self.namespace, lease, _request_timeout=self._timeout
            )
        except ApiException as exc:
            if exc.status != 409:
                raise
        log.info(
            "released the HTTPRoute controller lease %s/%s",
            self.namespace,
            self.name,
            extra={"lease": self.name, "identity": self.identity},
        )

    def _duration_seconds(self) -> int:
        return max(1, math.ceil(self.duration))

    def _create(self) -> bool:
        stamp = _now()
        lease = client.V1Lease(
            metadata=client.V1ObjectMeta(name=self.name, namespace=self.namespace),
            spec=client.V1LeaseSpec(
                holder_identity=self.identity,
                lease_duration_seconds=self._duration_seconds(),
                acquire_time=stamp,
                renew_time=stamp,
                lease_transitions=0,
            ),
        )
        try:
            self._api.create_namespaced_lease(self.namespace, lease, _request_timeout=self._timeout)
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True
