"""The shared cache in Redis, which never makes a request fail.

Every Redis call goes through the cache's `StoreGuard`: bounded by
`timeout_s`, and any Redis error or timeout becomes a miss (or a no-op). The
first error of an outage logs one warning and starts a back-off: for
`backoff_s` Redis is not called at all, so a dead Redis adds no latency; then
the next call tries again.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from gateway.store_guard import BACKOFF_S, STORE_ERRORS, StoreGuard

log = logging.getLogger(__name__)
T = TypeVar("T")

#: delete the lock only if it is still ours
RELEASE_LOCK_LUA = """
if redis.call("get", KEYS[1]) == ARGV[1] then
    return redis.call("del", KEYS[1])
end
return 0
"""
#: the entry at KEYS[1] when there is one; else take the lock KEYS[2] (1) or find it held (0), in one round trip
READ_OR_LOCK_LUA = """
local value = redis.call("get", KEYS[1])
if value then
    return value
end
if redis.call("set", KEYS[2], ARGV[1], "NX", "PX", ARGV[2]) then
    return 1
end
return 0
"""
#: a leader's answer stored at KEYS[1] for ARGV[2] seconds, then its lock KEYS[2] deleted if still its own (ARGV[3]),
#: in one round trip
WRITE_AND_RELEASE_LUA = """
redis.call("set", KEYS[1], ARGV[1], "EX", ARGV[2])
if redis.call("get", KEYS[2]) == ARGV[3] then
    redis.call("del", KEYS[2])
end
return 1
"""
#: push the lock's expiry out only if it is still ours
EXTEND_LOCK_LUA = """
if redis.call("get", KEYS[1]) == ARGV[1] then
    return redis.call("pexpire", KEYS[1], ARGV[2])
end
return 0
"""


class RedisCache:
    """Bytes by key in Redis, behind a timeout and an outage back-off."""

    remote = True

    def __init__(self, client: aioredis.Redis, timeout_s: float, *, backoff_s: float = BACKOFF_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.timeout_s = timeout_s
        self.guard = StoreGuard("redis cache", timeout_s, backoff_s=backoff_s, clock=clock, logger=log,
                                meanwhile="serving without it")

    @property
    def errors(self) -> int:
        """Lookups and writes answered without Redis: failed, timed out, or skipped in a back-off."""
        return self.guard.failures

    @property
    def healthy(self) -> bool:
        return self.guard.healthy

    @classmethod
    def from_url(cls, url: str, timeout_s: float, *, backoff_s: float = BACKOFF_S,
                 max_connections: int | None = None) -> RedisCache:
        """A cache on a pooled client for `url` (redis:// or rediss://, password in the URL)."""
        client = aioredis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1), max_connections=max_connections)
        return cls(client, timeout_s, backoff_s=backoff_s)

    async def get(self, key: str) -> bytes | None:
        """The stored bytes; None on a miss or when Redis is unavailable."""
        return await self.guarded(lambda: self.client.get(key), None)

    async def set(self, key: str, value: bytes, ttl_s: int) -> None:
        """Store `value` for `ttl_s` seconds; silently skipped when Redis is unavailable."""
        if ttl_s > 0:
            await self.guarded(lambda: self.client.set(key, value, ex=ttl_s), None)

    async def delete(self, key: str) -> None:
        """Forget `key`."""
        await self.guarded(lambda: self.client.delete(key), None)

    async def close(self) -> None:
        """Close the client and its connection pool (even during a back-off)."""
        try:
            await asyncio.wait_for(self.client.aclose(), self.timeout_s)
        except STORE_ERRORS as exc:
            log.debug("closing the redis cache client failed: %s", exc)

    async def guarded(self, command: Callable[[], Awaitable[T]], default: T, *, after_response: bool = False) -> T:
        """Run one Redis command within the timeout; `default` on failure or during back-off (unless it runs
        `after_response`: then it is tried even in a back-off)."""
        return await self.guard.run(command, default, after_response=after_response)


class RedisLock:
    """A short cross-replica lock (`SET NX PX`), extended and released only by its holder.

    When Redis is unavailable `acquire` grants the lock (every replica then
    leads on its own, as without the lock): the cache never blocks a request.
    """

    def __init__(self, cache: RedisCache) -> None:
        self._cache = cache
        self._release_script = cache.client.register_script(RELEASE_LOCK_LUA)
        self._extend_script = cache.client.register_script(EXTEND_LOCK_LUA)
        self._read_or_lock_script = cache.client.register_script(READ_OR_LOCK_LUA)
        self._write_and_release_script = cache.client.register_script(WRITE_AND_RELEASE_LUA)

    @staticmethod
    def key_for(key: str) -> str:
        """The lock of entry `key`: `{key}:lock`, whose hash tag puts it in the entry's Redis Cluster slot (cache
        keys hold no brace), so one script may read the one and take the other."""
        return f"{{{key}}}:lock"

    async def acquire(self, key: str, ttl_ms: int) -> str | None:
        """A token when the caller should lead; None when another holder has the lock."""
        token = secrets.token_hex(16)
        acquired = await self._cache.guarded(
            lambda: self._cache.client.set(key, token, nx=True, px=max(ttl_ms, 1)), True)
        return token if acquired else None

    async def read_or_acquire(self, key: str, ttl_ms: int) -> tuple[bytes | None, str | None]:
        """`(entry, None)` when `key` holds an entry, else `(None, token)` when the caller took the lock of `key`
        and should lead, `(None, None)` when another holder has it; in one round trip, atomically (an entry
        stored just before the lock was taken is read). Redis unavailable: no entry, the lock granted."""
        token = secrets.token_hex(16)
        reply = await self._cache.guarded(
            lambda: self._read_or_lock_script(keys=[key, self.key_for(key)], args=[token, max(ttl_ms, 1)]), 1)
        if isinstance(reply, bytes):
            return reply, None
        return None, token if reply else None

    async def write_and_release(self, key: str, value: bytes, ttl_s: int, token: str) -> bool:
        """Store `value` at `key` for `ttl_s` seconds and release the lock of `key` if `token` still holds it, in
        one round trip; True once done, False when Redis was unavailable (the lock is then still to release).
        Tried even during a back-off, as a leader's release is."""
        done = await self._cache.guarded(
            lambda: self._write_and_release_script(keys=[key, self.key_for(key)], args=[value, ttl_s, token]), 0,
            after_response=True)
        return bool(done)

    async def extend(self, key: str, token: str, ttl_ms: int) -> bool:
        """Keep holding the lock for `ttl_ms` more; False when it is no longer ours.

        When Redis is unavailable the holder keeps leading (True): the lock
        expires by itself, so at worst another replica calls upstream too.
        """
        extended = await self._cache.guarded(
            lambda: self._extend_script(keys=[key], args=[token, max(ttl_ms, 1)]), 1)
        return bool(extended)

    async def release(self, key: str, token: str, *, after_response: bool = False) -> None:
        """Delete the lock if `token` still holds it (it may have expired). A leader's release after its
        answer has left is tried even during a back-off: skipped, the lock would hold the other replicas
        back until it expires."""
        await self._cache.guarded(lambda: self._release_script(keys=[key], args=[token]), None,
                                  after_response=after_response)
