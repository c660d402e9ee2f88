"""How the stores are built (gateway.stores): which Redis they use, the policy's prefix, timeout, failure answer and
pool bound handed to each, the cross-replica lock, and start-up and shutdown that a frozen Redis cannot fail."""

from __future__ import annotations

import logging
import signal
import time
from decimal import Decimal

from redis.asyncio import Redis

from gateway.policy.model import Policy, Store
from gateway.stores import Stores, redis_client, redis_url, redis_url_problem, warm_pool, warm_up_scripts
from tests.test_cache_lock_edges import wait_until


def policy_with(**store) -> Policy:
    """A policy with these store settings; a 2 s store timeout unless told, so a loaded machine still connects."""
    return Policy(version=1, models={}, routes=(), store=Store(**{"timeout_ms": 2000.0, **store}))


def test_the_environments_redis_url_wins_over_the_policys() -> None:
    """GATEWAY_REDIS_URL is used when set, so one policy file serves every environment; else the policy's URL."""
    policy = policy_with(redis_url="redis://policy:6379/0")
    assert redis_url(policy, {"GATEWAY_REDIS_URL": "redis://env:6379/0"}) == "redis://env:6379/0"
    assert redis_url(policy, {}) == "redis://policy:6379/0"
    assert redis_url(policy_with(), {}) is None


def test_a_broken_redis_url_is_blamed_on_where_it_came_from() -> None:
    """A URL that cannot be parsed is said to come from GATEWAY_REDIS_URL when the environment set it, else from
    the policy's store.redis_url: the operator is sent to the right place to fix it."""
    broken = "redis://[::1/0"
    from_env = redis_url_problem(policy_with(redis_url="redis://fine:6379/0"), {"GATEWAY_REDIS_URL": broken})
    from_policy = redis_url_problem(policy_with(redis_url=broken), {})
    assert from_env is not None and "GATEWAY_REDIS_URL" in from_env
    assert from_policy is not None and "store.redis_url" in from_policy
    assert redis_url_problem(policy_with(redis_url="redis://fine:6379/0"), {}) is None


async def test_stores_on_redis_hand_every_store_the_policys_prefix_and_failure_answer(redis_server) -> None:
    """Opened on Redis, the cache keys, limits, budgets and outcomes all use the policy's store.key_prefix, and
    limits and budgets answer a store failure as store.on_store_failure says."""
    policy = policy_with(key_prefix="acme", on_store_failure="deny", max_connections=4)
    stores = await Stores.open(policy, {"GATEWAY_REDIS_URL": redis_server.url})
    try:
        assert stores.backend == "redis"
        assert [stores.key_prefix, stores.limiter.prefix, stores.budgets.prefix, stores.outcomes.prefix] == ["acme"] * 4
        assert (stores.limiter.on_store_failure, stores.budgets.on_store_failure) == ("deny", "deny")
    finally:
        await stores.close()


async def test_stores_in_memory_keep_the_policys_prefix() -> None:
    """With no Redis the stores are in memory and still report the policy's key prefix (the cache keys use it)."""
    stores = await Stores.open(policy_with(key_prefix="acme"), {})
    try:
        assert (stores.backend, stores.key_prefix, stores.singleflight.local_only) == ("memory", "acme", True)
    finally:
        await stores.close()


async def test_stores_on_redis_elect_one_leader_across_replicas(redis_server) -> None:
    """Opened on Redis, single-flight uses the cross-replica lock: two processes' stores on one Redis let one
    request lead a key while the other finds the lock held."""
    environ = {"GATEWAY_REDIS_URL": redis_server.url}
    here, there = [await Stores.open(policy_with(max_connections=4), environ) for _ in range(2)]
    try:
        assert not here.singleflight.local_only
        _, token = await here.singleflight.read_or_acquire("gw:c:v2:elect")
        assert token is not None
        assert await there.singleflight.read_or_acquire("gw:c:v2:elect") == (None, None)
    finally:
        await here.close()
        await there.close()


async def test_stores_on_redis_bound_their_pool_by_store_max_connections(redis_server) -> None:
    """The client's pool holds at most store.max_connections connections."""
    stores = await Stores.open(policy_with(max_connections=3), {"GATEWAY_REDIS_URL": redis_server.url})
    try:
        assert stores.redis.connection_pool.max_connections == 3
    finally:
        await stores.close()


async def test_a_pool_smaller_than_the_warm_up_is_warmed_without_a_warning(redis_server, caplog) -> None:
    """Start-up opens as many connections as store.max_connections allows, when that is fewer than it would
    warm: all of them open, and no warning that warming failed."""
    with caplog.at_level(logging.WARNING, logger="gateway"):
        stores = await Stores.open(policy_with(max_connections=2), {"GATEWAY_REDIS_URL": redis_server.url})
    probe = Redis.from_url(redis_server.url)
    try:
        assert (await probe.info("clients"))["connected_clients"] == 2 + 1     # the warm pool, and the probe
        assert [record.getMessage() for record in caplog.records if "warming" in record.getMessage()] == []
    finally:
        await probe.aclose()
        await stores.close()


async def test_a_frozen_redis_costs_a_cache_lookup_the_policys_store_timeout(redis_server) -> None:
    """The cache's lookups are bounded by store.timeout_ms: a frozen Redis makes a lookup a miss after 100 ms, not
    after some longer default."""
    stores = await Stores.open(policy_with(timeout_ms=100, max_connections=4), {"GATEWAY_REDIS_URL": redis_server.url})
    try:
        redis_server.process.send_signal(signal.SIGSTOP)
        try:
            started_s = time.monotonic()
            assert await stores.cache.get("gw:c:v2:frozen") is None
            assert time.monotonic() - started_s < 0.6
        finally:
            redis_server.process.send_signal(signal.SIGCONT)
    finally:
        await stores.close()


async def test_closing_the_stores_disconnects_from_redis(redis_server) -> None:
    """`close` disconnects the stores' pooled connections: Redis no longer counts them as clients."""
    stores = await Stores.open(policy_with(max_connections=4), {"GATEWAY_REDIS_URL": redis_server.url})
    probe = Redis.from_url(redis_server.url)

    async def only_the_probe_left() -> bool:
        return (await probe.info("clients"))["connected_clients"] == 1

    try:
        assert not await only_the_probe_left()              # the warm pool is connected
        await stores.close()
        await wait_until(only_the_probe_left, 5.0)      # the stores' connections are closed
    finally:
        await probe.aclose()


async def test_closing_the_stores_first_lands_the_outcome_bookings_under_way(redis_server) -> None:
    """A request's cost booked to its outcome just before shutdown is in Redis once `close` returns: the booking
    gathering for its flush is sent, not dropped with the client."""
    environ = {"GATEWAY_REDIS_URL": redis_server.url}
    stores = await Stores.open(policy_with(key_prefix="acme", max_connections=4), environ)
    probe = Redis.from_url(redis_server.url)
    try:
        stores.outcomes.track(request_id="r-1", task_id=None, route="chat", tenant="t", workflow=None,
                              cost_usd=Decimal("0.25"))
        await stores.close()
        assert await probe.exists("acme:{t}:oc:r:r-1") == 1
    finally:
        await probe.aclose()


async def test_warming_up_against_a_frozen_redis_gives_up_without_raising(redis_server) -> None:
    """Start-up against a Redis that accepts connections but never answers: warming the pool and loading the
    scripts each give up at their bound instead of failing the start-up."""
    stores = await Stores.open(policy_with(max_connections=4), {"GATEWAY_REDIS_URL": redis_server.url})
    client = redis_client(redis_server.url, 0.2, 4, cluster=False)
    redis_server.process.send_signal(signal.SIGSTOP)
    try:
        started_s = time.monotonic()
        await warm_pool(client, 4, timeout_s=0.2)
        await warm_up_scripts(stores.outcomes, 0.2)
        assert time.monotonic() - started_s < 2.0
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
        await client.aclose()
        await stores.close()
