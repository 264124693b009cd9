"""The sliding window at its boundaries, the in-memory store's checks, user names, the limiter's
policy when its store fails (a stand-in store; the real Redis is in the integration tests), and
the Redis timeout that a busy event loop does not trip."""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections.abc import Callable, Coroutine, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from extproc import config
from extproc.errors import GatewayError
from extproc.telemetry import Telemetry
from extproc.users.ratelimit import RateLimiter
from extproc.users.sliding_window import (
    BUCKET_MS,
    WINDOW_MS,
    SlidingWindow,
    retry_after_seconds,
)
from extproc.users.store import (
    Decision,
    MemoryUserStore,
    User,
    Verdict,
    name_problem,
    printable,
)
from extproc.users.wire_timeout import WireTimeout
from strategies.context import Usage


class Clock:
    def __init__(self, ms: int = 0) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


# -- the window ----------------------------------------------------------------------------------


def test_an_event_counts_between_60_and_61_seconds() -> None:
    window = SlidingWindow()
    window.add(10_500, 1)  # bucket 10: counted until bucket 71 starts
    assert window.total(10_500 + WINDOW_MS) == 1
    assert window.total(70_999) == 1
    assert window.total(71_000) == 0


def test_retry_after_waits_for_the_oldest_buckets_that_must_leave() -> None:
    window = SlidingWindow()
    window.add(500, 2)
    window.add(30_200, 1)
    window.add(59_900, 1)
    now = 60_000
    assert window.total(now) == 4
    assert window.retry_after_ms(now, excess=2) == 61_000 - now  # bucket 0 holds 2
    assert window.retry_after_ms(now, excess=3) == 91_000 - now  # bucket 30 must leave too
    assert retry_after_seconds(1) == 1
    assert retry_after_seconds(31_000) == 31
    assert retry_after_seconds(31_001) == 32


async def test_no_60_second_interval_admits_more_than_the_limit() -> None:
    """Bursts just before and just after each minute boundary (where fixed windows let 2x
    through) plus random traffic; every 60-second interval is then checked."""
    limit = 10
    clock = Clock()
    store = MemoryUserStore(clock)
    await store.create(User("u", rpm=limit))
    arrivals = []
    for minute in range(4):
        boundary = minute * WINDOW_MS
        arrivals += [boundary - 100 + i for i in range(limit)]
        arrivals += [boundary + 100 + i for i in range(limit)]
    rng = random.Random(7)
    arrivals += [rng.randrange(0, 4 * WINDOW_MS) for _ in range(400)]
    admitted = []
    for at in sorted(a for a in arrivals if a >= 0):
        clock.ms = at
        if (await store.admit("u", None)).decision is Decision.ADMITTED:
            admitted.append(at)
    for end in admitted:
        assert sum(1 for t in admitted if end - WINDOW_MS < t <= end) <= limit
    # Not over-strict either: every minute after the first still admits a full limit's worth.
    for minute in range(1, 4):
        start = minute * WINDOW_MS + BUCKET_MS
        assert sum(1 for t in admitted if start <= t < start + WINDOW_MS) >= limit


async def test_a_burst_across_a_minute_boundary_is_not_doubled() -> None:
    clock = Clock(59_900)
    store = MemoryUserStore(clock)
    await store.create(User("u", rpm=3))
    assert [(await store.admit("u", None)).decision for _ in range(3)] == [Decision.ADMITTED] * 3
    clock.ms = 60_100
    verdict = await store.admit("u", None)
    assert verdict.decision is Decision.OVER_RPM
    assert verdict.limit == 3
    assert verdict.retry_after_ms == 120_000 - 60_100  # bucket 59 leaves at 120 s
    clock.ms = 120_000
    assert (await store.admit("u", None)).decision is Decision.ADMITTED


async def test_rejected_requests_are_not_counted() -> None:
    clock = Clock(1_000)
    store = MemoryUserStore(clock)
    await store.create(User("u", rpm=2))
    for _ in range(2):
        assert (await store.admit("u", None)).decision is Decision.ADMITTED
    clock.ms = 30_000
    for _ in range(50):
        assert (await store.admit("u", None)).decision is Decision.OVER_RPM
    clock.ms = 62_000  # the two admitted ones have left; the 50 rejected never counted
    for _ in range(2):
        assert (await store.admit("u", None)).decision is Decision.ADMITTED
    assert (await store.admit("u", None)).decision is Decision.OVER_RPM


async def test_tpm_is_checked_against_charged_tokens() -> None:
    clock = Clock(5_000)
    store = MemoryUserStore(clock)
    await store.create(User("u", tpm=100))
    verdict = await store.admit("u", None)
    assert verdict == Verdict(Decision.ADMITTED, tpm=100)
    await store.charge({"u": 60})
    clock.ms = 20_000
    assert (await store.admit("u", None)).decision is Decision.ADMITTED
    await store.charge({"u": 50})
    verdict = await store.admit("u", None)
    assert (verdict.decision, verdict.limit) == (Decision.OVER_TPM, 100)
    assert verdict.retry_after_ms == 66_000 - 20_000  # the 60 tokens of bucket 5 must leave


async def test_unknown_users_and_default_limits() -> None:
    store = MemoryUserStore(Clock())
    assert (await store.admit("nobody", None)).decision is Decision.UNKNOWN
    assert (await store.admit("nobody", (1, 0))).decision is Decision.ADMITTED
    assert (await store.admit("nobody", (1, 0))).decision is Decision.OVER_RPM
    await store.create(User("free"))
    assert await store.admit("free", None) == Verdict(Decision.ADMITTED)


async def test_update_applies_at_once_and_delete_forgets_usage() -> None:
    clock = Clock()
    store = MemoryUserStore(clock)
    await store.create(User("u", rpm=1, tpm=5))
    await store.admit("u", None)
    assert (await store.admit("u", None)).decision is Decision.OVER_RPM
    assert await store.update("u", rpm=2, tpm=None) == User("u", 2, 5)
    assert (await store.admit("u", None)).decision is Decision.ADMITTED
    await store.delete("u")
    await store.create(User("u", rpm=1))
    assert (await store.admit("u", None)).decision is Decision.ADMITTED


async def test_idle_windows_are_dropped() -> None:
    clock = Clock()
    store = MemoryUserStore(clock)
    for name in ("a", "b"):
        await store.create(User(name, rpm=5))
        await store.admit(name, None)
    clock.ms = WINDOW_MS + 2 * BUCKET_MS
    await store.admit("a", None)
    assert list(store._windows) == ["a"]


# -- the limiter's policy ------------------------------------------------------------------------


class FlakyStore(MemoryUserStore):
    """A remote store stand-in whose checks and charges fail on demand, as a Redis store's do:
    ``down`` (a connection error) or ``late`` (its own bound ran out)."""

    remote = True

    def __init__(self) -> None:
        super().__init__(Clock())
        self.mode = "ok"
        self.charge_mode = "ok"
        self.admits = 0
        self.charges: list[dict[str, int]] = []

    async def admit(self, name: str, defaults: tuple[int, int] | None) -> Verdict:
        self.admits += 1
        _trouble(self.mode)
        return await super().admit(name, defaults)

    async def charge(self, charges: Mapping[str, int]) -> None:
        _trouble(self.charge_mode)
        self.charges.append(dict(charges))
        await super().charge(charges)


def _trouble(mode: str) -> None:
    if mode == "down":
        raise RedisConnectionError("Error 111 connecting to 127.0.0.1:1")
    if mode == "late":
        raise TimeoutError("no answer from Redis within 0.1s")


def limiter_for(store: FlakyStore, **settings: Any) -> tuple[RateLimiter, Telemetry]:
    telemetry = Telemetry()
    values = {"redis_timeout": "50ms", **settings}
    return RateLimiter(config.load(values, {}).users, store, telemetry, "user"), telemetry


def sample(telemetry: Telemetry, name: str, **labels: str) -> float:
    return telemetry.registry.get_sample_value(name, labels) or 0.0


async def test_rejections_carry_the_exact_message_and_retry_after() -> None:
    store = FlakyStore()
    await store.create(User("lgy", rpm=1, tpm=10))
    limiter, telemetry = limiter_for(store)
    assert await limiter.admit("lgy") is True  # a TPM limit: the tokens will be charged
    with pytest.raises(GatewayError) as rpm:
        await limiter.admit("lgy")
    assert (rpm.value.status, rpm.value.message) == (429, "user: lgy has exceeded RPM: 1")
    assert rpm.value.code == 429
    assert rpm.value.retry_after == 61
    await store.update("lgy", rpm=0, tpm=None)
    limiter.charge("lgy", Usage(prompt_tokens=8, completion_tokens=4))
    await limiter.flush()
    with pytest.raises(GatewayError) as tpm:
        await limiter.admit("lgy")
    assert tpm.value.message == "user: lgy has exceeded TPM: 10"
    with pytest.raises(GatewayError) as unknown:
        await limiter.admit("ghost")
    assert (unknown.value.status, unknown.value.code) == (401, "unknown_user")
    decisions = "extproc_ratelimit_decisions_total"
    assert sample(telemetry, decisions, decision="rpm_exceeded") == 1
    assert sample(telemetry, decisions, decision="tpm_exceeded") == 1
    assert sample(telemetry, decisions, decision="unknown_user") == 1


async def test_fail_open_serves_counts_and_then_skips_redis() -> None:
    store = FlakyStore()
    await store.create(User("u", rpm=1))
    limiter, telemetry = limiter_for(store, redis_retry_interval="60s")
    store.mode = "down"
    assert await limiter.admit("u") is False
    assert await limiter.admit("u") is False
    assert store.admits == 1  # the second check did not wait on a store known to be down
    assert sample(telemetry, "extproc_redis_errors_total", operation="admit") == 1
    decisions = "extproc_ratelimit_decisions_total"
    assert sample(telemetry, decisions, decision="failed_open") == 2


async def test_fail_closed_answers_503_with_retry_after() -> None:
    store = FlakyStore()
    await store.create(User("u", rpm=1))
    limiter, _ = limiter_for(store, redis_failure_policy="fail-closed", redis_retry_interval="2.5s")
    store.mode = "down"
    with pytest.raises(GatewayError) as failed:
        await limiter.admit("u")
    assert (failed.value.status, failed.value.code) == (503, "rate_limits_unavailable")
    assert failed.value.retry_after == 3


@pytest.mark.parametrize("policy", ["fail-open", "fail-closed"])
async def test_a_store_timeout_applies_the_policy(policy: str) -> None:
    store = FlakyStore()
    await store.create(User("u", rpm=5))
    limiter, telemetry = limiter_for(store, redis_failure_policy=policy)
    store.mode = "late"
    if policy == "fail-open":
        assert await limiter.admit("u") is False
    else:
        with pytest.raises(GatewayError):
            await limiter.admit("u")
    assert sample(telemetry, "extproc_redis_errors_total", operation="admit") == 1


async def test_recovers_when_the_store_comes_back() -> None:
    store = FlakyStore()
    await store.create(User("u", rpm=1))
    limiter, _ = limiter_for(store, redis_retry_interval="0s")
    store.mode = "down"
    assert await limiter.admit("u") is False
    store.mode = "ok"
    assert await limiter.admit("u") is False  # admitted: no TPM limit, nothing to charge
    with pytest.raises(GatewayError):
        await limiter.admit("u")


async def test_charges_are_batched_per_user_and_estimates_counted_apart() -> None:
    store = FlakyStore()
    limiter, telemetry = limiter_for(store)
    limiter.charge("a", Usage(prompt_tokens=3, completion_tokens=4))
    limiter.charge("a", Usage(prompt_tokens=1, completion_tokens=1, estimated=True))
    limiter.charge("b", Usage(prompt_tokens=5, completion_tokens=0))
    limiter.charge("c", Usage())
    await limiter.flush()
    assert store.charges == [{"a": 9, "b": 5}]
    tokens = "extproc_ratelimit_charged_tokens_total"
    assert sample(telemetry, tokens, source="reported") == 12
    assert sample(telemetry, tokens, source="estimated") == 2


async def test_a_failed_charge_is_counted_and_dropped() -> None:
    store = FlakyStore()
    limiter, telemetry = limiter_for(store)
    store.charge_mode = "down"
    limiter.charge("a", Usage(prompt_tokens=3))
    await limiter.flush()
    store.charge_mode = "ok"
    await limiter.flush()
    assert store.charges == []
    assert sample(telemetry, "extproc_redis_errors_total", operation="charge") == 1


@pytest.mark.parametrize("failure", ["down", "late"])
async def test_a_failed_charge_leaves_checks_alone(
    failure: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Under fail-closed, a charge batch that timed out used to make every check a 503 for
    ``redis_retry_interval``; checks must go on reaching the store and enforcing limits."""
    store = FlakyStore()
    await store.create(User("u", rpm=2))
    limiter, telemetry = limiter_for(
        store, redis_failure_policy="fail-closed", redis_retry_interval="60s"
    )
    store.charge_mode = failure
    limiter.charge("u", Usage(prompt_tokens=40, completion_tokens=2))
    await limiter.flush()
    assert await limiter.admit("u") is False
    assert await limiter.admit("u") is False
    with pytest.raises(GatewayError) as over:
        await limiter.admit("u")
    assert over.value.status == 429
    assert store.admits == 3
    assert sample(telemetry, "extproc_redis_errors_total", operation="charge") == 1
    assert sample(telemetry, "extproc_redis_errors_total", operation="admit") == 0
    decisions = "extproc_ratelimit_decisions_total"
    assert sample(telemetry, decisions, decision="failed_closed") == 0
    (warning,) = [r for r in caplog.records if r.levelname == "WARNING"]
    assert "42 tokens of 1 users dropped" in warning.getMessage()
    assert warning.__dict__["operation"] == "charge"


async def test_the_background_task_sends_charges_and_flushes_on_stop() -> None:
    store = FlakyStore()
    limiter, _ = limiter_for(store)
    limiter.start()
    limiter.charge("a", Usage(prompt_tokens=2))
    for _ in range(100):
        if store.charges:
            break
        await asyncio.sleep(0.01)
    assert store.charges == [{"a": 2}]
    limiter.charge("a", Usage(prompt_tokens=1))
    await limiter.stop()
    assert store.charges[-1] == {"a": 1}


@pytest.mark.parametrize(
    ("flags", "environ", "key"),
    [
        ({"redis_url": "http://redis:6379"}, {}, "--redis-url"),
        ({"redis_timeout": "0"}, {}, "--redis-timeout"),
        ({"redis_timeout": "2s"}, {}, "--redis-timeout"),  # over redis_max_wait
        ({"default_tpm": "-1"}, {}, "--default-tpm"),
        ({"users_admin_token": "two words"}, {}, "--users-admin-token"),
        ({"users_port": "70000"}, {}, "--users-port"),
        ({}, {"EXTPROC_REDIS_FAILURE_POLICY": "fail-sometimes"}, "EXTPROC_REDIS_FAILURE_POLICY"),
    ],
)
def test_bad_settings_name_their_key_and_hide_values(
    flags: dict[str, str], environ: dict[str, str], key: str
) -> None:
    with pytest.raises(config.ConfigError) as failure:
        config.load(flags, environ)
    assert failure.value.key == key
    assert "two words" not in str(failure.value)
    assert "redis:6379" not in str(failure.value)


# -- user names ----------------------------------------------------------------------------------

BAD_CHARACTERS = ["\x00", "\x1b", "\x7f", "\x85", "\x9b", "\u200b", "\u2028", "\u2029", "\u202e"]
BAD_CHARACTERS += ["\ufeff", "\ud800", "\udfff"]


@pytest.mark.parametrize("bad", BAD_CHARACTERS)
def test_names_refuse_control_format_and_separator_characters(bad: str) -> None:
    problem = name_problem(f"team{bad}a")
    assert problem is not None
    assert f"U+{ord(bad):04X}" in problem
    assert printable(f"team{bad}a") == f"team\\u{ord(bad):04x}a"


@pytest.mark.parametrize("good", ["lgy", "équipe-7", "ユーザー", "a b", "a\u00a0b", "x" * 256])
def test_names_that_are_fine(good: str) -> None:
    assert name_problem(good) is None
    assert printable(good) == good


@pytest.mark.parametrize("bad", ["\x00", "\x85", "\u2028", "\u202e", "\ud800"])
async def test_the_limiter_refuses_a_user_header_no_user_can_have(bad: str) -> None:
    store = FlakyStore()
    limiter, telemetry = limiter_for(store)
    user = "evil" + bad + "x" * 200
    with pytest.raises(GatewayError) as refused:
        await limiter.admit(user)
    error = refused.value
    assert (error.status, error.code, error.param) == (400, "invalid_user", "user")
    assert f"U+{ord(bad):04X}" in error.message
    assert bad not in error.message
    assert "evil\\u" in error.message and len(error.message) < 200
    assert store.admits == 0
    assert sample(telemetry, "extproc_ratelimit_check_seconds_count") == 0


# -- the Redis timeout ---------------------------------------------------------------------------


def stall(seconds: float) -> None:
    """Keep the event loop busy, as a burst of requests does."""
    time.sleep(seconds)


async def answered_while_stalled(bound: AbstractAsyncContextManager[Any]) -> bytes:
    """Redis (one end of a socket pair) answers at once, while the loop is stalled past the
    deadline: the answer waits in the socket until the stall ends."""
    ours, theirs = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=ours)

    def answer_then_stall() -> None:
        theirs.sendall(b"+OK\r\n")
        stall(0.3)

    try:
        asyncio.get_running_loop().call_soon(answer_then_stall)
        async with bound:
            return await reader.readline()
    finally:
        writer.close()
        theirs.close()


async def never_answered(bound: AbstractAsyncContextManager[Any]) -> None:
    async with bound:
        await asyncio.Event().wait()


def on_each_loop(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run ``test`` on asyncio's loop and on uvloop's: they order timers and I/O differently."""
    import uvloop

    for factory in (asyncio.new_event_loop, uvloop.new_event_loop):
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(test())


def test_a_stalled_loop_is_not_a_redis_timeout() -> None:
    async def test() -> None:
        with pytest.raises(TimeoutError):  # the defect: wall time blames Redis
            await answered_while_stalled(asyncio.timeout(0.1))
        assert await answered_while_stalled(WireTimeout(0.1, 5.0)) == b"+OK\r\n"

    on_each_loop(test)


def test_an_answer_that_never_comes_times_out() -> None:
    async def test() -> None:
        with pytest.raises(TimeoutError):
            await never_answered(WireTimeout(0.05, 5.0))

    on_each_loop(test)


def test_a_loop_that_stays_busy_still_ends_the_wait() -> None:
    async def test() -> None:
        loop = asyncio.get_running_loop()
        busy = True

        def hog() -> None:
            stall(0.05)
            if busy:
                loop.call_soon(hog)

        loop.call_soon(hog)
        try:
            with pytest.raises(TimeoutError):
                await never_answered(WireTimeout(0.02, 0.5))
        finally:
            busy = False

    on_each_loop(test)


async def test_a_cancelled_caller_is_not_a_timeout() -> None:
    task = asyncio.create_task(never_answered(WireTimeout(10.0, 10.0)))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
