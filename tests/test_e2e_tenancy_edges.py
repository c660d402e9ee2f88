"""Tenancy at its edges: identification, admission, limits, budgets and the store boundary, on real servers."""

from __future__ import annotations

import asyncio
import signal
from decimal import Decimal
from types import SimpleNamespace

import pytest
from redis.asyncio import Redis

from gateway.cache.memory import MemoryCache
from gateway.cache.singleflight import SingleFlight
from gateway.context import RequestContext
from gateway.errors import GatewayError
from gateway.policy.model import Budget, Limits, Tenant
from gateway.stages.admit import Admit
from gateway.stores import Stores
from gateway.tasks import BackgroundTasks
from gateway.tenancy.budgets_redis import RedisBudgets
from gateway.tenancy.keys import new_key
from gateway.tenancy.limits_redis import RedisLimiter, tenant_keys
from tests.support.harness import DEFAULT_POLICY, Harness

#: tenant -> (raw key, its sha256 hex), fresh for every run
KEYS = {name: new_key() for name in ("embedder",)}
POLICY = DEFAULT_POLICY + f"""
tenants:
  embedder: {{{{keys_sha256: ["{KEYS['embedder'][1]}"], limits: {{{{tokens_per_minute: 300}}}}}}}}
"""


@pytest.fixture(scope="module")
def gw(module_redis_server):
    """The gateway with this module's tenants, its limits and budgets in a real Redis."""
    harness = Harness(POLICY, environ={"GATEWAY_REDIS_URL": module_redis_server.url,
                                       "OTEL_SDK_DISABLED": "true"}).start()
    yield harness
    harness.stop()


def redis_stage(client: Redis, on_store_failure: str, timeout_s: float = 0.05) -> Admit:
    """An admit stage whose limiter and budgets both live in Redis through `client`."""
    stores = Stores(cache=MemoryCache(1024 * 1024), singleflight=SingleFlight(),
                    limiter=RedisLimiter(client, "test", timeout_s, on_store_failure, backoff_s=0.2),
                    budgets=RedisBudgets(client, "test", timeout_s, on_store_failure, backoff_s=0.2))
    return Admit(SimpleNamespace(stores=stores, background=BackgroundTasks()))


def request(tenant: Tenant) -> RequestContext:
    """A parsed request of `tenant`, ready for admission."""
    return RequestContext(http=None, policy=None, request_id="r", tenant=tenant, prompt_tokens=10, max_tokens=5)


async def test_a_stalled_store_refusing_a_budgeted_tenant_gives_the_late_admission_back(redis_server):
    """Redis stalls past the timeout under deny for a tenant with limits and a budget: the 503 comes from the
    budget check, and the admission script Redis runs once it resumes is still withdrawn, not held 15 minutes."""
    client = Redis.from_url(redis_server.url)
    stage = redis_stage(client, "deny")
    await stage.services.stores.limiter.warm_up()
    solo = Tenant("solo", limits=Limits(concurrent=1), budget=Budget(usd_per_day=Decimal(5)))
    try:
        redis_server.process.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(GatewayError) as refused:
                await stage.handle(request(solo))
            assert refused.value.status == 503
            await asyncio.sleep(0.1)
        finally:
            redis_server.process.send_signal(signal.SIGCONT)
        await stage.services.background.drain(timeout_s=5)
        assert await client.zcard(tenant_keys("test", "solo")[3]) == 0
        await asyncio.sleep(0.3)                                    # past the back-off
        ctx = request(solo)
        await stage.handle(ctx)                                     # admitted: the slot is free
        assert ctx.admission.allowed and not ctx.admission.degraded
    finally:
        await client.aclose()


async def test_admissions_answered_without_asking_a_dead_store_leave_no_give_back_running(redis_server):
    """Under allow with Redis dead, a request admitted in the back-off (Redis never saw it) holds nothing in the
    store, so its end starts no give-back that retries against the dead Redis every second for 60 s."""
    client = Redis.from_url(redis_server.url, socket_connect_timeout=0.05)
    stage = redis_stage(client, "allow")
    stage.services.stores.limiter.guard.backoff_s = 30.0        # every admission below falls in one back-off
    tenant = Tenant("busy", limits=Limits(concurrent=5, tokens_per_minute=100_000))
    redis_server.stop()
    try:
        probe = request(tenant)
        await stage.handle(probe)                               # this one asks Redis (and may be late-ended)
        assert probe.admission.degraded and probe.admission.unsettled
        for _ in range(10):
            ctx = request(tenant)
            await stage.handle(ctx)
            assert ctx.admission.degraded and not ctx.admission.unsettled
            await stage.finish(ctx)
        await asyncio.sleep(0.3)
        assert len(stage.services.background) == 0
    finally:
        await stage.services.background.drain(timeout_s=0.1)    # cancels the probe's late end, left retrying
        await client.aclose()


def test_an_embeddings_request_reserves_no_answer_tokens(gw):
    """An embeddings request has no answer to reserve tokens for: an input that fits tokens_per_minute is served,
    not refused as request_too_large for 256 output tokens it can never use."""
    sdk = gw.openai(api_key=KEYS["embedder"][0])
    answer = sdk.embeddings.with_raw_response.create(model="text-embedding-3-small", input="word " * 100)
    used = answer.parse().usage.prompt_tokens
    reserved = 300 - int(answer.headers["x-ratelimit-remaining-tokens"])
    assert abs(reserved - used) <= 2                # the input's estimate alone
