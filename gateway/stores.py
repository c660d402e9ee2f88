"""The shared stores: Redis when configured (many replicas agree), in-memory otherwise.

Cache, single-flight, rate limits, budgets and the outcome book all use the one client.

`GATEWAY_REDIS_URL` wins over the policy's `store.redis_url`, so one policy
file serves every environment.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import parse_url as parse_async_url
from redis.backoff import NoBackoff
from redis.connection import HiredisRespSerializer, parse_url
from redis.asyncio.retry import Retry
from redis.utils import HIREDIS_AVAILABLE

from gateway.cache.memory import MemoryCache
from gateway.cache.redis_store import RedisCache, RedisLock
from gateway.cache.singleflight import SingleFlight
from gateway.outcomes import Book, OutcomeBook
from gateway.outcomes_redis import RedisOutcomeBook
from gateway.policy.load import url_refusal
from gateway.policy.model import Policy, Store
from gateway.routing.pins import MemoryPins, RedisPins
from gateway.store_guard import STORE_ERRORS
from gateway.switches import env_flag
from gateway.tenancy.budgets_memory import MemoryBudgets
from gateway.tenancy.budgets_redis import RedisBudgets
from gateway.tenancy.limits_memory import MemoryLimiter
from gateway.tenancy.limits_redis import RedisLimiter

log = logging.getLogger("gateway")

#: the in-memory cache's bound when no Redis is configured
MEMORY_CACHE_BYTES = 256 * 1024 * 1024
#: connections opened at start-up, so a first burst finds them ready instead of connecting within its time budget
WARM_CONNECTIONS = 32
#: how long start-up waits for them
WARM_UP_TIMEOUT_S = 2.0


def redis_url(policy: Policy, environ: Mapping[str, str]) -> str | None:
    """The Redis to use: the environment's first, then the policy's, else none."""
    return environ.get("GATEWAY_REDIS_URL") or policy.store.redis_url


def redis_url_problem(policy: Policy, environ: Mapping[str, str]) -> str | None:
    """Why the Redis URL to use cannot be (GATEWAY_REDIS_URL is not checked with the policy), in one line without
    the URL, which may carry a password; None when it can, or when there is none."""
    url = redis_url(policy, environ)
    if url is None:
        return None
    try:
        parse_url(url)                  # what the clients' from_url parses it with
    except ValueError as exc:
        source = "GATEWAY_REDIS_URL" if environ.get("GATEWAY_REDIS_URL") else "store.redis_url"
        return f"cannot use the Redis URL in {source} ({url_refusal(exc, url)}), not starting"
    return None


def redis_client(url: str, timeout_s: float, max_connections: int, *, cluster: bool):
    """A pooled client for one Redis, or for a Redis Cluster (keys that go together share a hash tag).

    A call finding every pooled connection busy waits for one (`StoreGuard.run`, within the store timeout).
    """
    # no command is sent twice, by either client: a reply lost after Redis ran an admission, a settle or a budget
    # reservation would apply it again; a failed call is answered by store.on_store_failure and the back-off
    # (StoreGuard), and the writes that must land retry themselves, idempotently. (The asyncio Retry: the
    # synchronous one the asyncio client was once given retried nothing and left the health check's failed ping
    # connected.) The Cluster client still follows MOVED and ASK redirections, which are not retries.
    # No socket_timeout: every call is bounded by its StoreGuard (or, at start-up and shutdown, by a wait_for), which
    # on expiry cancels the call and redis-py drops its connection, as a socket timeout would; the client's own
    # bound wrapped each send in a task of its own (asyncio.wait_for) and each read in a timeout, about 13 µs a
    # command, on every request's three to six commands.
    options = dict(socket_connect_timeout=timeout_s, max_connections=max_connections, retry=Retry(NoBackoff(), 0))
    if cluster:
        return RedisCluster.from_url(url, **options)
    options["health_check_interval"] = 30
    options.update(parse_async_url(url))    # as from_url does: the URL's options win
    options["connection_class"] = hiredis_packing(options.get("connection_class", aioredis.Connection))
    return aioredis.Redis.from_pool(aioredis.ConnectionPool(**options))


class _HiredisPacking:
    """Packs each command with hiredis, in C, as redis-py's synchronous client does (its asyncio connections pack in
    Python: about 10 µs a command against 1.5). The same bytes; a value hiredis cannot pack (None, a bool) is refused
    with redis-py's DataError, as redis-py's own packer refuses it."""

    def pack_command(self, *args: Any) -> list[bytes]:
        return _PACKER.pack(*args)


_PACKER = HiredisRespSerializer()


@functools.cache
def hiredis_packing(connection_class: type) -> type:
    """`connection_class` (plain, TLS or Unix socket, as the URL chose) packing its commands with hiredis; as it is
    when hiredis is not installed."""
    if not HIREDIS_AVAILABLE:
        return connection_class
    return type(f"Hiredis{connection_class.__name__}", (_HiredisPacking, connection_class), {})


async def warm_pool(client, connections: int, timeout_s: float = WARM_UP_TIMEOUT_S) -> None:
    """Open `connections` pooled connections now: concurrent PINGs each take one of their own."""
    try:
        await asyncio.wait_for(asyncio.gather(*(client.ping() for _ in range(connections))), timeout_s)
    except STORE_ERRORS as exc:
        log.warning("warming the Redis pool failed (%s: %s); connections open on demand",
                    type(exc).__name__, str(exc) or "timed out")


async def warm_up_scripts(store, timeout_s: float) -> None:
    """Load a store's Lua scripts now (`store.warm_up()`), so a first call does not spend a round trip on them;
    a failure only means they load on first use."""
    try:
        await asyncio.wait_for(store.warm_up(), timeout_s)
    except STORE_ERRORS:
        log.debug("%s scripts not loaded at start-up; they load on first use", type(store).__name__)


@dataclass
class Stores:
    """Cache, single-flight, limits, budgets and the outcome book, all on one backend."""

    cache: Any
    singleflight: SingleFlight
    limiter: Any
    budgets: Any
    redis: aioredis.Redis | RedisCluster | None = None
    outcomes: Book = field(default_factory=OutcomeBook)
    pins: Any = field(default_factory=MemoryPins)     # the model that stored each Responses API answer
    key_prefix: str = Store.key_prefix  # the start-up policy's store.key_prefix: a reload changes it at restart

    @property
    def backend(self) -> str:
        return "redis" if self.redis is not None else "memory"

    @classmethod
    async def open(cls, policy: Policy, environ: Mapping[str, str]) -> "Stores":
        """Connect to Redis if one is configured (lazily: a Redis down at start-up is not fatal)."""
        url = redis_url(policy, environ)
        store = policy.store
        timeout_s = store.timeout_ms / 1000
        if url is None:
            log.info("no Redis configured: cache, limits, budgets and outcomes are in memory (this process "
                     "only: with several workers or replicas, a task is reported to the process that served it)")
            return cls(cache=MemoryCache(MEMORY_CACHE_BYTES), singleflight=SingleFlight(),
                       limiter=MemoryLimiter(), budgets=MemoryBudgets(), key_prefix=store.key_prefix)
        client = redis_client(url, timeout_s, store.max_connections,
                              cluster=store.cluster or env_flag(environ, "GATEWAY_REDIS_CLUSTER"))
        cache = RedisCache(client, timeout_s)
        prefix = store.key_prefix
        limiter = RedisLimiter(client, prefix, timeout_s, store.on_store_failure)
        outcomes = RedisOutcomeBook(client, prefix, timeout_s)
        budgets = RedisBudgets(client, prefix, timeout_s, store.on_store_failure)
        if await limiter.warm_up():
            for scripted in (outcomes, budgets):
                await warm_up_scripts(scripted, WARM_UP_TIMEOUT_S)
            await warm_pool(client, min(WARM_CONNECTIONS, store.max_connections))
        return cls(cache=cache, singleflight=SingleFlight(lock=RedisLock(cache)), limiter=limiter,
                   budgets=budgets, redis=client, outcomes=outcomes, pins=RedisPins(client, prefix, timeout_s),
                   key_prefix=prefix)

    async def close(self) -> None:
        """Finish the outcome bookings under way, then close the stores' client through the cache; both bound
        their wait and never raise: a Redis that is down or frozen cannot hold up or fail the shutdown."""
        await self.outcomes.close()
        await self.cache.close()
