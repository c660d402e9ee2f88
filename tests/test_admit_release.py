"""The admit stage frees what an admission holds after the answer, without holding the answer up."""

from __future__ import annotations

import asyncio
import os
import signal
import logging
import time
from decimal import Decimal
from types import SimpleNamespace

import pytest
from redis.asyncio import Redis

from gateway.cache.memory import MemoryCache
from gateway.cache.singleflight import SingleFlight
from gateway.context import RequestContext, Usage
from gateway.errors import GatewayError, RateLimited
from gateway.policy.model import Budget, Limits, Policy, Store, Tenant
from gateway.stages.admit import Admit
from gateway.stores import Stores
from gateway.tasks import BackgroundTasks
from gateway.tenancy.budgets import MemoryBudgets
from gateway.tenancy.limits_memory import MemoryLimiter
from gateway.tenancy.limits_redis import RedisLimiter, tenant_keys

ONE_AT_A_TIME = Tenant("solo", limits=Limits(concurrent=1, tokens_per_minute=100_000))


def admit_stage(limiter) -> Admit:
    """An admit stage over `limiter`, with in-memory budgets and its own background task set."""
    stores = Stores(cache=MemoryCache(1024 * 1024), singleflight=SingleFlight(), limiter=limiter,
                    budgets=MemoryBudgets())
    return Admit(SimpleNamespace(stores=stores, background=BackgroundTasks()))


def request(tenant: Tenant) -> RequestContext:
    """A parsed request of `tenant`, ready for admission."""
    return RequestContext(http=None, policy=None, request_id="r", tenant=tenant, prompt_tokens=10, max_tokens=5)


@pytest.fixture(params=["memory", "redis"])
async def limiter(request):
    """A limiter of each kind; the Redis one on a real redis-server."""
    if request.param == "memory":
        yield MemoryLimiter()
        return
    client = Redis.from_url(request.getfixturevalue("redis_server").url)
    yield RedisLimiter(client, "test", 2.0, "allow")
    await client.aclose()


async def test_finish_leaves_the_release_to_the_background(limiter):
    """finish returns before the slot is freed; the release then lands, and shutdown's drain waits for it."""
    stage = admit_stage(limiter)
    ctx = request(ONE_AT_A_TIME)
    await stage.handle(ctx)
    ctx.usage = Usage(input_tokens=10, output_tokens=2)
    await stage.finish(ctx)
    assert len(stage.services.background) == 1          # the release is under way, not awaited
    await stage.services.background.drain(timeout_s=5)
    assert (await limiter.usage(ONE_AT_A_TIME)).concurrent == 0
    assert (await limiter.usage(ONE_AT_A_TIME)).tokens == 12      # and the reservation was settled


async def test_next_request_waits_for_a_release_under_way_instead_of_being_refused(limiter):
    """With `concurrent: 1`, a request arriving while the last one's release is still under way is admitted."""
    stage = admit_stage(limiter)
    for _ in range(20):
        ctx = request(ONE_AT_A_TIME)
        await stage.handle(ctx)
        assert ctx.admission.allowed
        await stage.finish(ctx)         # no yield in between: the release has not run yet
    await stage.services.background.drain(timeout_s=5)
    assert (await limiter.usage(ONE_AT_A_TIME)).concurrent == 0


async def test_a_slot_really_held_is_still_refused(limiter):
    """The wait for releases under way never lets a request past a slot that is really in use."""
    stage = admit_stage(limiter)
    holder = request(ONE_AT_A_TIME)
    await stage.handle(holder)
    finished = request(ONE_AT_A_TIME)
    with pytest.raises(RateLimited):
        await stage.handle(finished)


async def test_a_failed_release_is_counted_and_logged_and_never_raised(redis_server, caplog):
    """Redis gone after admission: the background release fails, is counted and logged; finish does not wait."""
    client = Redis.from_url(redis_server.url)
    limiter = RedisLimiter(client, "test", 0.2, "allow")
    stage = admit_stage(limiter)
    ctx = request(ONE_AT_A_TIME)
    await stage.handle(ctx)
    redis_server.stop()
    caplog.set_level(logging.WARNING)
    started_s = time.monotonic()
    await stage.finish(ctx)
    assert time.monotonic() - started_s < 0.05
    await stage.services.background.drain(timeout_s=5)
    assert limiter.store_failures >= 1
    assert "rate limit store unavailable" in caplog.text
    await client.aclose()


async def test_release_lands_in_redis_after_the_answer(redis_server):
    """The in-flight entry of a finished request is gone from Redis once the background work is drained."""
    client = Redis.from_url(redis_server.url)
    stage = admit_stage(RedisLimiter(client, "test", 2.0, "allow"))
    ctx = request(ONE_AT_A_TIME)
    await stage.handle(ctx)
    flight_key = tenant_keys("test", ONE_AT_A_TIME.name)[3]
    assert await client.zcard(flight_key) == 1
    await stage.finish(ctx)
    await stage.services.background.drain(timeout_s=5)
    assert await client.zcard(flight_key) == 0
    await client.aclose()


async def test_store_start_up_opens_a_warm_connection_pool(redis_server):
    """Opening the stores connects the pool's first connections, so a first burst need not connect."""
    policy = Policy(version=1, models={}, routes=(), store=Store(max_connections=8))
    stores = await Stores.open(policy, {"GATEWAY_REDIS_URL": redis_server.url})
    try:
        probe = Redis.from_url(redis_server.url)
        clients = (await probe.info("clients"))["connected_clients"]
        await probe.aclose()
        assert clients >= 8 + 1         # the warm pool, and the probe itself
    finally:
        await stores.close()


async def test_budget_and_limits_checked_together_both_answer():
    """A tenant with a budget and limits gets both answers (budget state and admission) from one await."""
    budgeted = Tenant("both", limits=Limits(concurrent=2), budget=Budget(usd_per_day=Decimal(1)))
    stage = admit_stage(MemoryLimiter())
    ctx = request(budgeted)
    await asyncio.wait_for(stage.handle(ctx), 1)
    assert ctx.admission.allowed and not ctx.budget_downgrade


class SlowBudgets(MemoryBudgets):
    """In-memory budgets whose read takes as long as a slow store round trip."""

    async def check(self, tenant, now_s=None):
        await asyncio.sleep(0.05)
        return await super().check(tenant, now_s)


async def test_a_client_leaving_during_admission_gives_its_slot_back(limiter):
    """Cancelled after the limiter admitted it but before admission ended (the budget read pending), the
    request's slot is given back at once, not held until the in-flight safety TTL."""
    tenant = Tenant("solo", limits=Limits(concurrent=1, tokens_per_minute=100_000),
                    budget=Budget(usd_per_day=Decimal(1)))
    stage = admit_stage(limiter)
    stage.services.stores.budgets = SlowBudgets()
    ctx = request(tenant)
    handling = asyncio.create_task(stage.handle(ctx))
    await asyncio.sleep(0.02)                # admitted; the budget read is still pending
    handling.cancel()                        # the client disconnects: aiohttp cancels the handler
    await asyncio.gather(handling, return_exceptions=True)
    assert ctx.admission is None
    await stage.services.background.drain(timeout_s=5)
    usage = await limiter.usage(tenant)
    assert (usage.concurrent, usage.tokens) == (0, 0)
    following = request(tenant)
    await stage.handle(following)
    assert following.admission.allowed


@pytest.mark.parametrize("on_store_failure", ["deny", "allow"])
async def test_an_admission_a_stalled_store_runs_late_gives_its_slot_back(redis_server, on_store_failure):
    """A Redis stall past the timeout: the request is refused (deny, 503) or admitted degraded (allow). The
    admission script already sent still runs when Redis resumes; its slot is given back once Redis answers
    again, instead of held for the in-flight TTL (15 minutes)."""
    client = Redis.from_url(redis_server.url)
    limiter = RedisLimiter(client, "test", 0.05, on_store_failure, backoff_s=0.2)
    await limiter.warm_up()
    stage = admit_stage(limiter)
    solo = Tenant("solo", limits=Limits(concurrent=1))
    try:
        redis_server.process.send_signal(signal.SIGSTOP)
        try:
            ctx = request(solo)
            if on_store_failure == "deny":
                with pytest.raises(GatewayError) as refused:
                    await stage.handle(ctx)
                assert refused.value.status == 503
            else:
                await stage.handle(ctx)
                assert ctx.admission.degraded and ctx.admission.unsettled
                await stage.finish(ctx)
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
