"""Both users stores behind one interface, the Redis Lua script against a real redis-server, and
bursts of checks on the Redis store: pipelined, exact, and bounded when Redis is frozen."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from extproc.users.script_batcher import ScriptBatcher
from extproc.users.sliding_window import BUCKET_MS, BUCKETS, WINDOW_MS
from extproc.users.store import (
    Decision,
    MemoryUserStore,
    RedisUserStore,
    User,
    UserExists,
    UserNotFound,
    UserStore,
    Verdict,
)
from tools.redis_server import RedisServer


@pytest.fixture(scope="module")
def redis_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
async def raw(redis_module: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_module.url)
    await client.flushdb()
    yield client
    await client.aclose()


@pytest.fixture(params=["memory", "redis"])
async def store(
    request: pytest.FixtureRequest, redis_module: RedisServer
) -> AsyncIterator[UserStore]:
    if request.param == "memory":
        yield MemoryUserStore()
        return
    client = Redis.from_url(redis_module.url)
    await client.flushdb()
    await client.aclose()
    redis_store = RedisUserStore(redis_module.url, timeout=2.0, max_wait=5.0)
    yield redis_store
    await redis_store.close()


async def test_create_read_update_delete(store: UserStore) -> None:
    await store.create(User("lgy", rpm=100, tpm=1000))
    with pytest.raises(UserExists):
        await store.create(User("lgy", rpm=1))
    assert await store.read("lgy") == User("lgy", 100, 1000)
    assert await store.update("lgy", rpm=3, tpm=None) == User("lgy", 3, 1000)
    assert await store.update("lgy", rpm=None, tpm=7) == User("lgy", 3, 7)
    assert await store.read("lgy") == User("lgy", 3, 7)
    await store.delete("lgy")
    for call in (store.read("lgy"), store.update("lgy", 1, 1), store.delete("lgy")):
        with pytest.raises(UserNotFound):
            await call


async def test_rpm_counts_admitted_requests_only(store: UserStore) -> None:
    await store.create(User("lgy", rpm=3))
    decisions = [(await store.admit("lgy", None)).decision for _ in range(3)]
    assert decisions == [Decision.ADMITTED] * 3
    for _ in range(5):
        verdict = await store.admit("lgy", None)
        assert (verdict.decision, verdict.limit) == (Decision.OVER_RPM, 3)
        assert 0 < verdict.retry_after_ms <= WINDOW_MS + BUCKET_MS
    await store.update("lgy", rpm=4, tpm=None)
    assert (await store.admit("lgy", None)).decision is Decision.ADMITTED
    assert (await store.admit("lgy", None)).decision is Decision.OVER_RPM


async def test_tpm_after_charges(store: UserStore) -> None:
    await store.create(User("t", rpm=0, tpm=10))
    assert await store.admit("t", None) == Verdict(Decision.ADMITTED, tpm=10)
    await store.charge({"t": 6})
    assert (await store.admit("t", None)).decision is Decision.ADMITTED
    await store.charge({"t": 6})
    verdict = await store.admit("t", None)
    assert (verdict.decision, verdict.limit, verdict.tpm) == (Decision.OVER_TPM, 10, 10)


async def test_unknown_users_and_unlimited_ones(store: UserStore) -> None:
    assert (await store.admit("ghost", None)).decision is Decision.UNKNOWN
    assert (await store.admit("ghost", (1, 50))) == Verdict(Decision.ADMITTED, tpm=50)
    assert (await store.admit("ghost", (1, 50))).decision is Decision.OVER_RPM
    await store.create(User("free"))
    for _ in range(20):
        assert await store.admit("free", None) == Verdict(Decision.ADMITTED)


# -- Redis only ----------------------------------------------------------------------------------


async def redis_bucket(raw: Redis) -> tuple[int, int]:
    seconds, micros = await raw.time()
    now = seconds * 1000 + micros // 1000
    return now, now // BUCKET_MS


async def test_lua_retry_after_comes_from_the_window(redis_module: RedisServer, raw: Redis) -> None:
    store = RedisUserStore(redis_module.url, timeout=2.0, max_wait=5.0)
    await store.create(User("w", rpm=3))
    _, current = await redis_bucket(raw)
    # Three requests in buckets that are 59, 30 and 0 buckets old: the oldest leaves first.
    window = {str(current - 59): 1, str(current - 30): 1, str(current): 1}
    await raw.hset("extproc:{w}:rpm", mapping=window)
    verdict = await store.admit("w", None)
    assert verdict.decision is Decision.OVER_RPM
    assert 0 < verdict.retry_after_ms <= 2 * BUCKET_MS
    await store.close()


async def test_lua_deletes_expired_buckets_and_sets_a_ttl(
    redis_module: RedisServer, raw: Redis
) -> None:
    store = RedisUserStore(redis_module.url, timeout=2.0, max_wait=5.0)
    await store.create(User("e", rpm=5, tpm=100))
    _, current = await redis_bucket(raw)
    await raw.hset("extproc:{e}:rpm", mapping={str(current - BUCKETS - 5): 4})
    assert (await store.admit("e", None)).decision is Decision.ADMITTED
    fields = await raw.hkeys("extproc:{e}:rpm")
    assert str(current - BUCKETS - 5).encode() not in fields
    assert len(fields) == 1
    await store.charge({"e": 3})
    for key in ("extproc:{e}:rpm", "extproc:{e}:tpm"):
        assert 0 < await raw.pttl(key) <= WINDOW_MS + BUCKET_MS
    assert await raw.pttl("extproc:{e}:user") == -1  # the row itself never expires
    await store.delete("e")
    assert await raw.exists("extproc:{e}:user", "extproc:{e}:rpm", "extproc:{e}:tpm") == 0
    await store.close()


async def test_two_replicas_enforce_one_limit_atomically(
    redis_module: RedisServer, raw: Redis
) -> None:
    replicas = [RedisUserStore(redis_module.url, timeout=2.0, max_wait=5.0) for _ in range(2)]
    await replicas[0].create(User("shared", rpm=10))
    verdicts = await asyncio.gather(*(replicas[i % 2].admit("shared", None) for i in range(40)))
    admitted = sum(1 for v in verdicts if v.decision is Decision.ADMITTED)
    assert admitted == 10
    assert await raw.hget("extproc:{shared}:user", "rpm") == b"10"
    for replica in replicas:
        await replica.close()


async def test_script_is_reloaded_after_a_script_flush(
    redis_module: RedisServer, raw: Redis
) -> None:
    store = RedisUserStore(redis_module.url, timeout=2.0, max_wait=5.0)
    await store.create(User("f", rpm=2))
    await raw.script_flush()
    assert (await store.admit("f", None)).decision is Decision.ADMITTED
    await raw.script_flush()
    await store.charge({"f": 1})
    assert await raw.exists("extproc:{f}:tpm") == 1
    await store.close()


async def test_a_redis_restart_costs_no_failed_call(redis_server: RedisServer) -> None:
    store = RedisUserStore(redis_server.url, timeout=2.0, max_wait=5.0)
    await store.create(User("p", rpm=5))
    redis_server.restart()  # the pooled connection is now stale; the data persisted (AOF)
    assert await store.read("p") == User("p", 5, 0)
    await store.close()


# -- bursts --------------------------------------------------------------------------------------

TIMEOUT, MAX_WAIT = 0.1, 1.0
"""The defaults of redis_timeout and redis_max_wait."""


async def burst(replicas: list[RedisUserStore], name: str, n: int) -> list[Verdict | BaseException]:
    checks = (replicas[i % len(replicas)].admit(name, None) for i in range(n))
    return await asyncio.wait_for(asyncio.gather(*checks, return_exceptions=True), 30)


def stall(seconds: float) -> None:
    """Keep the event loop busy, as a burst of requests does."""
    time.sleep(seconds)


async def test_a_burst_of_1000_checks_admits_exactly_the_limit(
    redis_module: RedisServer, raw: Redis
) -> None:
    replicas = [RedisUserStore(redis_module.url, TIMEOUT, MAX_WAIT) for _ in range(2)]
    await replicas[0].create(User("burst", rpm=10))
    outcomes = await burst(replicas, "burst", 1000)
    assert [o for o in outcomes if isinstance(o, BaseException)] == []
    decisions = [o.decision for o in outcomes if isinstance(o, Verdict)]
    assert decisions.count(Decision.ADMITTED) == 10
    assert decisions.count(Decision.OVER_RPM) == 990
    calls = (await raw.info("commandstats"))["cmdstat_evalsha"]["calls"]
    assert calls >= 1001  # every check reached Redis, as its own script call
    for replica in replicas:
        await replica.close()


async def test_a_stalled_event_loop_is_not_a_redis_failure(
    redis_module: RedisServer, raw: Redis
) -> None:
    """Redis answers at once, but the loop is busy for three timeouts before it can read the
    answers: with wall-clock timeouts every check in flight failed."""
    replicas = [RedisUserStore(redis_module.url, TIMEOUT, MAX_WAIT) for _ in range(2)]
    await replicas[0].create(User("stalled", rpm=10))
    await burst(replicas, "warm-up", 8)  # connections open
    checks = asyncio.ensure_future(burst(replicas, "stalled", 400))
    asyncio.get_running_loop().call_later(0.002, stall, 3 * TIMEOUT)
    outcomes = await checks
    assert [o for o in outcomes if isinstance(o, BaseException)] == []
    admitted = [o for o in outcomes if isinstance(o, Verdict) and o.decision is Decision.ADMITTED]
    assert len(admitted) == 10
    for replica in replicas:
        await replica.close()


async def test_a_frozen_redis_fails_a_burst_in_bounded_time(redis_server: RedisServer) -> None:
    store = RedisUserStore(redis_server.url, TIMEOUT, MAX_WAIT)
    # Checks sent before Redis froze still run when it resumes: the limit leaves room for them.
    await store.create(User("frozen", rpm=10_000))
    assert (await store.admit("frozen", None)).decision is Decision.ADMITTED
    redis_server.pause()
    try:
        outcomes = await burst([store], "frozen", 600)  # wait_for: none may hang
    finally:
        redis_server.resume()
    assert all(isinstance(o, TimeoutError) for o in outcomes)
    assert (await store.admit("frozen", None)).decision is Decision.ADMITTED  # back, no restart
    await store.close()


async def test_redis_down_fails_checks_at_once_and_recovers(redis_server: RedisServer) -> None:
    store = RedisUserStore(redis_server.url, TIMEOUT, MAX_WAIT)
    await store.create(User("down", rpm=5))
    redis_server.stop()
    try:
        outcomes = await burst([store], "down", 50)
        assert all(isinstance(o, RedisConnectionError) for o in outcomes)
    finally:
        redis_server.start()
    assert (await store.admit("down", None)).decision is Decision.ADMITTED
    await store.close()


async def test_closing_fails_the_calls_still_waiting(redis_server: RedisServer) -> None:
    batcher = ScriptBatcher(
        redis_server.url, "return 1", lanes=1, max_batch=2, timeout=60, max_wait=60
    )
    assert await batcher.call([], []) == 1
    redis_server.pause()
    try:
        calls = asyncio.gather(*(batcher.call([], []) for _ in range(5)), return_exceptions=True)
        await asyncio.sleep(0)
        await batcher.close()
        outcomes = await asyncio.wait_for(calls, 10)
    finally:
        redis_server.resume()
    assert all(isinstance(o, RedisConnectionError) for o in outcomes)


async def test_a_script_error_answers_only_its_own_call(redis_server: RedisServer) -> None:
    script = "if ARGV[1] == 'bad' then return redis.error_reply('refused') end return ARGV[1]"
    batcher = ScriptBatcher(redis_server.url, script, lanes=1, max_batch=8, timeout=1, max_wait=5)
    outcomes = await asyncio.gather(
        *(batcher.call([], [arg]) for arg in ("a", "bad", "b")), return_exceptions=True
    )
    assert outcomes[0] == b"a" and outcomes[2] == b"b"
    assert isinstance(outcomes[1], ResponseError)
    await batcher.close()
