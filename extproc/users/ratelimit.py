"""Per-user rate limits on the request path: one check when a request arrives, one token charge
when it ends.

The check (``admit``) is one store call: it reads the user's limits, checks RPM then TPM, and
counts the request only if both pass, so a rejected request costs the user nothing. TPM is
checked against tokens already charged; a request's own tokens are only known from its
response's ``usage``, charged by ``charge`` when the exchange closes. Charges are batched by a
background task (one pipelined batch per wake-up), so closing an exchange never waits on I/O.

A Redis store bounds its own calls (``redis_timeout`` of Redis's time on the wire; queueing and
a busy event loop do not count, see ``wire_timeout``). A check that fails applies
``redis_failure_policy`` (serve without limits, or 503), and for ``redis_retry_interval``
afterwards checks skip Redis and apply it at once, so an outage costs requests no timeouts; the
first check after that interval tries Redis again, which is how the gateway recovers without a
restart. A failed token charge is counted and logged, and changes nothing for checks. Failures
are counted per call and logged at most every ``WARN_EVERY`` s per operation.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from redis.exceptions import RedisError

from extproc import errors
from extproc.config import UsersSettings
from extproc.tasks import cancel_and_wait
from extproc.telemetry import Telemetry
from extproc.users.sliding_window import retry_after_seconds
from extproc.users.store import Decision, UserStore, Verdict, name_problem, printable
from strategies.context import Usage

log = logging.getLogger(__name__)

STORE_FAILURES = (RedisError, OSError, TimeoutError)
WARN_EVERY = 10.0
"""Seconds between two warnings about one failing operation (those in between are counted)."""


@dataclass(slots=True)
class _Warnings:
    """One operation's warning throttle."""

    warned_at: float = -WARN_EVERY
    suppressed: int = 0


class RateLimiter:
    def __init__(
        self, settings: UsersSettings, store: UserStore, telemetry: Telemetry, user_header: str
    ) -> None:
        self._store = store
        self._remote = store.remote
        self._fail_closed = settings.redis_failure_policy == "fail-closed"
        self._policy = settings.redis_failure_policy
        self._retry_interval = settings.redis_retry_interval
        self._unavailable_retry_after = retry_after_seconds(int(self._retry_interval * 1000))
        self._header = user_header
        self._defaults = (
            (settings.default_rpm, settings.default_tpm)
            if settings.unknown_user_policy == "default-limits"
            else None
        )
        self._skip_until = 0.0
        self._failing = False
        self._warnings: dict[str, _Warnings] = {}
        self._pending: dict[str, int] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        decisions = telemetry.ratelimit_decisions
        self._admitted = decisions.labels("admitted")
        self._over_rpm = decisions.labels("rpm_exceeded")
        self._over_tpm = decisions.labels("tpm_exceeded")
        self._unknown = decisions.labels("unknown_user")
        self._failed_open = decisions.labels("failed_open")
        self._failed_closed = decisions.labels("failed_closed")
        self._check_seconds = telemetry.ratelimit_seconds
        self._reported_tokens = telemetry.ratelimit_tokens.labels("reported")
        self._estimated_tokens = telemetry.ratelimit_tokens.labels("estimated")
        self._store_errors = telemetry.redis_errors

    # -- the request path ----------------------------------------------------------------------

    async def admit(self, user: str) -> bool:
        """Check and count one request of ``user``; true when its tokens must be charged.

        Raises ``GatewayError``: 400 for a name no user can have (control characters...), 429
        over a limit, 401 for an unknown user (unless unknown users get default limits), 503 when
        the store fails and the policy is fail-closed.
        """
        problem = name_problem(user)
        if problem is not None:
            raise errors.bad_request(
                f"Invalid {self._header} header '{errors.clip(printable(user), 64)}': {problem}",
                param=self._header,
                code="invalid_user",
            )
        started = time.perf_counter()
        verdict = await self._check(user)
        self._check_seconds.observe(time.perf_counter() - started)
        if verdict is None:
            if self._fail_closed:
                self._failed_closed.inc()
                raise errors.limits_unavailable(self._unavailable_retry_after)
            self._failed_open.inc()
            return False
        decision = verdict.decision
        if decision is Decision.ADMITTED:
            self._admitted.inc()
            return verdict.tpm > 0
        if decision is Decision.UNKNOWN:
            self._unknown.inc()
            raise errors.unknown_user(user, self._header)
        retry_after = retry_after_seconds(verdict.retry_after_ms)
        if decision is Decision.OVER_RPM:
            self._over_rpm.inc()
            raise errors.rate_limited(user, "RPM", verdict.limit, retry_after)
        self._over_tpm.inc()
        raise errors.rate_limited(user, "TPM", verdict.limit, retry_after)

    async def _check(self, user: str) -> Verdict | None:
        """The store's verdict, or ``None`` when the store cannot give one in time."""
        if not self._remote:
            return await self._store.admit(user, self._defaults)
        if time.monotonic() < self._skip_until:
            return None
        try:
            verdict = await self._store.admit(user, self._defaults)
        except STORE_FAILURES as exc:
            self._skip_until = time.monotonic() + self._retry_interval
            self._failing = True
            self._warn("admit", exc, f"applying the {self._policy} policy")
            return None
        if self._failing:
            self._recovered()
        return verdict

    def charge(self, user: str, usage: Usage) -> None:
        """Queue a finished request's tokens for ``user``'s TPM window; never waits."""
        tokens = usage.prompt_tokens + usage.completion_tokens
        if tokens <= 0:
            return
        (self._estimated_tokens if usage.estimated else self._reported_tokens).inc(tokens)
        pending = self._pending
        pending[user] = pending.get(user, 0) + tokens
        self._wake.set()

    # -- background charging -------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="ratelimit-charges")

    async def stop(self) -> None:
        """Send what is still queued (bounded like any store call), then close the store."""
        await cancel_and_wait([self._task])
        self._task = None
        await self.flush()
        await self._store.close()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self.flush()

    async def flush(self) -> None:
        """Charge everything queued, in one store call. A failed batch is dropped, counted and
        logged, and nothing else: re-applying it later would put old tokens in a newer part of
        the window, and checks keep going to Redis (they learn of trouble from their own calls,
        so one slow charge batch cannot turn every user away)."""
        charges = self._pending
        if not charges:
            return
        self._pending = {}
        if not self._remote:
            await self._store.charge(charges)
            return
        try:
            await self._store.charge(charges)
        except STORE_FAILURES as exc:
            dropped = f"{sum(charges.values())} tokens of {len(charges)} users dropped"
            self._warn("charge", exc, dropped)

    # -- failures ------------------------------------------------------------------------------

    def _warn(self, operation: str, exc: BaseException, consequence: str) -> None:
        """Count one failed call; warn unless this operation warned less than WARN_EVERY ago."""
        self._store_errors.labels(operation).inc()
        warnings = self._warnings.setdefault(operation, _Warnings())
        now = time.monotonic()
        if now - warnings.warned_at < WARN_EVERY:
            warnings.suppressed += 1
            return
        log.warning(
            "redis call failed; %s",
            consequence,
            extra={
                "operation": operation,
                "error": str(exc) or type(exc).__name__,
                "suppressed_since_last_warning": warnings.suppressed,
            },
        )
        warnings.warned_at = now
        warnings.suppressed = 0

    def _recovered(self) -> None:
        self._failing = False
        log.info("redis reachable again; rate limits enforced", extra={"operation": "admit"})
