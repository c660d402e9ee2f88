"""Budget flushes Redis did not answer are sent again, applied once, in order, and given up only after the retry
window; the admin report shows what requests in flight hold."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from decimal import Decimal

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster as ClusterClient

from gateway.policy.model import Budget, Tenant
from gateway.tasks import BackgroundTasks
from gateway.tenancy.budgets import RETENTION_S, Periods
from gateway.tenancy.budgets_memory import MemoryBudgets
from gateway.tenancy.budgets_redis import LATE_FLUSH_S, RedisBudgets

#: a flush waits this long for Redis before it counts as unanswered
TIMEOUT_S = 0.1


def tenant(name: str = "acme", per_day: str = "1.00") -> Tenant:
    """A tenant with a day budget."""
    return Tenant(name, budget=Budget(usd_per_day=Decimal(per_day)))


async def spent_day_nanos(client, budgets: RedisBudgets, who: Tenant) -> int:
    """The tenant's day total as Redis holds it, without this replica's pending parts."""
    return int(await client.get(budgets.keys(who.name, Periods.at(time.time()))[0]) or 0)


async def first_try_failed(budgets: RedisBudgets, who: Tenant, timeout_s: float = 2.0) -> None:
    """Wait until a call carrying the tenant's charges went unanswered."""
    deadline_s = time.monotonic() + timeout_s
    while not budgets._failed(who.name):
        assert time.monotonic() < deadline_s, "the flush never failed"
        await asyncio.sleep(0.01)


@contextlib.contextmanager
def frozen(redis_server):
    """Redis stopped (SIGSTOP) while the block runs: it takes commands and answers none until thawed."""
    os.kill(redis_server.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(redis_server.process.pid, signal.SIGCONT)


async def charge_unanswered(budgets: RedisBudgets, who: Tenant, usd: str) -> asyncio.Task:
    """A charge whose flush has gone unanswered once (Redis is frozen, or refusing), still waiting to land."""
    charging = asyncio.create_task(budgets.charge(who, Decimal(usd)))
    await first_try_failed(budgets, who)
    return charging


async def flush_calls(client) -> int:
    """The script calls Redis has run (EVALSHA, flushes here)."""
    return (await client.info("commandstats")).get("cmdstat_evalsha", {}).get("calls", 0)


@pytest.fixture
async def client(redis_server):
    """A client of a fresh redis-server with the flush script loaded (no NOSCRIPT detour in the counts)."""
    client = Redis.from_url(redis_server.url, socket_connect_timeout=0.2)
    yield client
    await client.aclose()


async def test_a_flush_applied_with_its_reply_lost_is_sent_again_and_not_applied_twice(redis_server, client):
    """Redis applied the flush but its reply never came (Redis stalled past the timeout): the retry reaches Redis,
    which skips the part it holds, so the charge counts once and nothing is lost."""
    budgets, who = RedisBudgets(client, "t1", TIMEOUT_S, retry_s=0.2), tenant()
    await client.script_load(budgets.flush_script.script)
    with frozen(redis_server):
        charging = await charge_unanswered(budgets, who, "0.30")
    observer = Redis.from_url(redis_server.url)
    try:
        assert await spent_day_nanos(observer, budgets, who) == 300_000_000    # the late call ran on resuming
        calls = await flush_calls(observer)
        await asyncio.wait_for(charging, 3)
        assert await flush_calls(observer) == calls + 1                         # sent again...
        assert await spent_day_nanos(observer, budgets, who) == 300_000_000    # ...and skipped
        assert (budgets.charges_lost, budgets._unlanded) == (0, {})
    finally:
        await observer.aclose()


async def test_a_flush_redis_never_received_is_applied_on_retry(redis_server, client):
    """Redis was down when the flush was sent: once it is back, the retry adds the charge."""
    budgets, who = RedisBudgets(client, "t2", TIMEOUT_S, retry_s=0.2), tenant()
    redis_server.stop()
    charging = await charge_unanswered(budgets, who, "0.30")
    redis_server.start()
    await asyncio.wait_for(charging, 3)
    assert await spent_day_nanos(client, budgets, who) == 300_000_000
    assert budgets.charges_lost == 0


async def test_the_holds_of_a_refused_flush_are_given_back_on_retry(redis_server, client):
    """A flush Redis refused (out of memory) kept its holds, which other replicas count; its retry gives them back
    within seconds, not after the 15-minute hold TTL."""
    replica, other, who = RedisBudgets(client, "t3", TIMEOUT_S), RedisBudgets(client, "t3", TIMEOUT_S), tenant()
    _, hold = await replica.reserve(who, Decimal("0.90"), "first")
    assert hold is not None
    await client.config_set("maxmemory", 1)
    try:
        settling = asyncio.create_task(replica.settle(who, hold, Decimal("0.10")))
        await first_try_failed(replica, who)
    finally:
        await client.config_set("maxmemory", 0)
    refused, _ = await other.reserve(who, Decimal("0.50"), "second")
    assert refused.exhausted and refused.by_holds                   # the hold is still in Redis
    started_s = time.monotonic()
    await asyncio.wait_for(settling, 5)
    assert time.monotonic() - started_s < 2.5                        # one retry, STORE_RETRY_S later
    state, second = await other.reserve(who, Decimal("0.50"), "second")
    assert second is not None and state.spent_day_usd == Decimal("0.10")


async def test_a_later_flush_carries_an_earlier_unanswered_one_in_order(redis_server, client):
    """A flush sent after an unanswered one carries it in the same call, before its own part: both land at once
    (long before the retry would), the earlier first, and the marker ends at the later one's number."""
    budgets, who = RedisBudgets(client, "t4", TIMEOUT_S, retry_s=10.0), tenant()
    await client.script_load(budgets.flush_script.script)
    await client.config_set("maxmemory", 1)
    try:
        first = await charge_unanswered(budgets, who, "0.10")
    finally:
        await client.config_set("maxmemory", 0)
    calls = await flush_calls(client)
    await asyncio.wait_for(asyncio.gather(first, budgets.charge(who, Decimal("0.20"))), 2)
    assert await flush_calls(client) == calls + 1
    assert await spent_day_nanos(client, budgets, who) == 300_000_000
    assert int(await client.get(budgets.applied_key(who.name))) == budgets._flushes == 2


async def test_a_stale_earlier_call_never_lands_after_a_later_one(redis_server, client):
    """Two calls stalled in a frozen Redis, the second carrying the first's part: whichever Redis runs first, each
    charge lands once, and the retries after add nothing."""
    budgets, who = RedisBudgets(client, "t5", TIMEOUT_S, retry_s=0.2), tenant()
    await client.script_load(budgets.flush_script.script)
    with frozen(redis_server):
        first = await charge_unanswered(budgets, who, "0.10")
        second = asyncio.create_task(budgets.charge(who, Decimal("0.20")))
        await asyncio.sleep(0.05)
        while len(budgets._failed(who.name)) < 2:
            await asyncio.sleep(0.01)
    await asyncio.wait_for(asyncio.gather(first, second), 3)
    assert await spent_day_nanos(client, budgets, who) == 300_000_000
    assert budgets.charges_lost == 0


async def test_reads_while_a_retry_is_pending_count_each_charge_once(redis_server, client):
    """While retries are pending, reads and reservations count a part Redis applied (reply lost) from Redis alone,
    and one it did not apply from this replica: each charge once."""
    budgets, who = RedisBudgets(client, "t6", TIMEOUT_S, retry_s=5.0, backoff_s=0.0), tenant()
    await client.script_load(budgets.flush_script.script)
    with frozen(redis_server):
        applied = await charge_unanswered(budgets, who, "0.40")
    await client.config_set("maxmemory", 1)
    try:
        refused = asyncio.create_task(budgets.charge(who, Decimal("0.20")))
        while len(budgets._failed(who.name)) < 2:
            await asyncio.sleep(0.01)
    finally:
        await client.config_set("maxmemory", 0)
    assert await spent_day_nanos(client, budgets, who) == 400_000_000             # the first is in Redis
    assert (await budgets.read(who)).spent_day_usd == Decimal("0.60")
    too_much, _ = await budgets.reserve(who, Decimal("0.50"), "big")
    fits, hold = await budgets.reserve(who, Decimal("0.35"), "small")
    assert too_much.exhausted and not fits.exhausted and hold is not None
    assert (fits.spent_day_usd, (await budgets.usage(who)).spent_day_usd) == (Decimal("0.60"), Decimal("0.60"))
    assert applied.done() and not refused.done()     # the marker a read saw landed the applied one: no retry
    await asyncio.wait_for(asyncio.gather(applied, refused), 8)
    assert budgets.charges_lost == 0
    assert await spent_day_nanos(client, budgets, who) == 600_000_000


async def test_a_flush_unanswered_past_the_retry_window_is_given_up_and_counted(redis_server, client):
    """With Redis away for longer than the retry window, the charge returns once the window has passed, counted
    as lost beside each failed try, and nothing is sent after."""
    budgets, who = RedisBudgets(client, "t7", TIMEOUT_S, retry_s=0.1, late_flush_s=0.5), tenant()
    redis_server.stop()
    started_s = time.monotonic()
    await asyncio.wait_for(budgets.charge(who, Decimal("0.30")), 3)
    assert time.monotonic() - started_s >= 0.5
    assert budgets.charges_lost == 1 and budgets.store_failures == budgets.guard.failures + 1
    assert budgets.guard.failures >= 2                                  # the first try and its retries
    assert (budgets._unlanded, budgets._retrying) == ({}, {})
    redis_server.start()
    await asyncio.sleep(0.3)
    assert await spent_day_nanos(client, budgets, who) == 0


async def test_a_drain_that_runs_out_stops_the_retries(redis_server, client, caplog):
    """Shutdown's drain waits for a charge being retried only its grace period: then the charge is cancelled with
    a warning, its retries stop, and its loss is counted."""
    budgets, who, background = RedisBudgets(client, "t8", TIMEOUT_S, retry_s=0.1), tenant(), BackgroundTasks()
    redis_server.stop()
    background.spawn(budgets.charge(who, Decimal("0.30")), name="budget-charge")
    started_s = time.monotonic()
    with caplog.at_level(logging.WARNING):
        await background.drain(timeout_s=0.5)
    assert time.monotonic() - started_s < 2.0
    assert "background task(s) still running after 0.5 s, cancelled: budget-charge" in caplog.text
    await asyncio.sleep(0)
    assert (budgets._retrying, budgets._unlanded, budgets.charges_lost) == ({}, {}, 1)


async def test_a_flush_retry_on_a_cluster_gives_back_holds_and_charges_once(cluster):
    """On a Redis Cluster, a refused flush (the tenant's node out of memory) is retried on the tenant's slot: its
    charge lands once and its hold is given back, as the usage report (one script on that slot) shows."""
    client = ClusterClient.from_url(cluster.url)
    who = tenant("acme-flush-retry")
    budgets = RedisBudgets(client, f"retry{time.time_ns()}", 0.5, retry_s=0.2)
    day_key = budgets.keys(who.name, Periods.at(time.time()))[0]
    try:
        _, hold = await budgets.reserve(who, Decimal("0.90"), "first")
        assert hold is not None
        node = client.get_node_from_key(day_key)
        await client.config_set("maxmemory", 1, target_nodes=node)
        try:
            settling = asyncio.create_task(budgets.settle(who, hold, Decimal("0.10")))
            await first_try_failed(budgets, who)
        finally:
            await client.config_set("maxmemory", 0, target_nodes=node)
        assert (await budgets.usage(who)).held_usd == Decimal("0")     # counted as given back while it waits
        await asyncio.wait_for(settling, 3)
        assert int(await client.get(day_key)) == 100_000_000
        assert not await client.exists(*budgets.holds_keys(who.name))
        usage = await budgets.usage(who)
        assert (usage.spent_day_usd, usage.held_usd) == (Decimal("0.1"), Decimal("0"))
        assert (budgets.charges_lost, budgets._unlanded) == (0, {})
    finally:
        await client.aclose()


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_usage_reports_what_requests_in_flight_hold(redis_server, store):
    """The admin report shows what the tenant's requests in flight hold, in plain USD, without counting it as
    spent; given back, it shows zero."""
    client = Redis.from_url(redis_server.url) if store == "redis" else None
    budgets = RedisBudgets(client, "t9", 2.0) if client is not None else MemoryBudgets()
    who = tenant(per_day="0.30")
    try:
        _, hold = await budgets.reserve(who, Decimal("0.25"), "in-flight")
        report = json.loads(json.dumps((await budgets.usage(who)).to_dict()))
        assert (report["held_usd"], report["spent_day_usd"], report["exhausted"]) == ("0.25", "0", False)
        await budgets.settle(who, hold, Decimal("0.00000001"))
        report = (await budgets.usage(who)).to_dict()
        assert (report["held_usd"], report["spent_day_usd"]) == ("0", "0.00000001")
    finally:
        if client is not None:
            await client.aclose()


async def test_a_flush_that_fails_half_way_is_never_applied_again(redis_server, client):
    """A flush script that fails after its first write (the month total is no integer: someone edited it) is
    not applied again by the calls sent after it: the day is charged once, not once per retry."""
    budgets = RedisBudgets(client, "t10", TIMEOUT_S, retry_s=0.05, late_flush_s=0.5)
    who = Tenant("acme", budget=Budget(usd_per_day=Decimal("100"), usd_per_month=Decimal("1000")))
    day_key, month_key = budgets.keys(who.name, Periods.at(time.time()))
    await client.set(month_key, "12.5")
    await asyncio.wait_for(budgets.charge(who, Decimal("1.00")), 5)
    assert int(await client.get(day_key)) == 10**9


async def test_a_redis_slower_than_the_store_timeout_still_lands_each_flush_once(redis_server):
    """Replies slower than the store timeout (but within a second) neither send a flush again nor count it
    lost: a flush call waits longer than the calls a response waits for."""
    from tests.support.redis_delay import DelayingRedisProxy
    proxy = DelayingRedisProxy(redis_server.port, 0.0).start()
    slow = Redis.from_url(proxy.url, socket_connect_timeout=0.5)
    try:
        budgets, who = RedisBudgets(slow, "t11", TIMEOUT_S, retry_s=0.1, late_flush_s=1.0), tenant()
        await slow.script_load(budgets.flush_script.script)
        proxy.delay_s = 0.3                 # three times the store timeout
        await asyncio.wait_for(budgets.charge(who, Decimal("0.25")), 5)
        proxy.delay_s = 0.0
        assert budgets.charges_lost == 0 and await spent_day_nanos(slow, budgets, who) == 250_000_000
        assert (await slow.info("commandstats"))["cmdstat_evalsha"]["calls"] == 1
    finally:
        await slow.aclose()
        proxy.stop()


async def test_the_applied_flush_marker_outlives_the_retry_window_and_then_lapses(redis_server, client):
    """The marker that keeps a flush sent again from being applied twice lives longer than a flush is retried
    (LATE_FLUSH_S), else a late retry would charge again; and it lapses (RETENTION_S), never kept for ever."""
    budgets, who = RedisBudgets(client, "t12", TIMEOUT_S), tenant()
    await budgets.charge(who, Decimal("0.10"))
    assert LATE_FLUSH_S < await client.ttl(budgets.applied_key(who.name)) <= RETENTION_S
