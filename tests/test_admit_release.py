"""The admit stage frees what an admission holds after the answer, without holding the answer up."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from decimal import Decimal
from types import SimpleNamespace

import pytest
from redis.asyncio import Redis

from gateway.cache.memory import MemoryCache
from gateway.cache.singleflight import SingleFlight
from gateway.context import Decision, RequestContext, Usage
from gateway.errors import BudgetExceeded, GatewayError, RateLimited
from gateway.policy.model import Budget, Limits, Model, Policy, Price, Store, Tenant
from gateway.stages import admit as admit_module
from gateway.stages.admit import Admit, reservation_usd
from gateway.stores import Stores
from gateway.tasks import BackgroundTasks
from gateway.tenancy.budgets_memory import MemoryBudgets
from gateway.tenancy.budgets_redis import RedisBudgets
from gateway.tenancy.limits_memory import MemoryLimiter
from gateway import store_guard
from gateway.tenancy.limits_redis import RedisLimiter, tenant_keys
from tests.support.redis_counting import CountingRedis

ONE_AT_A_TIME = Tenant("solo", limits=Limits(concurrent=1, tokens_per_minute=100_000))


def admit_stage(limiter, budgets=None) -> Admit:
    """An admit stage over `limiter`, with `budgets` (in memory by default) and its own background task set."""
    stores = Stores(cache=MemoryCache(1024 * 1024), singleflight=SingleFlight(), limiter=limiter,
                    budgets=budgets or MemoryBudgets())
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
    """With Redis, finish returns before the slot is freed; the release then lands, and shutdown's drain waits
    for it. The in-process limiter is ended at once: no task, nothing left to drain."""
    stage = admit_stage(limiter)
    ctx = request(ONE_AT_A_TIME)
    await stage.handle(ctx)
    ctx.usage = Usage(input_tokens=10, output_tokens=2)
    await stage.finish(ctx)
    if isinstance(limiter, MemoryLimiter):
        assert len(stage.services.background) == 0
        assert (await limiter.usage(ONE_AT_A_TIME)).concurrent == 0     # freed before finish returned
    else:
        assert len(stage.services.background) == 1      # the release is under way, not awaited
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
    await stage.finish(ctx)
    assert limiter.store_failures == 0 and len(stage.services.background) == 1     # sent after, not awaited
    await stage.services.background.drain(timeout_s=1)     # it retries until Redis answers: cut short here
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


async def test_store_start_up_loads_every_stores_scripts(redis_server):
    """Opening the stores loads the limiter's, the outcome book's and the budgets' Lua scripts, so no first call
    spends a round trip on a NOSCRIPT."""
    policy = Policy(version=1, models={}, routes=(), store=Store(max_connections=8))
    stores = await Stores.open(policy, {"GATEWAY_REDIS_URL": redis_server.url})
    try:
        scripts = [stores.limiter.admit_script, stores.limiter.settle_script, stores.outcomes.book_script,
                   stores.budgets.reserve_script, stores.budgets.flush_script, stores.budgets.usage_script]
        probe = Redis.from_url(redis_server.url)
        loaded = await probe.script_exists(*(script.sha for script in scripts))
        await probe.aclose()
        assert loaded == [True] * len(scripts)
    finally:
        await stores.close()


async def test_store_start_up_opens_a_warm_connection_pool(redis_server):
    """Opening the stores connects the pool's first connections, so a first burst need not connect."""
    # each connection is given the store timeout to connect: 2 s, not 100 ms, so a loaded machine connects all 8
    policy = Policy(version=1, models={}, routes=(), store=Store(max_connections=8, timeout_ms=2000))
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
    """In-memory budgets whose read takes as long as a slow store round trip, and which admission treats as a
    remote store: read beside the limiter's admission, not before it."""

    remote = True

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


class LostReplyBudgets(MemoryBudgets):
    """In-memory budgets whose reservation takes its hold, and whose reply then never reaches admission."""

    def __init__(self) -> None:
        super().__init__()
        self.held = asyncio.Event()

    async def reserve(self, tenant, cost_usd, ticket, now_s=None):
        await super().reserve(tenant, cost_usd, ticket, now_s)
        self.held.set()
        await asyncio.Event().wait()            # the reply is lost on its way: the caller waits until it gives up


async def test_a_client_leaving_before_its_reservation_is_answered_has_its_hold_given_back():
    """A client that leaves after the store took its request's hold, and before the reply came, has the hold given
    back by finish, as the pipeline runs it for a cancelled request: the hold does not go on refusing the tenant's
    next requests."""
    fallback = Model(name="fallback", endpoint="e", upstream_model="fallback",
                     price=Price(input_per_mtok=Decimal("1"), output_per_mtok=Decimal("10")))
    budgets = LostReplyBudgets()
    stage, acme = admit_stage(MemoryLimiter(), budgets=budgets), Tenant("acme", budget=Budget(usd_per_day=Decimal(1)))
    ctx = RequestContext(http=None, policy=None, request_id="r", tenant=acme, prompt_tokens=10,
                         decision=Decision(route=None, plan=(fallback,), output_tokens=100))
    handling = asyncio.create_task(stage.handle(ctx))
    await asyncio.wait_for(budgets.held.wait(), 5)
    assert budgets.held_nanos["acme"] == 1_010_000
    handling.cancel()                           # the client disconnects: aiohttp cancels the handler
    await asyncio.gather(handling, return_exceptions=True)
    await stage.finish(ctx)
    assert budgets.held_nanos.get("acme", 0) == 0


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


async def test_an_admission_redis_runs_after_the_late_ends_gave_up_takes_no_slot(redis_server, monkeypatch):
    """A stall longer than the late ends' retries (LATE_END_S: 60 s, shortened here): the admission script sent
    during it runs when Redis resumes, after every end of its request gave up. Past its deadline (the call's
    timeout and LATE_MARGIN_S, on Redis's clock) it takes nothing; it used to take a concurrency slot that
    locked a tenant of `concurrent: 1` out for the in-flight TTL (15 minutes)."""
    monkeypatch.setattr(admit_module, "LATE_END_S", 0.3)
    monkeypatch.setattr(store_guard, "LATE_MARGIN_S", 0.2)
    client = Redis.from_url(redis_server.url)
    # a back-off longer than the stall: no end is sent while Redis is stopped (were one queued, Redis might run
    # it after the admission and free the slot by chance, as it may not after a long stall)
    limiter = RedisLimiter(client, "test", 0.05, "allow", backoff_s=5)
    await limiter.warm_up()
    stage = admit_stage(limiter)
    solo = Tenant("solo", limits=Limits(concurrent=1))
    try:
        first = request(solo)
        await stage.handle(first)                   # answered: the limiter knows Redis's clock
        await stage.finish(first)
        await stage.services.background.drain(timeout_s=5)
        redis_server.process.send_signal(signal.SIGSTOP)
        try:
            ctx = request(solo)
            await stage.handle(ctx)
            assert ctx.admission.degraded and ctx.admission.unsettled
            await stage.finish(ctx)
            await asyncio.sleep(1.3)                # the late ends give up meanwhile, never sent
        finally:
            redis_server.process.send_signal(signal.SIGCONT)
        await stage.services.background.drain(timeout_s=5)
        await asyncio.sleep(0.2)                    # the queued admission has run by now
        assert await client.zcard(tenant_keys("test", "solo")[3]) == 0
    finally:
        await client.aclose()


class CuttableRedisProxy:
    """A TCP proxy in front of redis-server: `cut()` drops its connections and refuses new ones, a network
    blip that leaves Redis and its data as they were; `restore()` listens again on the same port. While
    `muted`, commands still reach Redis but its replies are lost."""

    def __init__(self, redis_port: int) -> None:
        self.redis_port = redis_port
        self.port = 0
        self.muted = False
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> CuttableRedisProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def cut(self) -> None:
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()
        await self._server.wait_closed()

    restore = start

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        redis_r, redis_w = await asyncio.open_connection("127.0.0.1", self.redis_port)
        self._writers.update((client_w, redis_w))

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, replies: bool) -> None:
            try:
                while data := await reader.read(65536):
                    if not (replies and self.muted):
                        writer.write(data)
                        await writer.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                writer.transport.abort()

        await asyncio.gather(pipe(client_r, redis_w, False), pipe(redis_r, client_w, True))


@pytest.fixture
async def blip(redis_server):
    """(proxy, stage, direct client): an admit stage whose Redis limiter reaches redis-server through a proxy
    that a test can cut, and a client that reaches redis-server directly."""
    proxy = await CuttableRedisProxy(redis_server.port).start()
    client, direct = Redis.from_url(proxy.url), Redis.from_url(redis_server.url)
    limiter = RedisLimiter(client, "test", 0.2, "allow", backoff_s=0.05)
    assert await limiter.warm_up()                              # scripts loaded, as at start-up
    stage = admit_stage(limiter)
    yield proxy, stage, direct
    await stage.services.background.drain(timeout_s=1)
    await proxy.cut()
    await client.aclose()
    await direct.aclose()


async def test_a_release_redis_did_not_answer_is_tried_again_until_it_does(blip):
    """A network blip while a release runs: it is tried again until Redis answers, so the slot is free and the
    tokens settled once Redis is reachable, instead of the slot held for the in-flight TTL (15 minutes)."""
    proxy, stage, direct = blip
    flight_key, sum_key = tenant_keys("test", "solo")[3], tenant_keys("test", "solo")[2]
    ctx = request(ONE_AT_A_TIME)
    await stage.handle(ctx)
    assert ctx.admission.allowed and not ctx.admission.degraded
    await proxy.cut()
    ctx.usage = Usage(input_tokens=10, output_tokens=2)
    await stage.finish(ctx)
    await asyncio.sleep(0.3)                                    # the first try failed
    assert await direct.zcard(flight_key) == 1
    await proxy.restore()
    await stage.services.background.drain(timeout_s=5)
    assert await direct.zcard(flight_key) == 0
    assert int(await direct.get(sum_key)) == 12                 # settled to the tokens used, once
    following = request(ONE_AT_A_TIME)
    await stage.handle(following)
    assert following.admission.allowed and not following.admission.degraded


async def test_a_concurrency_refusal_waits_for_a_release_first_try_not_its_retries(blip):
    """While a release Redis did not answer is tried again, the next request is refused for concurrency at once
    (Retry-After 1 s), not held for the retries, which last as long as Redis is away."""
    proxy, stage, _ = blip
    ctx = request(ONE_AT_A_TIME)
    await stage.handle(ctx)
    await proxy.cut()
    await stage.finish(ctx)
    await asyncio.sleep(0.1)                                    # the first try failed; past the back-off
    await proxy.restore()
    started_s = time.monotonic()
    with pytest.raises(RateLimited) as refused:
        await stage.handle(request(ONE_AT_A_TIME))
    assert time.monotonic() - started_s < 0.5
    assert refused.value.headers["Retry-After"] == "1"
    await stage.services.background.drain(timeout_s=5)         # the retry lands
    following = request(ONE_AT_A_TIME)
    await stage.handle(following)
    assert following.admission.allowed


async def test_an_excess_is_charged_once_when_a_release_is_tried_again(blip, redis_server):
    """An end Redis ran but whose reply was lost charged the excess (tokens used beyond the reservation): the
    retries only release, so the excess is counted once, not twice."""
    proxy, stage, direct = blip
    _, _, sum_key, flight_key = tenant_keys("test", "solo")
    ctx = request(ONE_AT_A_TIME)
    await stage.handle(ctx)
    ctx.usage = Usage(input_tokens=ctx.reserved_tokens, output_tokens=100)    # 100 more than reserved
    proxy.muted = True                                          # commands reach Redis, replies are lost
    await stage.finish(ctx)
    await asyncio.sleep(0.3)                                    # the end ran, unanswered
    proxy.muted = False
    await stage.services.background.drain(timeout_s=5)
    assert await direct.zcard(flight_key) == 0
    assert int(await direct.get(sum_key)) == ctx.reserved_tokens + 100


async def test_a_request_refused_for_its_budget_takes_no_request_tokens_or_slot(limiter):
    """Budget and limits checked at once: the first request refused for an exhausted budget withdraws its
    admission, so it takes none of the tenant's requests per minute, tokens or concurrency slots."""
    spent = Tenant("spent", limits=Limits(requests_per_minute=2, tokens_per_minute=100_000, concurrent=1),
                   budget=Budget(usd_per_day=Decimal("0.01")))
    stage = admit_stage(limiter)
    await stage.services.stores.budgets.charge(spent, Decimal(1))      # spent already (another replica, say)
    with pytest.raises(BudgetExceeded):
        await stage.handle(request(spent))
    await stage.services.background.drain(timeout_s=5)
    usage = await limiter.usage(spent)
    assert (usage.requests, usage.tokens, usage.concurrent) == (0, 0, 0)


async def test_after_a_budget_refusal_the_next_request_is_refused_without_asking_the_limiter(redis_server):
    """Once this process saw a tenant's budget spent, its next request is refused by the budget alone: the limiter
    is not asked for an admission that would only be withdrawn, until the period ends."""
    limiter_client, budgets_client = CountingRedis.from_url(redis_server.url), Redis.from_url(redis_server.url)
    spent = Tenant("spent", limits=Limits(requests_per_minute=100), budget=Budget(usd_per_day=Decimal("0.01")))
    stage = admit_stage(RedisLimiter(limiter_client, "test", 2.0, "allow"),
                        budgets=RedisBudgets(budgets_client, "test", 2.0, "allow"))
    try:
        await stage.services.stores.budgets.charge(spent, Decimal(1))
        with pytest.raises(BudgetExceeded):
            await stage.handle(request(spent))         # both asked at once: admitted, then withdrawn
        await stage.services.background.drain(timeout_s=5)
        assert limiter_client.sent
        limiter_client.sent.clear()
        with pytest.raises(BudgetExceeded):
            await stage.handle(request(spent))
        await stage.services.background.drain(timeout_s=5)
        assert limiter_client.sent == []
    finally:
        await limiter_client.aclose()
        await budgets_client.aclose()


def test_a_plan_led_by_a_fallback_holds_the_price_of_each_choice():
    """A plan whose first model the router did not judge (a route's fallback) holds the prompt and the predicted
    answer for each of the request's n choices: 10 input and 2 x 100 output tokens, not 100."""
    fallback = Model(name="fallback", endpoint="e", upstream_model="fallback",
                     price=Price(input_per_mtok=Decimal("1"), output_per_mtok=Decimal("10")))
    ctx = RequestContext(http=None, policy=None, request_id="r", prompt_tokens=10, choices=2,
                         decision=Decision(route=None, plan=(fallback,), output_tokens=100))
    assert reservation_usd(ctx) == Decimal("0.00201")


async def test_a_request_without_max_tokens_reserves_256_tokens_for_each_choice():
    """No max_tokens: the admission reserves the prompt and 256 tokens for each of its n choices."""
    stage = admit_stage(MemoryLimiter())
    ctx = RequestContext(http=None, policy=None, request_id="r", tenant=ONE_AT_A_TIME, prompt_tokens=10, choices=2)
    await stage.handle(ctx)
    assert ctx.reserved_tokens == ctx.admission.reserved_tokens == 10 + 2 * 256


async def test_a_budget_store_down_under_deny_is_refused_at_once_even_when_the_cache_may_answer(redis_server):
    """on_store_failure: deny with Redis down refuses a budgeted request at admission (503), also one the cache
    may answer: only a spent budget waits for the cache's miss, an outage does not."""
    client = Redis.from_url(redis_server.url)
    stage = admit_stage(MemoryLimiter(), budgets=RedisBudgets(client, "test", 0.2, "deny"))
    ctx = request(Tenant("budgeted", budget=Budget(usd_per_day=Decimal(1))))
    ctx.cache_key, ctx.cache_lookup = "gw:c:v2:question", True
    redis_server.stop()
    try:
        with pytest.raises(GatewayError) as refused:
            await stage.handle(ctx)
        assert (refused.value.status, refused.value.code) == (503, "store_unavailable")
    finally:
        await client.aclose()


async def test_a_budget_store_down_under_deny_refuses_a_downgrading_tenant_and_says_retry_in_a_second(redis_server):
    """on_store_failure: deny with Redis down refuses a tenant whose budget says downgrade with a 503 and
    Retry-After: 1, as it refuses any other: its spend is unknown, not spent, so it is not served the cheapest
    model, and the client is told to come back shortly, not at once."""
    client = Redis.from_url(redis_server.url)
    stage = admit_stage(MemoryLimiter(), budgets=RedisBudgets(client, "test", 0.2, "deny"))
    ctx = request(Tenant("thrifty", budget=Budget(usd_per_day=Decimal(1), on_exhausted="downgrade")))
    redis_server.stop()
    try:
        with pytest.raises(GatewayError) as refused:
            await stage.handle(ctx)
        assert (refused.value.status, refused.value.code) == (503, "store_unavailable")
        assert refused.value.headers["Retry-After"] == "1" and not ctx.budget_downgrade
    finally:
        await client.aclose()


async def test_a_request_larger_than_tokens_per_minute_is_refused_as_too_large(limiter):
    """prompt + max_tokens x n above tokens_per_minute: 429 request_too_large without Retry-After, at once."""
    narrow = Tenant("narrow", limits=Limits(tokens_per_minute=100))
    ctx = RequestContext(http=None, policy=None, request_id="r", tenant=narrow, prompt_tokens=10, max_tokens=50,
                         choices=2)
    with pytest.raises(RateLimited) as refused:
        await admit_stage(limiter).handle(ctx)
    assert refused.value.code == "request_too_large" and "Retry-After" not in refused.value.headers
    assert "limit 100, requested 110" in refused.value.message


async def test_a_clock_step_makes_one_admission_late_not_every_one_after(redis_server):
    """This host's clock stepping back after an admission (an NTP step, a VM resumed) puts the next deadline in
    Redis's past: that admission, answered in time, is late and taken nothing (admitted degraded); its reply reads
    Redis's clock again, so the admissions after it are judged as before (they were all late, for good: limits
    unenforced under allow, every request refused under deny)."""
    client = Redis.from_url(redis_server.url)
    limiter = RedisLimiter(client, "test", 0.5, "allow")
    await limiter.warm_up()
    solo = Tenant("solo", limits=Limits(requests_per_minute=2))
    try:
        assert (await limiter.admit(solo, route=None, tokens=1)).allowed
        limiter.redis_clock.ahead_ms -= 10_000      # as this host's clock stepping 10 s back would make it
        stepped = await limiter.admit(solo, route=None, tokens=1)
        assert stepped.allowed and stepped.degraded
        second = await limiter.admit(solo, route=None, tokens=1)
        assert second.allowed and not second.degraded
        refused = await limiter.admit(solo, route=None, tokens=1)      # the limit holds again: 2 a minute
        assert not refused.allowed and refused.reason == "requests"
    finally:
        await client.aclose()
