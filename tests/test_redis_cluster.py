"""The Redis cache, rate limiter and budgets against a real 3-master Redis Cluster."""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal

import pytest
import redis
from redis.asyncio.cluster import RedisCluster as ClusterClient

from gateway.cache.redis_store import RedisCache, RedisLock
from gateway.policy.model import Budget, Limits, Tenant
from gateway.tenancy.budgets import Periods
from gateway.tenancy.budgets_redis import RedisBudgets
from gateway.tenancy.limits_redis import RedisLimiter, tenant_keys
from tests.support.redis_cluster import RedisCluster, cluster_binaries

#: generous store timeouts: the point here is cluster semantics, not latency on a busy 2-core box
TIMEOUT_S = 2.0
#: above the largest burst any test sends to one node
MAX_CONNECTIONS_PER_NODE = 256
#: tenants whose hash tags land on different cluster nodes (checked in the tests that use them)
TENANTS = ("acme", "globex", "initech", "umbrella", "hooli", "stark")


@pytest.fixture
async def client(cluster):
    """A redis.asyncio cluster client bound to this test's event loop; its keys are flushed after."""
    # max_connections is per node; past it the async cluster client raises MaxConnectionsError
    # instead of waiting, which the limiter (rightly) counts as a store failure
    redis = ClusterClient(host="127.0.0.1", port=cluster.ports[0], socket_timeout=TIMEOUT_S,
                          max_connections=MAX_CONNECTIONS_PER_NODE)
    await redis.initialize()
    yield redis
    await redis.flushall(target_nodes=ClusterClient.PRIMARIES)
    await redis.aclose()


def node_of(client: ClusterClient, key: str) -> str:
    """The name (host:port) of the master that owns `key`'s slot."""
    return client.get_node_from_key(key).name


def test_cluster_has_three_masters_covering_every_slot(cluster):
    """The fixture really builds a cluster: three masters, all 16384 slots assigned, state ok."""
    info = redis.Redis(host="127.0.0.1", port=cluster.ports[1]).cluster("info")
    assert info["cluster_state"] == "ok"
    assert int(info["cluster_slots_assigned"]) == 16384
    assert int(info["cluster_known_nodes"]) == 3 and int(info["cluster_size"]) == 3


async def test_cache_get_set_ttl_across_slots(client):
    """RedisCache stores and reads keys owned by every master, with their TTL, and reports no error."""
    cache = RedisCache(client, TIMEOUT_S)
    keys = [f"gw:cache:tenant-{index}:{index * 7919}" for index in range(24)]
    assert len({node_of(client, key) for key in keys}) == 3
    for index, key in enumerate(keys):
        await cache.set(key, f"answer-{index}".encode(), ttl_s=120)
    assert [await cache.get(key) for key in keys] == [f"answer-{i}".encode() for i in range(len(keys))]
    ttls_s = [await client.ttl(key) for key in keys]
    assert all(0 < ttl_s <= 120 for ttl_s in ttls_s)
    await cache.delete(keys[0])
    assert await cache.get(keys[0]) is None
    assert cache.errors == 0 and cache.healthy


async def test_cache_lock_script_runs_on_the_owning_node(client):
    """The single-flight lock (SET NX PX, release by Lua) works for keys on different masters."""
    cache = RedisCache(client, TIMEOUT_S)
    lock = RedisLock(cache)
    keys = [f"gw:lock:{name}" for name in TENANTS]
    assert len({node_of(client, key) for key in keys}) > 1
    for key in keys:
        token = await lock.acquire(key, ttl_ms=10_000)
        assert token is not None
        assert await lock.acquire(key, ttl_ms=10_000) is None
        await lock.release(key, "not-the-holder")
        assert await client.get(key) == token.encode()
        await lock.release(key, token)
        assert await client.get(key) is None
    assert cache.errors == 0


def test_limiter_keys_share_the_tenant_slot(client):
    """All of a tenant's limiter keys hash to one slot, and tenants spread over several masters."""
    for tenant in TENANTS:
        assert len({client.keyslot(key) for key in tenant_keys("gw", tenant)}) == 1
    assert len({node_of(client, tenant_keys("gw", tenant)[0]) for tenant in TENANTS}) > 1


async def test_limiter_holds_request_limit_under_concurrent_burst(client):
    """A concurrent burst per tenant through the cluster client admits exactly the per-minute limit."""
    limiter = RedisLimiter(client, "gw", TIMEOUT_S, "allow")
    limit, burst = 15, 40
    tenants = [Tenant(name=name, limits=Limits(requests_per_minute=limit)) for name in TENANTS[:3]]
    admissions = await asyncio.gather(*(limiter.admit(tenant, route="chat", tokens=1)
                                        for tenant in tenants for _ in range(burst)))
    for tenant in tenants:
        mine = [a for a in admissions if a.tenant == tenant.name]
        assert sum(a.allowed for a in mine) == limit
        assert {a.reason for a in mine if not a.allowed} == {"requests"}
    assert limiter.store_failures == 0 and not any(a.degraded for a in admissions)


async def test_limiter_tokens_settle_and_concurrency_on_cluster(client):
    """Token reservations, settle and the in-flight set all run on the tenant's node without errors."""
    limiter = RedisLimiter(client, "gw", TIMEOUT_S, "allow")
    tenant = Tenant(name="globex", limits=Limits(tokens_per_minute=1000, concurrent=2))
    first = await limiter.admit(tenant, route="chat", tokens=600)
    second = await limiter.admit(tenant, route="chat", tokens=600)
    assert first.allowed and not second.allowed and second.reason == "tokens"
    await limiter.settle(tenant, ticket=first.ticket, reserved_tokens=600, actual_tokens=100)
    burst = await asyncio.gather(*(limiter.admit(tenant, route="chat", tokens=100) for _ in range(6)))
    assert sum(a.allowed for a in burst) == 1
    assert {a.reason for a in burst if not a.allowed} == {"concurrent"}
    await limiter.release(tenant, ticket=first.ticket)
    assert (await limiter.admit(tenant, route="chat", tokens=100)).allowed
    assert limiter.store_failures == 0


async def test_budgets_charge_and_check_on_cluster(client):
    """Concurrent charges add up exactly on the tenant's node, and the day budget then reads exhausted."""
    budgets = RedisBudgets(client, "gw", TIMEOUT_S, "allow")
    tenants = [Tenant(name=name, budget=Budget(usd_per_day=Decimal("0.03"))) for name in TENANTS[3:]]
    assert len({node_of(client, budgets.keys(t.name, Periods.at(time.time()))[0]) for t in tenants}) > 1
    await asyncio.gather(*(budgets.charge(tenant, Decimal("0.001")) for tenant in tenants for _ in range(40)))
    for tenant in tenants:
        state = await budgets.check(tenant)
        assert state.available and state.spent_day_usd == Decimal("0.04") == state.spent_month_usd
        assert state.exhausted and state.reason == "day"
    assert budgets.store_failures == 0


def test_gateway_caches_through_a_redis_cluster(cluster):
    """The whole gateway runs on a Redis Cluster (GATEWAY_REDIS_CLUSTER=1): a repeated request is a cache hit."""
    import os

    from tests.support.harness import DEFAULT_POLICY, Harness

    # a generous store timeout: a loaded machine must not turn the first cluster round trips into bypasses
    harness = Harness(DEFAULT_POLICY + "store: {{timeout_ms: 3000}}\n", environ={**os.environ, "GATEWAY_REDIS_URL": cluster.url,
                               "GATEWAY_REDIS_CLUSTER": "1"}).start()
    try:
        assert type(harness.services.stores.redis).__name__ == "RedisCluster"
        client = harness.openai()
        statuses = []
        for _ in range(2):
            raw = client.chat.completions.with_raw_response.create(
                model="auto", temperature=0, max_tokens=3, messages=[{"role": "user", "content": "cluster?"}])
            statuses.append(raw.headers["x-gateway-cache"])
            harness.call(harness.services.background.drain(5))
        assert statuses == ["stored", "hit"]
    finally:
        harness.stop()


async def test_a_cluster_with_no_node_left_is_answered_never_raised():
    """Every node gone: the cache misses, the limiter and the budgets follow on_store_failure, failures are
    counted; redis-py's RedisClusterException (not a RedisError) does not escape to the request."""
    if cluster_binaries() is None:
        pytest.skip("redis-server and redis-cli are not installed (Debian: apt-get install redis-server)")
    doomed = RedisCluster.on_free_ports().start()           # its own cluster: this test kills it
    client = ClusterClient.from_url(doomed.url, socket_timeout=0.2, socket_connect_timeout=0.2)
    who = Tenant("acme", limits=Limits(requests_per_minute=100), budget=Budget(usd_per_day=Decimal("10")))
    cache, limiter = RedisCache(client, 0.5), RedisLimiter(client, "gw", 0.5, "allow")
    budgets = RedisBudgets(client, "gw", 0.5, "deny", retry_s=0.1, late_flush_s=0.0)     # the charge given up soon
    try:
        await budgets.charge(who, Decimal("0.5"))
        assert (await limiter.admit(who, route=None, tokens=1)).allowed and await cache.get("k") is None
        doomed.stop()
        assert await cache.get("k") is None
        admission = await limiter.admit(who, route=None, tokens=1)
        assert admission.allowed and admission.degraded
        assert (await budgets.check(who)).reason == "store_unavailable"
        await budgets.charge(who, Decimal("0.5"))
        assert (cache.errors, limiter.store_failures, budgets.store_failures) == (1, 1, 3)  # check, flush, charge
    finally:
        doomed.stop()
        await client.aclose()
