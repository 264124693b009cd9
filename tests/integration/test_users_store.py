"""Both users stores behind one interface, and the Redis Lua script against a real redis-server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest
from redis.asyncio import Redis

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
    redis_store = RedisUserStore(redis_module.url, timeout=2.0)
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
    store = RedisUserStore(redis_module.url, timeout=2.0)
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
    store = RedisUserStore(redis_module.url, timeout=2.0)
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
    replicas = [RedisUserStore(redis_module.url, timeout=2.0) for _ in range(2)]
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
    store = RedisUserStore(redis_module.url, timeout=2.0)
    await store.create(User("f", rpm=2))
    await raw.script_flush()
    assert (await store.admit("f", None)).decision is Decision.ADMITTED
    await raw.script_flush()
    await store.charge({"f": 1})
    assert await raw.exists("extproc:{f}:tpm") == 1
    await store.close()


async def test_a_redis_restart_costs_no_failed_call(redis_server: RedisServer) -> None:
    store = RedisUserStore(redis_server.url, timeout=2.0)
    await store.create(User("p", rpm=5))
    redis_server.restart()  # the pooled connection is now stale; the data persisted (AOF)
    assert await store.read("p") == User("p", 5, 0)
    await store.close()
