"""Budget holds: a request reserves its predicted cost, in memory or in Redis, and gives it back once, charged."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from redis.asyncio import Redis

from gateway.errors import BudgetExceeded
from gateway.policy.model import Budget, Tenant
from gateway.responses import error_response
from gateway.tenancy.budgets import HELD_RETRY_S, BudgetState
from gateway.tenancy import budgets_redis
from gateway.tenancy.budgets_memory import MemoryBudgets
from gateway.tenancy.budgets_redis import RedisBudgets
from tests.support.redis_counting import CountingRedis

#: 2025-01-30 18:00:00 UTC: six hours before the day ends
EVENING_S = datetime(2025, 1, 30, 18, tzinfo=UTC).timestamp()
ROOT = Path(__file__).resolve().parent.parent


def tenant(per_day: str | None = "1.00", name: str = "acme") -> Tenant:
    """A tenant with a day budget (None: no budget)."""
    return Tenant(name, budget=Budget(usd_per_day=None if per_day is None else Decimal(per_day)))


@pytest.fixture(params=["memory", "redis"])
async def make_budgets(request):
    """A factory of budgets of one kind, sharing one store: Redis ones are replicas, each with its own client."""
    if request.param == "memory":
        shared = MemoryBudgets()
        yield lambda: shared
        return
    server = request.getfixturevalue("redis_server")
    clients: list[Redis] = []

    def make():
        clients.append(Redis.from_url(server.url))
        return RedisBudgets(clients[-1], "test", 2.0, "allow")

    yield make
    for client in clients:
        await client.aclose()


async def held_nanos(budgets) -> int:
    """What the tenant acme's requests in flight hold, as the store keeps it."""
    if isinstance(budgets, MemoryBudgets):
        return budgets.held_nanos.get("acme", 0)
    return int(await budgets.client.get(budgets.holds_keys("acme")[1]) or 0)


async def test_holds_admit_only_as_many_requests_as_the_budget_covers(make_budgets):
    """With 0.30 of 1.00 left, ten requests predicted at 0.10 each asking at once get three holds; the others are
    refused for what the requests in flight hold, told to come back in a second, not at midnight."""
    budgets, who = make_budgets(), tenant()
    await budgets.charge(who, Decimal("0.70"), EVENING_S)
    answers = await asyncio.gather(*(budgets.reserve(who, Decimal("0.10"), f"t{i}", EVENING_S) for i in range(10)))
    holds = [hold for _, hold in answers if hold is not None]
    assert len(holds) == 3 and await held_nanos(budgets) == 300_000_000
    refused = next(state for state, hold in answers if hold is None)
    assert (refused.exhausted, refused.reason, refused.by_holds, refused.retry_after_s) == (True, "day", True,
                                                                                        HELD_RETRY_S)
    assert refused.spent_day_usd == Decimal("0.7") and refused.held_usd == Decimal("0.3")
    error = refused.error()
    assert isinstance(error, BudgetExceeded) and error.headers == {"Retry-After": "1"}
    assert "spent or reserved by requests in flight" in error.message


async def test_a_settled_hold_leaves_room_for_the_next_request_at_once(make_budgets):
    """A request that ends gives its hold back and is charged its real cost in one step: the next request of the
    same replica, even before the charge's flush lands, sees the room it left and neither the hold nor the charge
    twice."""
    budgets, who = make_budgets(), tenant()
    _, first = await budgets.reserve(who, Decimal("0.50"), "first", EVENING_S)
    _, second = await budgets.reserve(who, Decimal("0.50"), "second", EVENING_S)
    assert first is not None and second is not None
    settling = asyncio.ensure_future(budgets.settle(who, first, Decimal("0.20"), EVENING_S))
    await asyncio.sleep(0)
    state, third = await budgets.reserve(who, Decimal("0.30"), "third", EVENING_S)
    assert third is not None, state                 # 0.20 spent + 0.50 held + 0.30 fits 1.00
    await settling
    assert await held_nanos(budgets) == 800_000_000
    assert (await budgets.check(who, EVENING_S)).spent_day_usd == Decimal("0.2")


async def test_a_hold_is_given_back_only_once(make_budgets):
    """Giving a hold back twice (a retry), or one never taken, frees nothing held by the other requests."""
    budgets, who = make_budgets(), tenant()
    _, mine = await budgets.reserve(who, Decimal("0.40"), "mine", EVENING_S)
    _, theirs = await budgets.reserve(who, Decimal("0.40"), "theirs", EVENING_S)
    await budgets.settle(who, mine, Decimal(0), EVENING_S)
    await budgets.settle(who, mine, Decimal(0), EVENING_S)
    await budgets.settle(who, type(mine)("never-taken", 400_000_000), Decimal(0), EVENING_S)
    assert theirs is not None and await held_nanos(budgets) == 400_000_000


async def test_a_request_predicted_to_cost_nothing_takes_no_hold(make_budgets):
    """A free request is only checked against what is spent: it holds nothing, and holds do not refuse it."""
    budgets, who = make_budgets(), tenant()
    _, held = await budgets.reserve(who, Decimal("1.00"), "all", EVENING_S)
    state, hold = await budgets.reserve(who, Decimal(0), "free", EVENING_S)
    assert held is not None and hold is None and not state.exhausted


async def test_a_tenant_without_a_budget_holds_nothing(make_budgets):
    """A tenant without a budget is never held for its requests' cost, in memory as in Redis: nothing to give back."""
    budgets = make_budgets()
    state, hold = await budgets.reserve(tenant(None), Decimal("0.50"), "free", EVENING_S)
    assert hold is None and not state.exhausted and await held_nanos(budgets) == 0


async def test_a_budget_of_zero_refuses_every_request_and_holds_nothing(make_budgets):
    """usd_per_day: 0 is a spent budget, not no budget: a request predicted to cost something is refused until
    midnight and the store holds nothing for it."""
    budgets, who = make_budgets(), tenant("0")
    state, hold = await budgets.reserve(who, Decimal("0.01"), "any", EVENING_S)
    assert hold is None and (state.exhausted, state.reason, state.by_holds) == (True, "day", False)
    assert state.retry_after_s == pytest.approx(6 * 3600) and await held_nanos(budgets) == 0


async def test_a_request_costing_exactly_what_is_left_waits_only_for_the_holds_in_flight(make_budgets):
    """With 0.50 spent and 0.20 held, a request predicted at the 0.50 left is refused for the holds in flight and
    told to come back in a second, not that it costs more than is left and to wait for midnight."""
    budgets, who = make_budgets(), tenant()
    await budgets.charge(who, Decimal("0.50"), EVENING_S)
    _, held = await budgets.reserve(who, Decimal("0.20"), "in-flight", EVENING_S)
    state, hold = await budgets.reserve(who, Decimal("0.50"), "exact", EVENING_S)
    assert held is not None and hold is None
    assert (state.by_holds, state.retry_after_s, state.cost_usd) == (True, HELD_RETRY_S, None)
    assert state.error().headers == {"Retry-After": "1"}


async def test_replicas_share_the_holds_in_redis(redis_server):
    """A hold taken through one replica refuses a request through another until it is given back."""
    first, second = Redis.from_url(redis_server.url), Redis.from_url(redis_server.url)
    try:
        one, two, who = RedisBudgets(first, "test-shared"), RedisBudgets(second, "test-shared"), tenant()
        _, hold = await one.reserve(who, Decimal("0.60"), "one", EVENING_S)
        state, refused = await two.reserve(who, Decimal("0.60"), "two", EVENING_S)
        assert hold is not None and refused is None and state.by_holds
        await one.settle(who, hold, Decimal("0.10"), EVENING_S)
        _, admitted = await two.reserve(who, Decimal("0.60"), "two", EVENING_S)
        assert admitted is not None
    finally:
        await first.aclose()
        await second.aclose()


#: a replica that takes a hold of 0.90 of the tenant acme's 1.00, says so, and waits to be killed
DOOMED_REPLICA = """
import asyncio, sys
from decimal import Decimal
from redis.asyncio import Redis
from gateway.policy.model import Budget, Tenant
from gateway.tenancy.budgets_redis import RedisBudgets

async def main():
    budgets = RedisBudgets(Redis.from_url(sys.argv[1]), "test-doomed", 2.0, hold_ttl_s=float(sys.argv[2]))
    _, hold = await budgets.reserve(Tenant("acme", budget=Budget(usd_per_day=Decimal(1))), Decimal("0.9"), "doomed")
    print("held" if hold else "refused", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_a_hold_of_a_killed_replica_lapses_after_its_ttl(redis_server):
    """A replica killed with a request in flight never gives its hold back: the hold refuses others until its TTL
    has passed, then leaves the tenant's held sum."""
    hold_ttl_s = 1.0
    replica = subprocess.Popen([sys.executable, "-c", DOOMED_REPLICA, redis_server.url, str(hold_ttl_s)],
                               cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    client = Redis.from_url(redis_server.url)
    try:
        assert replica.stdout.readline().strip() == "held"
        held_at_s = time.monotonic()
        replica.kill()
        replica.wait(5)
        survivor, who = RedisBudgets(client, "test-doomed", hold_ttl_s=hold_ttl_s), tenant()
        state, refused = await survivor.reserve(who, Decimal("0.5"), "early")
        assert refused is None and state.held_usd == Decimal("0.9")
        await asyncio.sleep(max(0.0, held_at_s + hold_ttl_s + 0.1 - time.monotonic()))
        _, admitted = await survivor.reserve(who, Decimal("0.5"), "late")
        assert admitted is not None
        assert int(await client.get(survivor.holds_keys("acme")[1])) == 500_000_000
        assert await client.zrange(survivor.holds_keys("acme")[0], 0, -1) == [b"late:500000000"]
    finally:
        if replica.poll() is None:
            replica.kill()
        await client.aclose()


async def test_the_held_sum_lapses_with_the_holds_no_replica_gave_back(redis_server):
    """Holds never given back (their replica died), with no reservation of the tenant since: once their keys
    lapse, their sum is gone from Redis too, and does not refuse the tenant's next requests for ever."""
    client = Redis.from_url(redis_server.url)
    try:
        budgets, who = RedisBudgets(client, "test-orphan", hold_ttl_s=0.05), tenant()
        _, orphan = await budgets.reserve(who, Decimal("0.90"), "orphan")
        holds_key, sum_key = budgets.holds_keys(who.name)
        assert orphan is not None
        await asyncio.sleep(await client.pttl(holds_key) / 1000 + 0.05)      # the hold's TTL and 1 s
        assert not await client.exists(holds_key) and not await client.exists(sum_key)
        _, admitted = await budgets.reserve(who, Decimal("0.50"), "next")
        assert admitted is not None and await held_nanos(budgets) == 500_000_000
    finally:
        await client.aclose()


async def test_a_lapsed_hold_leaves_the_held_sum_while_other_holds_remain(redis_server):
    """A hold past its TTL is dropped from the held sum by the next reservation even while other requests still
    hold theirs: with 0.30 held and a lapsed 0.50, a request of 0.60 fits 1.00."""
    client = Redis.from_url(redis_server.url)
    try:
        alive, dying, who = RedisBudgets(client, "test-lapse"), RedisBudgets(client, "test-lapse", hold_ttl_s=0.1), \
            tenant()
        _, held = await alive.reserve(who, Decimal("0.30"), "alive")
        _, orphan = await dying.reserve(who, Decimal("0.50"), "orphan")
        assert held is not None and orphan is not None
        await asyncio.sleep(0.2)
        _, admitted = await alive.reserve(who, Decimal("0.60"), "next")
        assert admitted is not None and await held_nanos(alive) == 900_000_000
    finally:
        await client.aclose()


async def test_the_usage_report_leaves_out_holds_past_their_ttl(redis_server):
    """A hold past its TTL (its replica died) no longer shows as held in the admin report, though no reservation
    has dropped it from Redis yet."""
    client = Redis.from_url(redis_server.url)
    try:
        budgets, who = RedisBudgets(client, "test-lapsed", hold_ttl_s=0.1), tenant()
        await budgets.reserve(who, Decimal("0.90"), "orphan")
        assert (await budgets.usage(who)).held_usd == Decimal("0.9")
        await asyncio.sleep(0.2)
        assert (await budgets.usage(who)).held_usd == 0
        assert await client.zcard(budgets.holds_keys(who.name)[0]) == 1     # still in Redis, yet lapsed
    finally:
        await client.aclose()


async def test_a_lapsed_hold_given_back_late_is_left_out_of_the_usage_report_once(redis_server, monkeypatch):
    """A request that outlived its hold's TTL gives the lapsed hold back: while the give-back waits for its flush,
    the admin report shows what the other request in flight holds (0.50), not that less the lapsed 0.30 again."""
    monkeypatch.setattr(budgets_redis, "CHARGE_FLUSH_S", 0.5)     # the give-back gathers for its flush meanwhile
    client = Redis.from_url(redis_server.url)
    try:
        late, alive, who = RedisBudgets(client, "test-late", hold_ttl_s=0.1), RedisBudgets(client, "test-late"), \
            tenant()
        _, lapsing = await late.reserve(who, Decimal("0.30"), "lapsing")
        _, held = await alive.reserve(who, Decimal("0.50"), "held")
        assert lapsing is not None and held is not None
        deadline_s = time.monotonic() + 5
        while (await late.usage(who)).held_usd != Decimal("0.5"):      # the 0.30 hold has lapsed
            assert time.monotonic() < deadline_s, "the hold never lapsed"
            await asyncio.sleep(0.01)
        giving_back = asyncio.ensure_future(late.settle(who, lapsing, Decimal(0)))
        await asyncio.sleep(0)                                       # gathering for the next flush
        report = await late.usage(who)
        assert not giving_back.done()
        await giving_back
        assert report.held_usd == Decimal("0.5")
    finally:
        await client.aclose()


async def test_a_tenant_without_a_budget_sends_no_reservation(redis_server):
    """Reserving for a tenant without a budget sends Redis nothing; a budgeted one's reservation is the one script
    call that also reads the spend (no separate read)."""
    client = CountingRedis.from_url(redis_server.url)
    try:
        budgets = RedisBudgets(client, "test-count", 2.0, "allow")
        _, hold = await budgets.reserve(tenant(None), Decimal("0.5"), "free")
        assert hold is None and client.sent == []
        await budgets.reserve(tenant(), Decimal("0.1"), "warm")          # loads the script
        client.sent.clear()
        _, hold = await budgets.reserve(tenant(), Decimal("0.1"), "paid")
        assert hold is not None and client.sent == ["EVALSHA"]
    finally:
        await client.aclose()


async def test_a_hold_redis_did_not_answer_is_still_given_back(redis_server):
    """Redis stalled past the timeout (on_store_failure: allow): the request is let through with its hold all the
    same, so the reservation the stalled Redis runs once it resumes is given back, not held for the TTL."""
    client = Redis.from_url(redis_server.url)
    try:
        budgets, who = RedisBudgets(client, "test-stall", 0.1, "allow"), tenant()
        await budgets.reserve(who, Decimal("0.1"), "warm")          # the script is loaded before the stall
        redis_server.process.send_signal(signal.SIGSTOP)
        try:
            state, hold = await budgets.reserve(who, Decimal("0.5"), "stalled")
            assert not state.available and not state.exhausted and hold is not None
        finally:
            redis_server.process.send_signal(signal.SIGCONT)
        members = set(await client.zrange(budgets.holds_keys("acme")[0], 0, -1))
        assert members == {b"warm:100000000", b"stalled:500000000"}     # Redis ran it once it resumed
        await budgets.settle(who, hold, Decimal(0))
        assert await client.zrange(budgets.holds_keys("acme")[0], 0, -1) == [b"warm:100000000"]
        assert int(await client.get(budgets.holds_keys("acme")[1])) == 100_000_000
    finally:
        await client.aclose()


async def test_a_hold_redis_never_took_given_back_frees_nothing_held_by_others(redis_server, monkeypatch):
    """A reservation Redis never ran (it was down) still returns its hold; while its give-back waits for the next
    flush, and another replica's request holds 0.60 of 1.00, it frees nothing: this replica's next 0.60 is refused,
    as in memory, and the admin report still shows the 0.60 held (both used to count the never-taken hold freed)."""
    monkeypatch.setattr(budgets_redis, "CHARGE_FLUSH_S", 0.5)     # the give-back gathers for its flush meanwhile
    first, second = Redis.from_url(redis_server.url), Redis.from_url(redis_server.url)
    try:
        mine, theirs, who = RedisBudgets(first, "test-never", 0.5, backoff_s=0.0), RedisBudgets(second, "test-never"), \
            tenant()
        await mine.warm_up()
        redis_server.stop()
        down, never_taken = await mine.reserve(who, Decimal("0.60"), "never-taken")
        redis_server.start()
        assert not down.available and never_taken is not None       # let through under allow, its hold kept
        _, held = await theirs.reserve(who, Decimal("0.60"), "theirs")
        assert held is not None
        giving_back = asyncio.ensure_future(mine.settle(who, never_taken, Decimal(0)))
        await asyncio.sleep(0)                                       # gathering for the next flush
        state, over = await mine.reserve(who, Decimal("0.60"), "over")
        report = await mine.usage(who)
        assert not giving_back.done()
        await giving_back
        assert over is None and state.by_holds, f"admitted with {await held_nanos(mine)} nano-USD held"
        assert report.held_usd == Decimal("0.6")
    finally:
        await first.aclose()
        await second.aclose()


async def test_holds_are_taken_and_given_back_on_a_redis_cluster(cluster):
    """On a Redis Cluster, tenants whose keys live on different masters each get only the holds their budget
    covers, and a settle gives them back there, with its charge, in one transaction."""
    from redis.asyncio.cluster import RedisCluster as ClusterClient

    client = ClusterClient(host="127.0.0.1", port=cluster.ports[0], socket_timeout=2.0)
    await client.initialize()
    try:
        budgets = RedisBudgets(client, "gw-holds", 2.0, "allow")
        tenants = [tenant(name=name) for name in ("acme", "globex", "initech", "umbrella", "hooli", "stark")]
        assert len({client.get_node_from_key(budgets.holds_keys(t.name)[0]).name for t in tenants}) > 1
        for who in tenants:
            answers = await asyncio.gather(*(budgets.reserve(who, Decimal("0.30"), f"t{i}") for i in range(5)))
            holds = [hold for _, hold in answers if hold is not None]
            assert len(holds) == 3
            await asyncio.gather(*(budgets.settle(who, hold, Decimal("0.10")) for hold in holds))
            assert await client.get(budgets.holds_keys(who.name)[1]) is None
            assert (await budgets.check(who)).spent_day_usd == Decimal("0.3")
        assert budgets.store_failures == 0
    finally:
        await client.flushall(target_nodes=ClusterClient.PRIMARIES)
        await client.aclose()


async def test_a_reservation_asked_twice_holds_its_cost_once(make_budgets):
    """A reservation run again for the same request (a client that re-sent the script after a lost reply) holds
    its cost once, and one give-back frees it all."""
    budgets, who = make_budgets(), tenant()
    for _ in range(2):
        state, hold = await budgets.reserve(who, Decimal("0.10"), "same-ticket", EVENING_S)
        assert hold is not None and not state.exhausted
    assert await held_nanos(budgets) == 100_000_000
    await budgets.settle(who, hold, Decimal(0), EVENING_S)
    assert await held_nanos(budgets) == 0


async def test_a_request_dearer_than_what_is_left_is_told_so_and_to_wait_for_the_period(make_budgets):
    """With 0.05 left and nothing in flight, a request predicted at 0.06 is refused for its own cost, told to come
    back when the day ends (waiting for holds could never make it fit), not in a second."""
    budgets, who = make_budgets(), tenant()
    await budgets.charge(who, Decimal("0.95"), EVENING_S)
    state, hold = await budgets.reserve(who, Decimal("0.06"), "dear", EVENING_S)
    assert hold is None and state.exhausted and not state.by_holds
    assert state.retry_after_s == pytest.approx(6 * 3600)
    error = state.error()
    assert error.headers == {"Retry-After": str(6 * 3600), "x-should-retry": "false"}
    assert "predicted cost, USD 0.06, is more than the USD 0.05 left of USD 1 per day" in error.message
    _, fits = await budgets.reserve(who, Decimal("0.05"), "fits", EVENING_S)
    assert fits is not None


async def test_a_request_dearer_than_what_is_left_of_the_month_is_told_the_months_remainder(make_budgets):
    """Refused for its own cost against a month budget, a request is told what is left of the month (0.05), not
    the month's limit less what was spent today (0.95)."""
    budgets, who = make_budgets(), Tenant("acme", budget=Budget(usd_per_month=Decimal("1")))
    await budgets.charge(who, Decimal("0.90"), EVENING_S - 86400)
    await budgets.charge(who, Decimal("0.05"), EVENING_S)
    state, hold = await budgets.reserve(who, Decimal("0.10"), "dear", EVENING_S)
    assert hold is None and (state.reason, state.by_holds) == ("month", False)
    assert "predicted cost, USD 0.1, is more than the USD 0.05 left of USD 1 per month" in state.error().message


@pytest.mark.parametrize("retry_after_s, by_holds, final", [(6 * 3600, False, True), (30, False, False),
                                                            (60, False, False), (HELD_RETRY_S, True, False)],
                         ids=["spent-for-hours", "spent-for-seconds", "spent-for-the-sdks-longest-wait",
                              "held-by-requests-in-flight"])
def test_a_budget_spent_until_a_distant_period_end_tells_the_sdk_not_to_retry(retry_after_s, by_holds, final):
    """A budget spent for hours answers `x-should-retry: false`: the OpenAI SDKs ignore a Retry-After past 60 s and
    would retry at once, each retry refused again. One whose period ends within a minute, or that only requests in
    flight hold, may be retried as Retry-After says."""
    state = BudgetState("acme", tenant().budget, Decimal("1"), exhausted=True, reason="day",
                        retry_after_s=retry_after_s, by_holds=by_holds)
    headers = error_response(state.error()).headers
    assert (headers.get("x-should-retry") == "false") is final
    assert headers["Retry-After"] == str(int(retry_after_s))


def test_a_budget_store_down_under_deny_names_the_budget_store():
    """With on_store_failure: deny and Redis down, a tenant with a budget (and no limits) is told the budget store
    is unavailable, not the rate limit store."""
    state = BudgetState("acme", tenant().budget, exhausted=True, reason="store_unavailable", available=False)
    error = state.error()
    assert (error.status, error.code) == (503, "store_unavailable")
    assert error.message == "Budget store unavailable; retry shortly."


async def test_a_reservation_run_past_its_deadline_holds_nothing_and_reads_the_clock_again(redis_server):
    """A reservation Redis runs later than its caller's timeout and LATE_MARGIN_S (a stalled Redis resuming: its
    request has ended and given its hold back, maybe before this runs) holds nothing, where it used to hold its
    cost for the 15-minute hold TTL. As this host's clock stepping back would, a deadline already past makes one
    reservation late (answered without the store); its reply reads Redis's clock again, and the next one holds."""
    client = Redis.from_url(redis_server.url)
    budgets = RedisBudgets(client, "test", 2.0, "allow")
    acme = tenant("1.00")
    try:
        state, hold = await budgets.reserve(acme, Decimal("0.10"), "first")
        assert hold is not None and state.available             # answered: Redis's clock is known
        await budgets.settle(acme, hold, Decimal("0"))
        budgets.redis_clock.ahead_ms -= 10_000
        state, hold = await budgets.reserve(acme, Decimal("0.10"), "late")
        assert hold is None and not state.available
        assert await held_nanos(budgets) == 0
        state, hold = await budgets.reserve(acme, Decimal("0.10"), "after")
        assert hold is not None and await held_nanos(budgets) == 100_000_000
    finally:
        await client.aclose()


def test_a_spend_the_store_did_not_answer_is_reported_unknown_not_zero():
    """`/admin/tenants` with Redis down showed a tenant that spent its whole budget as untouched (0 spent, 0 in
    flight): what the store did not answer is null, beside `available: false`."""
    from gateway.tenancy.limits import LimitUsage
    budget = BudgetState("acme", tenant().budget, available=False).to_dict()
    assert (budget["spent_day_usd"], budget["held_usd"], budget["exhausted"], budget["available"]) == (
        None, None, None, False)
    assert LimitUsage(available=False).to_dict() == {"requests": None, "tokens": None, "concurrent": None,
                                                     "available": False}
    assert BudgetState("acme", tenant().budget).to_dict()["spent_day_usd"] == "0"
