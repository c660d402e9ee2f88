"""Budgets: USD per UTC day and month, the same in memory and in Redis, kept across restarts."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from redis.asyncio import Redis

from gateway.errors import BudgetExceeded
from gateway.policy.model import Budget, Tenant
from gateway.tenancy import budgets_redis
from gateway.tenancy.budgets import CHARGE_FLUSH_S, READ_REUSE_S, RETENTION_S, Periods
from gateway.tenancy.budgets_memory import MemoryBudgets
from gateway.tenancy.budgets_redis import RedisBudgets
from tests.support.redis_counting import CountingRedis

#: 2025-01-30 18:00:00 UTC: six hours before the day ends, two days before the month does
EVENING_S = datetime(2025, 1, 30, 18, tzinfo=UTC).timestamp()
DAY_S = 86400


def tenant(per_day: str | None = None, per_month: str | None = None,
           on_exhausted: str = "reject") -> Tenant:
    """A tenant with the given budget."""
    return Tenant("acme", budget=Budget(
        usd_per_day=None if per_day is None else Decimal(per_day),
        usd_per_month=None if per_month is None else Decimal(per_month),
        on_exhausted=on_exhausted))


@pytest.fixture(params=["memory", "redis"])
async def make_budgets(request):
    """A factory of budgets of one kind; Redis ones each get their own client."""
    server = request.getfixturevalue("redis_server") if request.param == "redis" else None
    clients: list[Redis] = []

    def make(**kwargs):
        if server is None:
            return MemoryBudgets(**kwargs)
        client = Redis.from_url(server.url)
        clients.append(client)
        return RedisBudgets(client, "test", 2.0, "allow", **kwargs)

    yield make
    for client in clients:
        await client.aclose()


async def test_day_budget_exhausts_until_midnight(make_budgets):
    """Spend reaching usd_per_day exhausts the budget, with Retry-After until UTC midnight."""
    budgets, who = make_budgets(), tenant(per_day="1.00")
    await budgets.charge(who, Decimal("0.40"), EVENING_S)
    await budgets.charge(who, Decimal("0.40"), EVENING_S)
    state = await budgets.check(who, EVENING_S)
    assert (state.spent_day_usd, state.exhausted) == (Decimal("0.8"), False)
    await budgets.charge(who, Decimal("0.20"), EVENING_S)
    state = await budgets.check(who, EVENING_S + 60)
    assert (state.exhausted, state.reason, state.on_exhausted) == (True, "day", "reject")
    assert state.retry_after_s == 6 * 3600 - 60
    error = state.error()
    assert isinstance(error, BudgetExceeded) and error.status == 429
    assert error.headers == {"Retry-After": str(6 * 3600 - 60), "x-should-retry": "false"}
    assert not (await budgets.check(who, EVENING_S + DAY_S)).exhausted


async def test_month_budget_spans_days(make_budgets):
    """The month total adds up across days while each day starts again from zero."""
    budgets, who = make_budgets(), tenant(per_day="5", per_month="6", on_exhausted="downgrade")
    await budgets.charge(who, Decimal("4"), EVENING_S)
    await budgets.charge(who, Decimal("2.5"), EVENING_S + DAY_S)
    state = await budgets.check(who, EVENING_S + DAY_S)
    assert (state.spent_day_usd, state.spent_month_usd) == (Decimal("2.5"), Decimal("6.5"))
    assert (state.exhausted, state.reason, state.on_exhausted) == (True, "month", "downgrade")
    assert state.retry_after_s == 6 * 3600
    fresh = await budgets.check(who, EVENING_S + 2 * DAY_S)
    assert (fresh.spent_month_usd, fresh.exhausted) == (Decimal(0), False)


async def test_tiny_charges_add_up_exactly(make_budgets):
    """Sub-cent charges add up exactly (no float drift), to the nano-dollar."""
    budgets, who = make_budgets(), tenant(per_day="1")
    for _ in range(10):
        await budgets.charge(who, Decimal("0.1"), EVENING_S)
    await budgets.charge(who, Decimal("0.0000000004"), EVENING_S)      # rounds to 0 nano-USD
    await budgets.charge(who, Decimal("0.0000000016"), EVENING_S)      # rounds to 2 nano-USD
    state = await budgets.check(who, EVENING_S)
    assert state.spent_day_usd == Decimal("1.000000002") and state.exhausted


async def test_a_charge_of_half_a_nano_dollar_rounds_to_even(make_budgets):
    """Charges round half-even to the nano-dollar: 2.5 and 3.5 nano-USD count 2 and 4, so halves do not all round
    up (or down) and drift the total."""
    budgets, who = make_budgets(), tenant(per_day="1")
    await budgets.charge(who, Decimal("0.0000000025"), EVENING_S)
    await budgets.charge(who, Decimal("0.0000000035"), EVENING_S)
    assert (await budgets.check(who, EVENING_S)).spent_day_usd == Decimal("0.000000006")


async def test_of_two_spent_periods_the_one_that_frees_the_tenant_later_is_named(make_budgets):
    """A day and a month both spent name the month, and Retry-After waits until it ends (30 h), not until
    midnight, when the tenant would only be refused again."""
    budgets, who = make_budgets(), tenant(per_day="1", per_month="1")
    await budgets.charge(who, Decimal("1"), EVENING_S)
    state = await budgets.check(who, EVENING_S)
    assert (state.exhausted, state.reason, state.retry_after_s) == (True, "month", 30 * 3600)
    assert state.error().headers["Retry-After"] == str(30 * 3600)


async def test_usage_reports_spend_without_budget(make_budgets):
    """A tenant without a budget is never exhausted, yet usage() still reports its spend as JSON."""
    budgets, who = make_budgets(), tenant()
    await budgets.charge(who, Decimal("0.25"))
    assert not (await budgets.check(who)).exhausted
    report = (await budgets.usage(who)).to_dict()
    assert json.loads(json.dumps(report)) == {
        "tenant": "acme", "spent_day_usd": "0.25", "spent_month_usd": "0.25",
        "usd_per_day": None, "usd_per_month": None, "held_usd": "0", "exhausted": False, "reason": None,
        "on_exhausted": "reject", "available": True}


async def test_the_admin_report_shows_the_months_spend_and_limit_beside_the_days(make_budgets):
    """The spend as GET /admin/tenants writes it: yesterday's spend counts in the month's total and not in today's,
    and each period's limit is written under its own name."""
    now_s = [EVENING_S - DAY_S]
    budgets, who = make_budgets(clock=lambda: now_s[0]), tenant(per_day="1", per_month="10")
    await budgets.charge(who, Decimal("0.75"))
    now_s[0] = EVENING_S
    await budgets.charge(who, Decimal("0.5"))
    report = (await budgets.usage(who)).to_dict()
    assert (report["spent_day_usd"], report["spent_month_usd"]) == ("0.5", "1.25")
    assert (report["usd_per_day"], report["usd_per_month"]) == ("1", "10")


async def test_injected_clock_is_used(make_budgets):
    """Without an explicit time, budgets read their injected clock to pick the day."""
    now_s = [EVENING_S]
    budgets, who = make_budgets(clock=lambda: now_s[0]), tenant(per_day="1")
    await budgets.charge(who, Decimal("1"))
    assert (await budgets.check(who)).exhausted
    now_s[0] += DAY_S
    assert not (await budgets.check(who)).exhausted


async def test_redis_budget_survives_restart(redis_server):
    """A new RedisBudgets on a new client (a restarted gateway) sees what was spent before."""
    who = tenant(per_day="1")
    first_client, second_client = Redis.from_url(redis_server.url), Redis.from_url(redis_server.url)
    try:
        await RedisBudgets(first_client, "test").charge(who, Decimal("0.75"))
        state = await RedisBudgets(second_client, "test").usage(who)
        assert state.spent_day_usd == Decimal("0.75")
        ttl_s = await second_client.ttl("test:{acme}:budget:day:"
                                        + datetime.now(UTC).strftime("%Y-%m-%d"))
        assert 2 * DAY_S < ttl_s <= 3 * DAY_S
    finally:
        await first_client.aclose()
        await second_client.aclose()


async def test_the_month_total_is_kept_until_the_month_ends_not_the_day(redis_server):
    """In Redis the day total lives until its day ends and RETENTION_S more, the month total until its month ends
    and RETENTION_S more: a month total kept only as long as the day's would forget the month's spend."""
    client = Redis.from_url(redis_server.url)
    try:
        budgets, who = RedisBudgets(client, "test-ttl", 2.0, "allow"), tenant(per_day="1", per_month="5")
        await budgets.charge(who, Decimal("0.50"), EVENING_S)
        day_key, month_key = budgets.keys(who.name, Periods.at(EVENING_S))
        assert await client.ttl(day_key) == pytest.approx(6 * 3600 + RETENTION_S, abs=60)
        assert await client.ttl(month_key) == pytest.approx(30 * 3600 + RETENTION_S, abs=60)
    finally:
        await client.aclose()


@pytest.mark.parametrize("on_store_failure", ["allow", "deny"])
async def test_store_down_is_answered_not_raised(redis_server, on_store_failure):
    """With Redis killed, check follows on_store_failure and a charge, given up after its retries, is counted, never
    raised."""
    client = CountingRedis.from_url(redis_server.url, socket_connect_timeout=0.2)
    budgets, who = RedisBudgets(client, "test", 0.5, on_store_failure, backoff_s=5.0, retry_s=0.1, late_flush_s=0.0), \
        tenant(per_day="1")
    try:
        redis_server.stop()
        started_s = time.monotonic()
        state = await budgets.check(who)
        await budgets.charge(who, Decimal("0.5"))
        assert time.monotonic() - started_s < 2.0
        assert budgets.store_failures == 3 and not state.available  # the check, the flush, the charge given up
        sent = len(client.sent)
        assert not (await budgets.check(who)).available             # in the back-off: Redis not called
        assert len(client.sent) == sent and budgets.store_failures == 4
        if on_store_failure == "allow":
            assert not state.exhausted
        else:
            assert (state.exhausted, state.on_exhausted, state.error().status) == (True, "reject", 503)
    finally:
        await client.aclose()


async def test_the_admin_report_of_a_downgrading_tenant_says_reject_while_the_store_is_down_under_deny(redis_server):
    """With Redis down and on_store_failure: deny, GET /admin/tenants says a tenant whose budget downgrades when
    spent is rejected, as its requests are (503): its spend is unknown, not spent."""
    client = Redis.from_url(redis_server.url, socket_connect_timeout=0.2)
    budgets, who = RedisBudgets(client, "test", 0.5, "deny"), tenant(per_day="1", on_exhausted="downgrade")
    try:
        redis_server.stop()
        report = (await budgets.usage(who)).to_dict()
        assert (report["available"], report["reason"], report["on_exhausted"]) == (False, "store_unavailable",
                                                                                   "reject")
    finally:
        await client.aclose()


async def test_a_charge_in_the_back_off_is_still_sent(redis_server):
    """After an outage the checks leave Redis alone for a while, but charges are tried: none is lost once
    Redis is back."""
    client = Redis.from_url(redis_server.url, socket_connect_timeout=0.2)
    budgets, who = RedisBudgets(client, "test-backoff", 0.5, "allow"), tenant(per_day="1")
    try:
        redis_server.stop()
        assert not (await budgets.check(who, EVENING_S)).available      # the back-off starts (1 s)
        redis_server.start()
        await budgets.charge(who, Decimal("0.25"), EVENING_S)
        day_key, _ = budgets.keys(who.name, Periods.at(EVENING_S))
        assert int(await client.get(day_key)) == 250_000_000
    finally:
        await client.aclose()


async def test_a_read_with_room_is_reused_briefly_and_ended_by_a_charge(redis_server):
    """Checks within READ_REUSE_S reuse one read; this replica's charge, or the window passing, reads again."""
    from gateway.tenancy.budgets import READ_REUSE_S

    client = CountingRedis.from_url(redis_server.url)
    try:
        budgets, who = RedisBudgets(client, "test-reuse", 2.0, "allow"), tenant(per_day="1.00")
        await budgets.check(who, EVENING_S)
        await budgets.check(who, EVENING_S + READ_REUSE_S / 2)
        assert client.sent.count("MGET") == 1
        await budgets.charge(who, Decimal("1.00"), EVENING_S + READ_REUSE_S / 2)
        state = await budgets.check(who, EVENING_S + READ_REUSE_S / 2)
        assert client.sent.count("MGET") == 2 and state.exhausted
        assert (await budgets.check(who, EVENING_S + READ_REUSE_S / 2)).exhausted
        assert client.sent.count("MGET") == 3                # an exhausted state is never reused
    finally:
        await client.aclose()


async def test_a_charge_ends_the_reuse_of_a_read_as_it_is_made_not_when_it_lands(redis_server):
    """This replica's charge ends the reuse of its last read at once: a check while the charge still waits for its
    flush counts it, rather than reuse the read from before it."""
    client = Redis.from_url(redis_server.url)
    try:
        budgets, who = RedisBudgets(client, "test-reuse-pending", 2.0, "allow"), tenant(per_day="1.00")
        assert not (await budgets.check(who, EVENING_S)).exhausted
        charging = asyncio.create_task(budgets.charge(who, Decimal("1.00"), EVENING_S))
        await asyncio.sleep(0)                              # gathering for its flush: not in Redis yet
        assert (await budgets.check(who, EVENING_S)).exhausted
        await charging
    finally:
        await client.aclose()


@pytest.mark.parametrize("later_s", [
    pytest.param(READ_REUSE_S, id="once-the-reuse-window-passes"),
    pytest.param(-60.0, id="after-the-clock-stepped-back")])
async def test_another_replicas_charge_is_seen_by_a_check_that_may_not_reuse_the_last_read(redis_server, later_s):
    """A charge made by another replica is seen by a check at most READ_REUSE_S after this one's last read, and by
    one made when this host's clock has stepped back: the last read, stamped later than now, would otherwise be
    reused until the clock caught up with it, hiding other replicas' charges."""
    first, second = Redis.from_url(redis_server.url), Redis.from_url(redis_server.url)
    try:
        reader, charger, who = RedisBudgets(first, "test-reuse2"), RedisBudgets(second, "test-reuse2"), \
            tenant(per_day="1.00")
        assert not (await reader.check(who, EVENING_S)).exhausted
        await charger.charge(who, Decimal("1.00"), EVENING_S)
        assert (await reader.check(who, EVENING_S + later_s)).exhausted
    finally:
        await first.aclose()
        await second.aclose()


async def test_a_read_the_store_did_not_answer_is_not_reused(redis_server):
    """A check Redis did not answer (spend unknown, let through under allow) is not reused: the next check, once
    Redis is back, reads the spend again rather than go on unenforced for READ_REUSE_S."""
    client = Redis.from_url(redis_server.url, socket_connect_timeout=0.2)
    try:
        budgets, who = RedisBudgets(client, "test-unknown", 0.5, "allow", backoff_s=0.0), tenant(per_day="1")
        redis_server.stop()
        assert not (await budgets.check(who, EVENING_S)).available
        redis_server.start()
        assert (await budgets.check(who, EVENING_S)).available
    finally:
        await client.aclose()


class LateReplyRedis(Redis):
    """A real Redis client whose MGET replies reach the caller late (after a charge gathered and landed), as on a
    busy network."""

    async def execute_command(self, *args, **options):
        result = await super().execute_command(*args, **options)
        if str(args[0]).upper() == "MGET":
            await asyncio.sleep(CHARGE_FLUSH_S + 0.1)
        return result


async def test_a_read_that_overlaps_this_replicas_charge_is_not_reused(redis_server):
    """A check whose read was answered before this replica's charge landed, and returned after, is not reused."""
    client = LateReplyRedis.from_url(redis_server.url)
    try:
        budgets, who = RedisBudgets(client, "test-race", 2.0, "allow"), tenant(per_day="1.00")
        reading = asyncio.create_task(budgets.check(who, EVENING_S))
        await asyncio.sleep(0.01)                                # answered by Redis, reply still on its way
        await budgets.charge(who, Decimal("5.00"), EVENING_S)
        assert not (await reading).exhausted                     # it read the total before the charge
        assert (await budgets.check(who, EVENING_S + 0.01)).exhausted
    finally:
        await client.aclose()


async def test_a_read_answered_before_this_replicas_charge_landed_is_not_reused(redis_server):
    """A check whose read Redis answered before this replica's charge landed, and that returned after (the charge
    then no longer counted as waiting), is not reused: the next check reads the spend with the charge."""
    client = LateReplyRedis.from_url(redis_server.url)
    try:
        budgets, who = RedisBudgets(client, "test-race-landed", 2.0, "allow"), tenant(per_day="1.00")
        charging = asyncio.create_task(budgets.charge(who, Decimal("5.00"), EVENING_S))
        await asyncio.sleep(0)                                   # gathering for its flush
        reading = asyncio.create_task(budgets.check(who, EVENING_S))
        await charging                                           # landed while the read's reply is on its way
        await reading
        assert (await budgets.check(who, EVENING_S + 0.01)).exhausted
    finally:
        await client.aclose()


async def test_charges_made_together_go_in_one_transaction_and_count_while_they_wait(redis_server):
    """A tenant's charges of one moment reach Redis in one script call, not one each; this replica's checks count
    them while they wait, and every nano-dollar lands."""
    client = Redis.from_url(redis_server.url)

    async def transactions() -> int:
        return (await client.info("commandstats")).get("cmdstat_evalsha", {}).get("calls", 0)

    try:
        budgets, who = RedisBudgets(client, "test-gather", 2.0, "allow"), tenant(per_day="1.00")
        await client.script_load(budgets.flush_script.script)   # else the first EVALSHA is answered NOSCRIPT
        before = await transactions()
        charges = [asyncio.create_task(budgets.charge(who, Decimal("0.03"), EVENING_S)) for _ in range(40)]
        await asyncio.sleep(0)
        waiting = await budgets.read(who, EVENING_S)             # nothing has landed yet: counted from here
        assert waiting.exhausted and waiting.spent_day_usd == Decimal("1.20")
        await asyncio.gather(*charges)
        assert await transactions() - before == 1
        landed = await budgets.read(who, EVENING_S)
        assert landed.spent_day_usd == landed.spent_month_usd == Decimal("1.20")
    finally:
        await client.aclose()


async def test_a_charge_made_while_the_last_one_gathers_joins_its_transaction(redis_server):
    """A charge made a few turns of the event loop after the tenant's last one (well within CHARGE_FLUSH_S) joins
    its flush: requests ending a moment apart cost Redis one script call, not one each."""
    client = CountingRedis.from_url(redis_server.url)
    try:
        budgets, who = RedisBudgets(client, "test-gather-apart", 2.0, "allow"), tenant(per_day="1.00")
        await budgets.warm_up()
        client.sent.clear()
        first = asyncio.create_task(budgets.charge(who, Decimal("0.10"), EVENING_S))
        for _ in range(5):
            await asyncio.sleep(0)                      # the first charge gathers; its flush waits CHARGE_FLUSH_S
        await asyncio.gather(first, budgets.charge(who, Decimal("0.20"), EVENING_S))
        assert client.sent.count("EVALSHA") == 1
        assert (await budgets.read(who, EVENING_S)).spent_day_usd == Decimal("0.3")
    finally:
        await client.aclose()


class LateExecRedis(Redis):
    """A real Redis client whose script replies (a flush's) reach the caller 0.1 s after Redis applied them."""

    async def evalsha(self, *args):
        result = await super().evalsha(*args)
        await asyncio.sleep(0.1)
        return result


async def test_a_read_between_a_flush_applied_and_its_reply_counts_the_charge_once(redis_server):
    """Redis has applied the flush, its reply is still on its way: a read then holds the charge in the totals it
    reads, and must not add it again as still waiting (which refused a tenant at 1.20 of its 1.00)."""
    client = LateExecRedis.from_url(redis_server.url)
    try:
        budgets, who = RedisBudgets(client, "test-applied", 2.0, "allow"), tenant(per_day="1.00")
        charging = asyncio.create_task(budgets.charge(who, Decimal("0.60"), EVENING_S))
        await asyncio.sleep(CHARGE_FLUSH_S + 0.05)
        during = await budgets.read(who, EVENING_S)
        await charging
        assert during.spent_day_usd == Decimal("0.60") and not during.exhausted
        assert (await budgets.read(who, EVENING_S)).spent_day_usd == Decimal("0.60")
    finally:
        await client.aclose()


async def test_a_reservation_between_a_flush_applied_and_its_reply_counts_the_charge_once(redis_server):
    """Redis has applied the flush (its marker says so), its reply is still on its way: a reservation then counts
    the charge in the totals Redis holds, not again as still waiting, and a request that fits is held."""
    client = LateExecRedis.from_url(redis_server.url)
    try:
        budgets, who = RedisBudgets(client, "test-applied-hold", 2.0, "allow"), tenant(per_day="1.00")
        charging = asyncio.create_task(budgets.charge(who, Decimal("0.60"), EVENING_S))
        while await client.get(budgets.applied_key(who.name)) is None:     # applied; the reply comes 0.1 s late
            await asyncio.sleep(0.005)
        state, hold = await budgets.reserve(who, Decimal("0.30"), "fits", EVENING_S)
        await charging
        assert hold is not None and state.spent_day_usd == Decimal("0.60")
    finally:
        await client.aclose()


async def test_a_charge_gathering_while_an_earlier_flush_is_sent_lands_with_its_own_flush(redis_server, monkeypatch):
    """A flush sent while the tenant's next charges still gather carries only the closed parts: a charge that joins
    the gathering part while that call is out lands with the part's own flush, never dropped as sent already."""
    monkeypatch.setattr(budgets_redis, "CHARGE_FLUSH_S", 0.5)     # the next part gathers while the call is out
    client = LateExecRedis.from_url(redis_server.url)
    try:
        budgets, who = RedisBudgets(client, "test-out", 2.0, "allow"), tenant(per_day="10")
        await budgets.warm_up()
        deadline_s = time.monotonic() + 5
        sending = budgets._lock(who.name)
        await sending.acquire()                 # a call of the tenant is out: the first part's flush waits for it
        first = asyncio.ensure_future(budgets.charge(who, Decimal("0.1"), EVENING_S))
        while who.name in budgets._gathering or not budgets._unlanded.get(who.name):     # closed, and waiting
            assert time.monotonic() < deadline_s
            await asyncio.sleep(0.005)
        second = asyncio.ensure_future(budgets.charge(who, Decimal("0.2"), EVENING_S))
        await asyncio.sleep(0)                  # gathering for the next flush
        sending.release()                       # the first part is sent now
        while await client.get(budgets.applied_key(who.name)) is None:     # applied; its reply comes 0.1 s late
            assert time.monotonic() < deadline_s
            await asyncio.sleep(0.005)
        third = asyncio.ensure_future(budgets.charge(who, Decimal("0.4"), EVENING_S))
        await asyncio.wait_for(asyncio.gather(first, second, third), 5)
        assert (await budgets.read(who, EVENING_S)).spent_day_usd == Decimal("0.7")
        assert budgets.store_failures == 0
    finally:
        await client.aclose()


async def test_charges_lost_with_a_failed_flush_are_each_counted(redis_server):
    """With Redis gone past the retries, ten charges of one window are ten lost, not one, beside the failed calls."""
    client = Redis.from_url(redis_server.url, socket_connect_timeout=0.2)
    try:
        budgets, who = RedisBudgets(client, "test-lost", 0.3, "allow", retry_s=0.1, late_flush_s=0.0), \
            tenant(per_day="1.00")
        redis_server.stop()
        await asyncio.gather(*(budgets.charge(who, Decimal("0.01"), EVENING_S) for _ in range(10)))
        assert (budgets.charges_lost, budgets.store_failures) == (10, budgets.guard.failures + 10)
    finally:
        await client.aclose()


class BrokenRedis(Redis):
    """A Redis client whose script calls (a flush's) fail on our side, before anything is sent."""

    async def evalsha(self, *args):
        raise ValueError("a bug of ours, not the store's")


async def test_a_flush_failing_on_our_side_is_logged_and_its_charges_counted(redis_server, caplog):
    """A failure that is not the store's: the charge returns (the request is long answered), the loss is counted
    and logged once with its traceback, and nothing is left for asyncio to report as never retrieved."""
    client = BrokenRedis.from_url(redis_server.url)
    try:
        budgets, who = RedisBudgets(client, "test-broken", 2.0, "allow"), tenant(per_day="1.00")
        await asyncio.wait_for(asyncio.gather(*(budgets.charge(who, Decimal("0.1"), EVENING_S) for _ in range(3))),
                               2)
        assert budgets.store_failures == 3
        assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == \
            [f"budget charges of tenant {who.name} were not sent"]
        assert not budgets._unlanded and not budgets._gathering
    finally:
        await client.aclose()


async def test_a_flush_cancelled_while_it_gathers_leaves_the_tenant_free_to_charge(redis_server):
    """A flush cancelled in its wait (a loop shutting down, say) lets the charges waiting on it return, counted as
    lost, and the tenant's next charges gather and land as usual."""
    client = Redis.from_url(redis_server.url)
    try:
        budgets, who = RedisBudgets(client, "test-cancel", 2.0, "allow"), tenant(per_day="10")
        first = asyncio.create_task(budgets.charge(who, Decimal("0.1"), EVENING_S))
        await asyncio.sleep(0)
        budgets._gathering[who.name].flush.cancel()
        await asyncio.wait_for(first, 1)
        assert budgets.store_failures == 1     # the charge never sent
        await asyncio.wait_for(budgets.charge(who, Decimal("0.2"), EVENING_S), 1)
        assert (await budgets.read(who, EVENING_S)).spent_day_usd == Decimal("0.2")
    finally:
        await client.aclose()
