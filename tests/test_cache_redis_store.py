"""The Redis cache and its cross-replica lock against a real redis-server: every key they write carries its TTL,
a write that is not to be kept costs nothing, and with Redis down or backed off each call answers as documented."""

from __future__ import annotations


from redis.asyncio import Redis

from gateway.cache.redis_store import RedisCache, RedisLock
from tests.test_cache_lock_edges import wait_until

KEY = "gw:c:v2:store"
LOCK = RedisLock.key_for(KEY)


async def test_a_write_with_no_ttl_stores_nothing_and_counts_no_error(redis_server) -> None:
    """A write of ttl_s 0 is skipped before Redis: nothing stored, and no refused SET counted as a cache error."""
    cache = RedisCache.from_url(redis_server.url, timeout_s=0.5)
    try:
        await cache.set(KEY, b"answer", ttl_s=0)
        assert await cache.client.exists(KEY) == 0
        assert (cache.errors, cache.healthy) == (0, True)
    finally:
        await cache.close()


async def test_a_lock_taken_with_acquire_expires_after_its_ttl(redis_server) -> None:
    """`acquire` sets the lock with its TTL in milliseconds, so a holder that dies holds other replicas back for
    that long only."""
    cache = RedisCache.from_url(redis_server.url, timeout_s=0.5)
    try:
        assert await RedisLock(cache).acquire(LOCK, ttl_ms=5000) is not None
        assert 0 < await cache.client.pttl(LOCK) <= 5000
    finally:
        await cache.close()


async def test_a_lock_taken_with_read_or_acquire_expires_after_its_ttl(redis_server) -> None:
    """The lock `read_or_acquire` takes when no entry is stored carries its TTL in milliseconds, as `acquire`'s
    does: never a lock held until someone deletes it."""
    cache = RedisCache.from_url(redis_server.url, timeout_s=0.5)
    try:
        entry, token = await RedisLock(cache).read_or_acquire(KEY, 5000)
        assert entry is None and token is not None
        assert 0 < await cache.client.pttl(LOCK) <= 5000
    finally:
        await cache.close()


async def test_an_entry_written_with_its_lock_release_expires_after_its_ttl(redis_server) -> None:
    """`write_and_release` stores the leader's answer for `ttl_s` seconds (not milliseconds, not forever) and
    gives the lock back."""
    cache = RedisCache.from_url(redis_server.url, timeout_s=0.5)
    try:
        lock = RedisLock(cache)
        _, token = await lock.read_or_acquire(KEY, 5000)
        assert await lock.write_and_release(KEY, b"answer", 60, token) is True
        assert await cache.get(KEY) == b"answer"
        assert 59_000 < await cache.client.pttl(KEY) <= 60_000
        assert await cache.client.exists(LOCK) == 0
    finally:
        await cache.close()


async def test_with_redis_down_the_lock_is_granted_and_the_write_is_reported_not_done(redis_server) -> None:
    """Redis gone: `read_or_acquire` finds no entry and grants the lock, `extend` lets the holder keep leading,
    and `write_and_release` says False (the lock is still to release); each call is counted as a cache error."""
    cache = RedisCache.from_url(redis_server.url, timeout_s=0.2, backoff_s=0.0)
    try:
        lock = RedisLock(cache)
        redis_server.stop()
        entry, token = await lock.read_or_acquire(KEY, 5000)
        assert entry is None and token is not None
        assert await lock.extend(LOCK, token, 5000) is True
        assert await lock.write_and_release(KEY, b"answer", 60, token) is False
        assert cache.errors == 3
    finally:
        await cache.close()


async def test_a_leaders_write_and_release_is_sent_even_during_a_back_off(redis_server) -> None:
    """A leader's answer and lock release, sent after its response while lookups back off from a stalled Redis,
    still reach Redis once it answers: the answer is stored and the lock given back, not left for its TTL."""
    cache = RedisCache.from_url(redis_server.url, timeout_s=0.25, backoff_s=60.0)
    pauser = Redis.from_url(redis_server.url)
    try:
        lock = RedisLock(cache)
        _, token = await lock.read_or_acquire(KEY, 10_000)
        assert token is not None
        await pauser.execute_command("CLIENT", "PAUSE", 1000, "ALL")      # well past the 0.25 s timeout
        assert await cache.get("gw:c:v2:other") is None           # times out: the back-off starts
        assert not cache.healthy
        await pauser.ping()                                         # answered once the pause is over
        assert await lock.write_and_release(KEY, b"answer", 60, token) is True
        assert await pauser.get(KEY) == b"answer"
        assert await pauser.exists(LOCK) == 0
    finally:
        await pauser.aclose()
        await cache.close()


async def test_closing_the_cache_closes_its_connections(redis_server) -> None:
    """`close` disconnects the cache's pooled connections: Redis no longer counts them as clients."""
    cache = RedisCache.from_url(redis_server.url, timeout_s=0.5)
    probe = Redis.from_url(redis_server.url)
    try:
        await cache.set(KEY, b"answer", ttl_s=60)

        async def clients() -> int:
            return (await probe.info("clients"))["connected_clients"]

        async def only_the_probe_left() -> bool:
            return await clients() == 1

        assert await clients() == 2                                 # the cache's connection and the probe
        await cache.close()
        await wait_until(only_the_probe_left, 5.0)
    finally:
        await probe.aclose()
        await cache.close()


async def test_a_cache_from_a_url_bounds_its_connection_pool() -> None:
    """`from_url`'s max_connections bounds the client's pool (building it opens no connection)."""
    cache = RedisCache.from_url("redis://127.0.0.1:6399/0", timeout_s=0.5, max_connections=3)
    try:
        assert cache.client.connection_pool.max_connections == 3
    finally:
        await cache.close()
