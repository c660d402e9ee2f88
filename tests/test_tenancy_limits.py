"""Rate limits: the in-memory and Redis limiters obey the same sliding-log semantics."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import replace

import pytest
from redis.asyncio import Redis
from redis.crc import key_slot

from gateway.errors import RateLimited
from gateway.policy.model import Limits, Tenant
from gateway.tenancy.limits import Admission, LimitUsage, format_reset
from gateway.tenancy.limits_memory import MemoryLimiter
from gateway.tenancy.limits_redis import RedisLimiter, tenant_keys
from tests.support.redis_counting import CountingRedis

T0 = 1_700_000_000.0


def tenant(rpm=None, tpm=None, concurrent=None, name="acme") -> Tenant:
    """A tenant with the given limits."""
    return Tenant(name, limits=Limits(requests_per_minute=rpm, tokens_per_minute=tpm,
                                      concurrent=concurrent))


@pytest.fixture(params=["memory", "redis"])
async def make_limiter(request):
    """A factory of limiters of one kind; Redis ones each get their own client, like replicas."""
    server = request.getfixturevalue("redis_server") if request.param == "redis" else None
    clients: list[Redis] = []

    def make(**kwargs):
        if server is None:
            return MemoryLimiter(**kwargs)
        client = Redis.from_url(server.url)
        clients.append(client)
        return RedisLimiter(client, "test", 2.0, "allow", **kwargs)

    yield make
    for client in clients:
        await client.aclose()


async def admit(limiter, who: Tenant, at_s: float, tokens: int = 0) -> Admission:
    """Admit one request at T0 + at_s."""
    return await limiter.admit(who, route="chat", tokens=tokens, now_s=T0 + at_s)


async def test_requests_window_slides_exactly(make_limiter):
    """A request counts for exactly 60 s after it was admitted, and Retry-After says when it leaves."""
    limiter, who = make_limiter(), tenant(rpm=2)
    assert (await admit(limiter, who, 0)).allowed
    assert (await admit(limiter, who, 30)).allowed
    refused = await admit(limiter, who, 59.999)
    assert (refused.allowed, refused.reason, refused.retry_after_s) == (False, "requests", 0.001)
    assert (await admit(limiter, who, 60)).allowed
    again = await admit(limiter, who, 60)
    assert (again.allowed, again.retry_after_s) == (False, 30.0)


async def test_headers_follow_openai_format(make_limiter):
    """The x-ratelimit-* headers carry limit, remaining and reset in OpenAI's duration format."""
    limiter, who = make_limiter(), tenant(rpm=10, tpm=1000)
    await admit(limiter, who, 0, tokens=100)
    admission = await admit(limiter, who, 15, tokens=300)
    assert admission.headers() == {
        "x-ratelimit-limit-requests": "10", "x-ratelimit-remaining-requests": "8",
        "x-ratelimit-reset-requests": "1m0s", "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "600", "x-ratelimit-reset-tokens": "1m0s"}
    assert (await admit(limiter, tenant(concurrent=3), 0)).headers() == {}


async def test_refusal_error_carries_retry_after(make_limiter):
    """A refused admission turns into RateLimited with Retry-After rounded up to whole seconds."""
    limiter, who = make_limiter(), tenant(rpm=1)
    await admit(limiter, who, 0)
    error = (await admit(limiter, who, 0.5)).error()
    assert isinstance(error, RateLimited) and error.status == 429
    assert error.headers["Retry-After"] == "60"
    assert error.headers["retry-after-ms"] == "59500"
    assert error.headers["x-ratelimit-remaining-requests"] == "0"
    assert error.headers["x-ratelimit-reset-requests"] == "59.5s"


async def test_retry_after_is_the_wait_rounded_up_never_down(make_limiter):
    """A 30.4 s wait says Retry-After 31: a client told 30 would come back before the request leaves the window."""
    limiter, who = make_limiter(), tenant(rpm=1)
    await admit(limiter, who, 0)
    refused = await admit(limiter, who, 29.6)
    assert refused.retry_after_s == 30.4
    assert (refused.error().headers["Retry-After"], refused.error().headers["retry-after-ms"]) == ("31", "30400")


async def test_remaining_tokens_is_never_negative(make_limiter):
    """A request that used more than tokens_per_minute leaves nothing remaining: the header says 0, not less."""
    limiter, who = make_limiter(), tenant(tpm=100)
    first = await admit(limiter, who, 0, tokens=10)
    await limiter.settle(who, ticket=first.ticket, reserved_tokens=10, actual_tokens=150, now_s=T0 + 1)
    refused = await admit(limiter, who, 2, tokens=10)
    assert (refused.reason, refused.remaining_tokens) == ("tokens", 0)
    assert refused.headers()["x-ratelimit-remaining-tokens"] == "0"


async def test_tokens_limit_and_wait(make_limiter):
    """Token reservations are refused past tokens_per_minute, with the wait until enough leave."""
    limiter, who = make_limiter(), tenant(tpm=1000)
    assert (await admit(limiter, who, 0, tokens=400)).allowed
    assert (await admit(limiter, who, 10, tokens=400)).allowed
    refused = await admit(limiter, who, 20, tokens=500)
    assert (refused.reason, refused.retry_after_s, refused.remaining_tokens) == ("tokens", 40.0, 200)
    assert (await admit(limiter, who, 60, tokens=500)).allowed


async def test_a_reservation_above_tokens_per_minute_is_too_large_not_told_to_wait(make_limiter):
    """A request reserving more than tokens_per_minute can never be admitted: refused as request_too_large,
    naming the limit and the tokens asked for, with no Retry-After, taking nothing from the window."""
    limiter, who = make_limiter(), tenant(rpm=5, tpm=1000)
    refused = await admit(limiter, who, 0, tokens=1500)
    assert (refused.allowed, refused.reason, refused.ticket) == (False, "too_large", "")
    error = refused.error()
    assert isinstance(error, RateLimited) and error.status == 429 and error.code == "request_too_large"
    assert "limit 1000" in error.message and "requested 1500" in error.message
    assert not {"Retry-After", "retry-after-ms"} & set(error.headers)
    assert (await admit(limiter, who, 90, tokens=1500)).reason == "too_large"       # waiting does not help
    fits = await admit(limiter, who, 90, tokens=1000)
    assert fits.allowed and (fits.remaining_requests, fits.remaining_tokens) == (4, 0)


async def test_all_or_nothing(make_limiter):
    """When one limit refuses, no request slot, token or concurrency slot is consumed."""
    limiter, who = make_limiter(), tenant(rpm=2, tpm=100, concurrent=1)
    first = await admit(limiter, who, 0, tokens=90)
    refused = await admit(limiter, who, 1, tokens=50)
    assert refused.reason == "tokens" and refused.ticket == ""
    await limiter.release(who, ticket=first.ticket)
    second = await admit(limiter, who, 2, tokens=10)
    assert second.allowed
    assert (second.remaining_requests, second.remaining_tokens) == (0, 0)


async def test_reason_is_first_refusing_limit_and_wait_the_longest(make_limiter):
    """With several limits refusing, the reason is the first (requests) and the wait the longest."""
    limiter, who = make_limiter(), tenant(rpm=2, tpm=10)
    await admit(limiter, who, 0, tokens=0)
    await admit(limiter, who, 20, tokens=10)
    refused = await admit(limiter, who, 30, tokens=5)
    assert (refused.reason, refused.retry_after_s) == ("requests", 50.0)


async def test_concurrency_release(make_limiter):
    """The in-flight count refuses past `concurrent` and frees a slot on release, once."""
    limiter, who = make_limiter(), tenant(concurrent=2)
    first, second = await admit(limiter, who, 0), await admit(limiter, who, 0)
    refused = await admit(limiter, who, 0)
    assert (refused.reason, refused.retry_after_s) == ("concurrent", 1.0)
    await limiter.release(who, ticket=first.ticket)
    await limiter.release(who, ticket=first.ticket)
    assert (await admit(limiter, who, 0)).allowed
    assert not (await admit(limiter, who, 0)).allowed
    assert second.allowed


async def test_inflight_slot_expires_after_safety_ttl(make_limiter):
    """A slot never released (a replica died) frees itself after inflight_ttl_s."""
    limiter, who = make_limiter(inflight_ttl_s=5), tenant(concurrent=1)
    assert (await admit(limiter, who, 0)).allowed
    assert not (await admit(limiter, who, 4.999)).allowed
    assert (await admit(limiter, who, 5)).allowed


async def test_settle_gives_tokens_back(make_limiter):
    """Settling below the reservation returns the difference to the window at once."""
    limiter, who = make_limiter(), tenant(tpm=100)
    first = await admit(limiter, who, 0, tokens=80)
    assert not (await admit(limiter, who, 1, tokens=80)).allowed
    await limiter.settle(who, ticket=first.ticket, reserved_tokens=80, actual_tokens=20, now_s=T0 + 1)
    second = await admit(limiter, who, 2, tokens=80)
    assert (second.allowed, second.remaining_tokens) == (True, 0)


async def test_settle_charges_more(make_limiter):
    """Settling above the reservation charges the excess, at the admission's time."""
    limiter, who = make_limiter(), tenant(tpm=100)
    first = await admit(limiter, who, 0, tokens=10)
    await limiter.settle(who, ticket=first.ticket, reserved_tokens=10, actual_tokens=90, now_s=T0 + 5)
    refused = await admit(limiter, who, 10, tokens=20)
    assert (refused.reason, refused.retry_after_s) == ("tokens", 50.0)


async def test_late_settle_charges_excess_now(make_limiter):
    """A request that outlived the window is charged its excess at settle time, not given back."""
    limiter, who = make_limiter(), tenant(tpm=100)
    first = await admit(limiter, who, 0, tokens=10)
    await limiter.settle(who, ticket=first.ticket, reserved_tokens=10, actual_tokens=70, now_s=T0 + 90)
    refused = await admit(limiter, who, 91, tokens=50)
    assert (refused.remaining_tokens, refused.retry_after_s) == (40, 59.0)
    second = await admit(limiter, who, 91, tokens=10)
    await limiter.settle(who, ticket=second.ticket, reserved_tokens=10, actual_tokens=0, now_s=T0 + 200)
    assert (await admit(limiter, who, 200, tokens=100)).allowed


async def test_an_excess_settled_as_its_reservation_leaves_the_window_is_charged_now(make_limiter):
    """Settled exactly 60 s after admission, the reservation has left the window: the excess counts from now,
    not from the reservation's time (which would drop it at once)."""
    limiter, who = make_limiter(), tenant(tpm=100)
    first = await admit(limiter, who, 0, tokens=10)
    await limiter.settle(who, ticket=first.ticket, reserved_tokens=10, actual_tokens=70, now_s=T0 + 60)
    refused = await admit(limiter, who, 60, tokens=50)
    assert (refused.reason, refused.remaining_tokens) == ("tokens", 40)


async def test_unlimited_tenant_always_admitted(make_limiter):
    """A tenant without limits is admitted without touching the store."""
    limiter = make_limiter()
    admission = await admit(limiter, tenant(), 0, tokens=10**9)
    assert admission.allowed and admission.ticket and admission.headers() == {}


async def test_token_wait_found_deep_in_a_long_log(make_limiter):
    """The wait for a large token request is right even when it depends on the 200th entry."""
    limiter, who = make_limiter(), tenant(tpm=300)
    for second in range(300):
        assert (await admit(limiter, who, second * 0.1, tokens=1)).allowed
    refused = await admit(limiter, who, 30, tokens=200)
    assert (refused.reason, refused.retry_after_s) == ("tokens", 49.9)


async def test_memory_and_redis_agree_on_a_random_workload(redis_server):
    """A seeded random mix of admits, settles and releases gets identical answers from both."""
    client = Redis.from_url(redis_server.url)
    limiters = [MemoryLimiter(inflight_ttl_s=20), RedisLimiter(client, "test", 2.0, inflight_ttl_s=20)]
    who, rng = tenant(rpm=12, tpm=600, concurrent=4), random.Random(7)
    tickets: list[list[tuple[str, int]]] = [[], []]
    now_s, outcomes = T0, set()
    try:
        for _ in range(300):
            now_s += rng.choice([0, 0.25, 1, 3])
            op, tokens, pick = rng.random(), rng.randint(0, 120), rng.random()
            answers = []
            for side, limiter in enumerate(limiters):
                if op < 0.6:
                    admission = await limiter.admit(who, route=None, tokens=tokens, now_s=now_s)
                    tickets[side].append((admission.ticket, tokens))
                    answers.append(replace(admission, ticket=""))
                elif tickets[side]:
                    ticket, reserved = tickets[side][int(pick * len(tickets[side]))]
                    if op < 0.8:
                        await limiter.settle(who, ticket=ticket, reserved_tokens=reserved,
                                             actual_tokens=tokens, now_s=now_s)
                    else:
                        await limiter.release(who, ticket=ticket)
            assert answers[:1] == answers[1:]
            outcomes.update(answer.reason or "admitted" for answer in answers)
        assert outcomes == {"admitted", "requests", "tokens", "concurrent"}
    finally:
        await client.aclose()


async def test_memory_limiter_reads_injected_clock():
    """Without now_s the memory limiter asks its injected clock for the time."""
    now_s = [T0]
    limiter, who = MemoryLimiter(clock=lambda: now_s[0]), tenant(rpm=1)
    assert (await limiter.admit(who, route=None, tokens=0)).allowed
    now_s[0] = T0 + 59.5
    assert (await limiter.admit(who, route=None, tokens=0)).retry_after_s == 0.5
    now_s[0] = T0 + 60
    assert (await limiter.admit(who, route=None, tokens=0)).allowed


async def test_three_replicas_never_exceed_the_limit(redis_server):
    """Three limiters on three clients hammering one tenant admit exactly the limit, no more."""
    clients = [Redis.from_url(redis_server.url) for _ in range(3)]
    replicas = [RedisLimiter(client, "test", 2.0, "deny") for client in clients]
    who = tenant(rpm=50, tpm=10_000, concurrent=40)
    try:
        admissions = await asyncio.gather(*(
            replica.admit(who, route="chat", tokens=100) for replica in replicas for _ in range(40)))
        assert sum(a.allowed for a in admissions) == 40
        assert {a.reason for a in admissions if not a.allowed} == {"concurrent"}
        await asyncio.gather(*(replicas[i % 3].release(who, ticket=a.ticket)
                               for i, a in enumerate(admissions) if a.allowed))
        more = await asyncio.gather(*(
            replica.admit(who, route="chat", tokens=100) for replica in replicas for _ in range(10)))
        assert sum(a.allowed for a in more) == 10
        assert {a.reason for a in more if not a.allowed} == {"requests"}
    finally:
        for client in clients:
            await client.aclose()


async def test_one_script_call_per_admission_on_one_slot(redis_server):
    """An admission sends Redis a single EVALSHA, and every key of a tenant maps to one cluster slot."""
    client, watcher = Redis.from_url(redis_server.url), Redis.from_url(redis_server.url)
    limiter, who = RedisLimiter(client, "test", 2.0), tenant(rpm=5, tpm=100, concurrent=2)
    try:
        await limiter.admit(who, route=None, tokens=1)          # loads the script
        async with watcher.monitor() as monitor:
            await limiter.admit(who, route=None, tokens=1)
            await client.echo("done")
            sent = []
            while not sent or sent[-1] != "ECHO done":
                entry = await monitor.next_command()
                if entry["client_type"] != "lua":
                    sent.append(entry["command"])
        assert len(sent) == 2 and sent[0].startswith("EVALSHA ")
    finally:
        await client.aclose()
        await watcher.aclose()
    assert len({key_slot(key.encode()) for key in tenant_keys("gw", "acme")}) == 1


async def test_every_limiter_key_expires_and_none_before_what_it_holds(redis_server):
    """No key of a tenant lives for ever (nor one a late settle makes again, after Redis expired them), and
    none expires while what it holds still counts: window entries for 60 s, in-flight slots for their TTL."""
    client = Redis.from_url(redis_server.url)
    limiter, who = RedisLimiter(client, "test-ttl", 2.0, inflight_ttl_s=900), tenant(rpm=5, tpm=100, concurrent=2)
    req_key, tok_key, sum_key, flight_key = tenant_keys("test-ttl", who.name)
    try:
        admission = await admit(limiter, who, 0, tokens=10)
        assert min([await client.pttl(key) for key in (req_key, tok_key, sum_key)]) > 60_000
        assert await client.pttl(flight_key) > 900_000
        await client.delete(tok_key, sum_key)           # as their TTL would, before a long request ends
        await limiter.settle(who, ticket=admission.ticket, reserved_tokens=10, actual_tokens=50, now_s=T0 + 90)
        assert min([await client.pttl(key) for key in (tok_key, sum_key)]) > 60_000
    finally:
        await client.aclose()


@pytest.mark.parametrize("on_store_failure", ["allow", "deny"])
async def test_store_down_is_answered_not_raised(redis_server, on_store_failure, caplog):
    """With Redis killed, admission follows on_store_failure promptly, warns once, backs off, then recovers.

    During the back-off admissions do not wait for Redis at all; releases and settles (after the response)
    are still tried, so none is skipped once Redis is back."""
    client = CountingRedis.from_url(redis_server.url, socket_connect_timeout=0.2)
    limiter = RedisLimiter(client, "test", 0.5, on_store_failure, backoff_s=0.5)
    who = tenant(rpm=5, tpm=100, concurrent=5)
    try:
        assert (await limiter.admit(who, route=None, tokens=1)).allowed
        redis_server.stop()
        with caplog.at_level(logging.WARNING, logger="gateway.tenancy.limits_redis"):
            started_s = time.monotonic()
            first = await limiter.admit(who, route=None, tokens=1)
            assert time.monotonic() - started_s < 0.7
            sent = len(client.sent)
            second = await limiter.admit(who, route=None, tokens=1)
            assert len(client.sent) == sent                             # Redis not called in the back-off
            await limiter.settle(who, ticket="x", reserved_tokens=1, actual_tokens=2)
            await limiter.release(who, ticket="x")
            assert len(client.sent) > sent                              # ... but the writes after it are tried
        assert limiter.store_failures == 4 and len(caplog.records) == 1
        if on_store_failure == "allow":
            assert first.allowed and first.degraded and second.allowed and second.degraded
        else:
            assert (first.allowed, first.reason, first.error().status) == (False, "store_unavailable", 503)
            assert (first.error().headers["Retry-After"], first.error().headers["retry-after-ms"]) == ("1", "1000")
            assert second.reason == "store_unavailable"
        redis_server.start()
        await asyncio.sleep(0.6)                                    # the back-off ends
        recovered = await limiter.admit(who, route=None, tokens=1)
        assert recovered.allowed and not recovered.degraded
    finally:
        await client.aclose()


async def test_hung_store_times_out():
    """A store that accepts connections but never answers costs at most timeout_s per call."""
    async def silent(reader, writer):
        await reader.read(-1)
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = Redis(host="127.0.0.1", port=port)
    limiter = RedisLimiter(client, "test", 0.2, "deny")
    try:
        started_s = time.monotonic()
        admission = await limiter.admit(tenant(rpm=1), route=None, tokens=0)
        assert time.monotonic() - started_s < 1.0
        assert admission.reason == "store_unavailable"
    finally:
        await client.aclose()
        server.close()


@pytest.mark.parametrize(("seconds", "text"), [
    (0.012, "12ms"), (1, "1s"), (1.5, "1.5s"), (59.999, "59.999s"), (60, "1m0s"), (360, "6m0s"),
    (3600, "1h0m0s"), (3723.25, "1h2m3.25s"), (-1, "0ms")])
def test_format_reset(seconds, text):
    """Durations print like OpenAI's x-ratelimit-reset-* values."""
    assert format_reset(seconds) == text


async def test_end_releases_the_slot_and_settles_the_tokens(make_limiter):
    """end() frees the in-flight slot and rewrites the reservation to the tokens used, as release + settle do."""
    limiter, who = make_limiter(), tenant(tpm=100, concurrent=1)
    first = await admit(limiter, who, 0, tokens=80)
    assert (await admit(limiter, who, 1, tokens=10)).reason == "concurrent"
    await limiter.end(who, ticket=first.ticket, reserved_tokens=80, actual_tokens=20, now_s=T0 + 1)
    second = await admit(limiter, who, 2, tokens=80)
    assert second.allowed and second.remaining_tokens == 0       # 20 used + 80 reserved
    await limiter.end(who, ticket=second.ticket, reserved_tokens=80, actual_tokens=80, now_s=T0 + 3)
    assert (await admit(limiter, who, 4)).allowed                # same count: only the slot was freed


async def test_withdraw_takes_back_the_request_the_tokens_and_the_slot(make_limiter):
    """A withdrawn admission (its request refused after all) leaves no request, token or slot behind, twice over."""
    limiter, who = make_limiter(), tenant(rpm=1, tpm=100, concurrent=1)
    admission = await admit(limiter, who, 0, tokens=80)
    for _ in range(2):
        assert await limiter.withdraw(who, ticket=admission.ticket, reserved_tokens=80, now_s=T0 + 1)
    again = await admit(limiter, who, 2, tokens=100)
    assert again.allowed and (again.remaining_requests, again.remaining_tokens) == (0, 0)
    assert (await admit(limiter, who, 3)).reason == "requests"


async def test_usage_counts_what_is_inside_the_window_only(make_limiter):
    """GET /admin/tenants' usage counts a request and its tokens for 60 s, not at 60 s; its slot until it ends."""
    limiter, who = make_limiter(), tenant(rpm=5, tpm=100, concurrent=5)
    await admit(limiter, who, 0, tokens=30)
    assert await limiter.usage(who, now_s=T0 + 59.999) == LimitUsage(1, 30, 1)
    assert await limiter.usage(who, now_s=T0 + 60) == LimitUsage(0, 0, 1)


async def test_withdrawing_gives_back_the_request_of_a_tenant_without_a_token_limit(make_limiter):
    """A tenant limited by requests and concurrency only: a withdrawn admission frees its request too."""
    limiter, who = make_limiter(), tenant(rpm=1, concurrent=1)
    admission = await admit(limiter, who, 0)
    assert await limiter.withdraw(who, ticket=admission.ticket, reserved_tokens=0, now_s=T0 + 1)
    again = await admit(limiter, who, 2)
    assert again.allowed and again.remaining_requests == 0


async def test_redis_end_is_one_round_trip(redis_server):
    """With both a token and a concurrency limit, ending an admission sends one script call, no separate ZREM."""
    client = CountingRedis.from_url(redis_server.url)
    try:
        limiter, who = RedisLimiter(client, "test-end", 2.0, "allow"), tenant(tpm=100, concurrent=1)
        assert await limiter.warm_up()                           # scripts loaded, as at start-up
        admission = await admit(limiter, who, 0, tokens=50)
        client.sent.clear()
        await limiter.end(who, ticket=admission.ticket, reserved_tokens=50, actual_tokens=10, now_s=T0 + 1)
        assert client.sent == ["EVALSHA"]
        usage = await limiter.usage(who, now_s=T0 + 2)
        assert (usage.concurrent, usage.tokens) == (0, 10)
    finally:
        await client.aclose()


async def test_redis_limiter_loads_its_scripts_again_when_the_server_lost_them(redis_server):
    """After SCRIPT FLUSH (a restarted or flushed Redis) admissions, settles and usage still count, not fail open."""
    client = Redis.from_url(redis_server.url)
    try:
        limiter, who = RedisLimiter(client, "test", 2.0, "deny"), tenant(rpm=2, tpm=100)
        await client.script_flush()
        first = await admit(limiter, who, 0, tokens=50)
        assert first.allowed and not first.degraded
        await client.script_flush()
        await limiter.settle(who, ticket=first.ticket, reserved_tokens=50, actual_tokens=20, now_s=T0 + 1)
        await client.script_flush()
        assert (await limiter.usage(who, now_s=T0 + 2)).tokens == 20
        assert (await admit(limiter, who, 3)).allowed
        assert (await admit(limiter, who, 4)).reason == "requests"
        assert limiter.store_failures == 0
    finally:
        await client.aclose()


async def test_a_burst_larger_than_the_pool_waits_for_connections_instead_of_failing(redis_server):
    """More concurrent admissions than pooled connections on a healthy Redis: they wait their turn (within the
    store timeout); none is refused or admitted degraded as if Redis were down."""
    from gateway.stores import redis_client

    client = redis_client(redis_server.url, 2.0, 4, cluster=False)
    limiter, who = RedisLimiter(client, "test-burst", 2.0, "deny"), tenant(rpm=1000)
    try:
        admissions = await asyncio.gather(*(limiter.admit(who, route=None, tokens=1) for _ in range(40)))
        assert all(a.allowed and not a.degraded for a in admissions)
        assert limiter.store_failures == 0
        assert client.connection_pool.max_connections == 4     # the pool stayed 4 connections
    finally:
        await client.aclose()
