"""Which pods are fit to take traffic, judged by how their requests end (passive outlier
detection) and, for a pod that cannot be reached, by its ``/health``.

A pod that fails fast looks idle to every load-aware strategy and would draw most of the
traffic; this takes it out of rotation instead. A pod is ejected after
``consecutive_failures`` 5xx answers in a row, or at once when it cannot be reached (Envoy's
response code details say the connection failed or was reset, or the ``/health`` check made
after its first failure does not answer). An ejection lasts ``base_ejection``, doubling with
each ejection in a row up to ``max_ejection``. When it ends the pod is on probation: one
request at a time, whose outcome returns it to rotation or ejects it again for longer. While
an unreachable pod is ejected its ``/health`` is checked every ``probe_interval``, and a pod
that answers again comes back early. When every candidate is ejected the one whose ejection
ends first still serves: some service beats none.

Outcomes are written only through ``succeeded`` and ``failed`` (the routing pipeline's
release); readers get the fit subset of a decision's candidates.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from extproc.config import HealthSettings
from extproc.fleet.registry import PodRegistry
from extproc.tasks import cancel_and_wait
from extproc.telemetry import Telemetry
from strategies.context import PodSnapshot

log = logging.getLogger(__name__)

STATUS = "5xx"
UNREACHABLE = "unreachable"


@dataclass(slots=True)
class PodState:
    failures: int = 0
    """5xx answers in a row."""
    ejections: int = 0
    """Ejections in a row: the backoff's exponent."""
    ejected_until: float = 0.0
    reason: str = ""
    probation: bool = False
    probing: bool = False


class PodHealth:
    def __init__(
        self,
        settings: HealthSettings,
        registry: PodRegistry,
        telemetry: Telemetry,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._registry = registry
        self._telemetry = telemetry
        self._clock = clock
        self._states: dict[str, PodState] = {}
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._probes: set[asyncio.Task[None]] = set()
        self.enabled = settings.consecutive_failures > 0

    # -- outcomes ------------------------------------------------------------------------------

    def succeeded(self, pod: str) -> None:
        state = self._states.get(pod)
        if state is None:
            return
        if state.ejected_until > self._clock():
            state.failures = 0  # an answer from before the ejection: it stays ejected
            return
        del self._states[pod]  # back in rotation, the backoff forgotten

    def failed(self, pod: str, reason: str) -> None:
        if not self.enabled:
            return
        now = self._clock()
        state = self._states.setdefault(pod, PodState())
        if state.ejected_until > now and not state.probation:
            return  # already out
        state.failures += 1
        if (
            reason == UNREACHABLE
            or state.probation
            or state.failures >= self._settings.consecutive_failures
        ):
            self._eject(pod, state, reason, now)
        else:
            self._check_soon(pod)

    def _eject(self, pod: str, state: PodState, reason: str, now: float) -> None:
        settings = self._settings
        length = min(settings.max_ejection, settings.base_ejection * 2**state.ejections)
        state.ejections += 1
        state.ejected_until = now + length
        state.reason = reason
        state.probation = False
        state.failures = 0
        self._telemetry.count_ejection(pod, reason)
        log.warning("pod ejected for %.1fs (%s)", length, reason, extra={"pod": pod})

    # -- reads ---------------------------------------------------------------------------------

    def usable(self, pods: tuple[PodSnapshot, ...], now: float) -> tuple[PodSnapshot, ...]:
        """``pods`` less the ejected ones (and probation pods already busy with their one
        request); never empty when ``pods`` is not."""
        states = self._states
        if not states:
            return pods
        fit = []
        for pod in pods:
            state = states.get(pod.name)
            if state is None:
                fit.append(pod)
            elif state.ejected_until > now:
                continue
            elif state.ejected_until:
                state.probation = True
                if pod.in_flight == 0:
                    fit.append(pod)
            else:
                fit.append(pod)
        if fit:
            return pods if len(fit) == len(pods) else tuple(fit)
        return (min(pods, key=lambda p: states[p.name].ejected_until),)

    def state(self, pod: str) -> PodState | None:
        return self._states.get(pod)

    def ejected(self, now: float) -> list[str]:
        return [name for name, s in self._states.items() if s.ejected_until > now]

    def forget(self, pod: str) -> None:
        self._states.pop(pod, None)

    # -- /health checks ------------------------------------------------------------------------

    async def start(self) -> None:
        if self.enabled:
            self._task = asyncio.create_task(self._watch(), name="pod-health")

    async def stop(self) -> None:
        tasks = [*self._probes, *([self._task] if self._task else [])]
        await cancel_and_wait(tasks)
        if self._session is not None:
            await self._session.close()

    def _check_soon(self, pod: str) -> None:
        """After a 5xx: is the pod there at all? (A dead pod is ejected without waiting for
        more failures.)"""
        state = self._states.get(pod)
        if state is None or state.probing or self._task is None:
            return
        state.probing = True
        task = asyncio.get_running_loop().create_task(self._check(pod, after_failure=True))
        self._probes.add(task)
        task.add_done_callback(self._probes.discard)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._settings.probe_interval)
            now = self._clock()
            for name, state in list(self._states.items()):
                if state.reason == UNREACHABLE and state.ejected_until > now and not state.probing:
                    state.probing = True
                    task = asyncio.get_running_loop().create_task(self._check(name))
                    self._probes.add(task)
                    task.add_done_callback(self._probes.discard)

    async def _check(self, name: str, after_failure: bool = False) -> None:
        healthy = await self._probe(name)
        state = self._states.get(name)
        if state is None:
            return
        state.probing = False
        if after_failure:
            if healthy is False:
                self.failed(name, UNREACHABLE)
        elif healthy and state.ejected_until > self._clock():
            state.ejected_until = self._clock()  # answering again: on probation now
            log.info("pod answers /health again", extra={"pod": name})

    async def _probe(self, name: str) -> bool | None:
        """True: /health answered 2xx; False: the pod could not be reached or answered
        otherwise; None: the pod is gone."""
        pod = self._registry.get(name)
        if pod is None:
            return None
        if self._session is None:
            timeout = aiohttp.ClientTimeout(total=self._settings.probe_timeout)
            self._session = aiohttp.ClientSession(timeout=timeout)
        try:
            async with self._session.get(f"{pod.spec.base_url}/health") as response:
                return 200 <= response.status < 300
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False
