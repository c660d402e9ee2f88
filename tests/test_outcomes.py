"""The outcome book, in process and in Redis: requests and tasks tracked, reported once, grouped and forgotten on
time; the Redis one shared by every gateway process, exact in money, and never failing a request."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from decimal import Decimal

import pytest
from redis.asyncio import Redis

from gateway.errors import ClientError, NotFound, StoreUnavailable
from gateway.outcomes import AlreadyReported, OutcomeBook
from gateway.outcomes_redis import RedisOutcomeBook, split_usd
from tests.support.redis_server import RedisServer


class Clock:
    def __init__(self) -> None:
        self.now_s = 1_000.0

    def __call__(self) -> float:
        return self.now_s


def track(book, request_id: str, cost: str, task_id: str | None = None, tenant: str = "acme",
          route: str = "chat", workflow: str | None = None) -> None:
    book.track(request_id=request_id, task_id=task_id, route=route, tenant=tenant, workflow=workflow,
               cost_usd=Decimal(cost))


@pytest.fixture
async def redis_client(redis_server):
    client = Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


def redis_book(client: Redis, **options) -> RedisOutcomeBook:
    """A book on the test's Redis: one per gateway process it stands for."""
    return RedisOutcomeBook(client, "test", 2.0, recheck_s=0.01, **options)


@contextlib.asynccontextmanager
async def book_of(kind: str, request, **options):
    """An outcome book of `kind`: "memory", or "redis" on a real redis-server (closed, with its client, after)."""
    if kind == "memory":
        yield OutcomeBook(**options)
        return
    client = Redis.from_url(request.getfixturevalue("redis_server").url)
    shared = redis_book(client, **options)
    try:
        yield shared
    finally:
        await shared.close()
        await client.aclose()


@pytest.fixture(params=["memory", "redis"])
async def book(request):
    """An outcome book of each kind; the Redis one on a real redis-server."""
    async with book_of(request.param, request) as made:
        yield made


# both books ----------------------------------------------------------------------------------------

async def test_a_request_without_a_task_is_reported_by_its_id(book):
    """A request is its own task: reporting its request id books its cost under the outcome."""
    track(book, "r1", "0.25")
    track(book, "r2", "0.50")
    await book.report({"request_id": "r1", "outcome": "success"}, tenant="acme")
    await book.report({"request_id": "r2", "outcome": "failure"}, tenant="acme")
    route = (await book.stats())["route"]["chat"]
    assert (route["tasks"], route["success"], route["cost_usd"]) == (2, 1, "0.75")
    assert route["cost_per_successful_task_usd"] == "0.75"
    with pytest.raises(AlreadyReported):
        await book.report({"request_id": "r1", "outcome": "success"}, tenant="acme")


async def test_a_reused_request_id_adds_up_and_tasks_group_their_requests(book):
    """Two requests under one x-request-id add up; a task id groups requests, found by any of their ids."""
    track(book, "same", "0.10")
    track(book, "same", "0.20")
    track(book, "a", "1", task_id="job")
    track(book, "b", "2", task_id="job")
    await book.report({"request_id": "same", "outcome": "success"}, tenant="acme")
    task = await book.report({"request_id": "b", "outcome": "escalated"}, tenant="acme")
    assert (task.requests, task.cost_usd) == (2, Decimal(3))
    stats = await book.stats()
    assert stats["tenant"]["acme"]["cost_usd"] == "3.3"
    assert stats["tenant"]["acme"]["escalated"] == 1


async def test_tenants_reusing_one_task_id_or_request_id_keep_separate_records(book):
    """Ids are the client's own: another tenant's calls under the same task or request id neither add to nor
    take the first tenant's record, and each reports its own cost."""
    track(book, "a1", "0.01", task_id="job-1", tenant="alice")
    track(book, "shared-req", "0.02", tenant="alice")
    for index in range(3):
        track(book, f"b{index}", "1", task_id="job-1", tenant="bob")
    track(book, "shared-req", "5", tenant="bob")
    assert (await book.report({"task_id": "job-1", "outcome": "success"}, tenant="alice")).cost_usd \
        == Decimal("0.01")
    assert (await book.report({"request_id": "shared-req", "outcome": "success"}, tenant="alice")).cost_usd \
        == Decimal("0.02")
    assert (await book.report({"request_id": "b1", "outcome": "failure"}, tenant="bob")).cost_usd == Decimal("3")
    assert (await book.report({"request_id": "shared-req", "outcome": "failure"}, tenant="bob")).cost_usd \
        == Decimal("5")
    with pytest.raises(NotFound):
        await book.report({"request_id": "a1", "outcome": "success"}, tenant="bob")


async def test_an_anonymous_caller_reports_only_anonymous_records(book):
    """Without a tenant (an open gateway) a report looks in the anonymous scope, not in a tenant's."""
    track(book, "r1", "0.5", tenant="acme")
    track(book, "r1", "0.25", tenant="anonymous")
    assert (await book.report({"request_id": "r1", "outcome": "success"})).cost_usd == Decimal("0.25")
    assert (await book.report({"request_id": "r1", "outcome": "success"}, tenant="acme")).cost_usd \
        == Decimal("0.5")


async def test_stats_group_by_route_tenant_and_workflow_with_values(book):
    """Stats split one tenant's tasks by route and workflow, and add the values reported with them."""
    track(book, "r1", "1.5", task_id="t1", route="chat", workflow="triage")
    track(book, "r2", "0.5", task_id="t2", route="code", workflow="triage")
    track(book, "r3", "0.25", task_id="t3", route="code", tenant="globex")
    await book.report({"task_id": "t1", "outcome": "success", "value_usd": 10}, tenant="acme")
    await book.report({"task_id": "t2", "outcome": "failure"}, tenant="acme")
    await book.report({"task_id": "t3", "outcome": "success", "value_usd": 0.1}, tenant="globex")
    stats = await book.stats()
    assert stats["workflow"]["triage"] | {"success_rate": None} == {
        "tasks": 2, "success": 1, "failure": 1, "escalated": 0, "cost_usd": "2",
        "cost_per_successful_task_usd": "2", "success_rate": None, "escalation_rate": 0.0, "value_usd": "10"}
    assert (stats["route"]["code"]["tasks"], stats["route"]["code"]["cost_usd"]) == (2, "0.75")
    assert stats["workflow"]["-"]["value_usd"] == "0.1"
    assert sorted(stats["tenant"]) == ["acme", "globex"]


async def test_success_and_escalation_rates_count_their_own_outcomes(book):
    """Three successes, one failure and no escalation: success rate 0.75, escalation rate 0."""
    for index, outcome in enumerate(["success", "success", "failure", "success"]):
        track(book, f"r{index}", "0.1", task_id=f"t{index}")
        await book.report({"task_id": f"t{index}", "outcome": outcome}, tenant="acme")
    route = (await book.stats())["route"]["chat"]
    assert (route["success_rate"], route["escalation_rate"]) == (0.75, 0.0)


@pytest.mark.parametrize("value_usd", [0, 10 ** 12])
async def test_a_value_of_zero_or_of_the_largest_allowed_is_accepted(book, value_usd):
    """`value_usd` may be anything from 0 to 1e12 USD, both ends included, and the stats add it."""
    track(book, "r", "1", task_id="t")
    task = await book.report({"task_id": "t", "outcome": "success", "value_usd": value_usd}, tenant="acme")
    assert task.value_usd == value_usd
    assert (await book.stats())["tenant"]["acme"]["value_usd"] == str(value_usd)


async def test_a_task_keeps_the_route_of_its_first_call(book):
    """A task whose calls went through two routes is reported, and grouped in the stats, under its first call's
    route."""
    track(book, "r1", "0.1", task_id="job", route="chat")
    track(book, "r2", "0.2", task_id="job", route="code")
    await book.close()
    assert (await book.report({"task_id": "job", "outcome": "success"}, tenant="acme")).route == "chat"
    assert sorted((await book.stats())["route"]) == ["chat"]


async def test_a_workflow_name_with_a_colon_is_grouped_like_any_other(book):
    """A workflow named `team:triage` is booked, reported and shown under that name."""
    track(book, "r1", "0.1", task_id="job", workflow="team:triage")
    await book.report({"task_id": "job", "outcome": "success"}, tenant="acme")
    assert (await book.stats())["workflow"]["team:triage"]["tasks"] == 1


async def test_calls_without_a_workflow_count_under_a_dash(book):
    """Calls sent without x-gateway-workflow, a lone request as a task's, count under the workflow `-`."""
    track(book, "lone", "0.1")
    track(book, "r1", "0.1", task_id="job")
    await book.report({"request_id": "lone", "outcome": "success"}, tenant="acme")
    await book.report({"task_id": "job", "outcome": "success"}, tenant="acme")
    workflows = (await book.stats())["workflow"]
    assert list(workflows) == ["-"] and workflows["-"]["tasks"] == 2


@pytest.mark.parametrize("body", [[1], {"task_id": "t"}, {"outcome": "success"},
                                  {"task_id": "t", "outcome": "success", "value_usd": 1e13}])
async def test_malformed_reports_are_refused_and_leave_the_task_reportable(book, body):
    """A malformed report (not an object, no outcome, no id, a value past 1e12 USD) is a 400 and changes
    nothing."""
    track(book, "r", "1", task_id="t")
    with pytest.raises(ClientError) as caught:
        await book.report(body, tenant="acme")
    assert caught.value.status == 400
    assert (await book.report({"task_id": "t", "outcome": "success"}, tenant="acme")).outcome == "success"


# the in-process book ---------------------------------------------------------------------------------

def test_unreported_requests_are_not_followed_by_the_garbage_collector():
    """An unreported request's record holds only immutable values, so full collections skip it."""
    book = OutcomeBook()
    for index in range(1000):
        track(book, f"r{index}", "0.001")
    gc.collect()
    assert not any(gc.is_tracked(entry) for entry in book.tasks.values())


async def test_entries_are_forgotten_by_age_and_count_and_only_the_tenant_may_report():
    """Past ttl_s or max_entries the oldest go; another tenant cannot report a task it does not own."""
    clock = Clock()
    book = OutcomeBook(ttl_s=60, max_entries=3, clock=clock)
    for index in range(5):
        track(book, f"r{index}", "0.01")
    assert [request_id for _, _, request_id in book.tasks] == ["r2", "r3", "r4"]
    clock.now_s += 61
    track(book, "late", "0.01", task_id="job")
    assert [task_id for _, _, task_id in book.tasks] == ["job"]
    with pytest.raises(NotFound):
        await book.report({"request_id": "r4", "outcome": "success"}, tenant="acme")
    with pytest.raises(NotFound):
        await book.report({"task_id": "job", "outcome": "success"}, tenant="globex")
    assert (await book.report({"task_id": "job", "outcome": "success"}, tenant="acme")).outcome == "success"


@pytest.mark.parametrize("task_id", ["job", None])
async def test_a_task_is_kept_ttl_s_after_its_last_request_not_its_first(task_id):
    """A task (or a request id used twice) whose last request came ttl_s ago, to the second, can still be reported,
    at the cost of both requests."""
    clock = Clock()
    book = OutcomeBook(ttl_s=60, clock=clock)
    track(book, "r1", "0.1", task_id=task_id)
    clock.now_s += 50
    track(book, "r1", "0.1", task_id=task_id)
    clock.now_s += 60
    judged = {"task_id": task_id} if task_id else {"request_id": "r1"}
    assert (await book.report({**judged, "outcome": "success"}, tenant="acme")).cost_usd == Decimal("0.2")


async def test_past_max_entries_the_least_recently_booked_task_goes_first():
    """A task booked again is the newest entry: past max_entries the one booked longest ago is forgotten
    instead."""
    book = OutcomeBook(max_entries=2)
    track(book, "a1", "0.1", task_id="a")
    track(book, "b1", "0.1", task_id="b")
    track(book, "a2", "0.1", task_id="a")
    track(book, "c1", "0.1", task_id="c")
    assert (await book.report({"task_id": "a", "outcome": "success"}, tenant="acme")).cost_usd == Decimal("0.2")
    with pytest.raises(NotFound):
        await book.report({"task_id": "b", "outcome": "success"}, tenant="acme")


async def test_a_kept_task_is_found_by_the_id_of_its_first_of_several_requests():
    """A task of five requests, kept within max_entries, is found by the id of its first request."""
    book = OutcomeBook(max_entries=2)
    for index in range(5):
        track(book, f"r{index}", "0.1", task_id="job")
    assert (await book.report({"request_id": "r0", "outcome": "success"}, tenant="acme")).requests == 5


async def test_a_call_that_ends_after_its_task_was_reported_adds_to_the_task_not_to_the_stats(book):
    """A task reported at 0.5 USD stays 0.5 in the stats (as in its metric and ledger line) when another of its
    calls ends afterwards, in either book."""
    track(book, "r1", "0.5", task_id="job")
    assert (await book.report({"task_id": "job", "outcome": "success"}, tenant="acme")).cost_usd == Decimal("0.5")
    track(book, "r2", "0.25", task_id="job")
    await book.close()
    assert (await book.stats())["tenant"]["acme"]["cost_usd"] == "0.5"

# the Redis book ----------------------------------------------------------------------------------------

async def test_a_task_booked_by_one_process_is_reported_once_through_another(redis_client):
    """Two books on one Redis (two gateway processes): the task booked by the first is found, costed and reported
    by the second; a second report through either is 409, and both show the same stats."""
    first, second = redis_book(redis_client), redis_book(redis_client)
    track(first, "r1", "0.1", task_id="job", workflow="triage")
    track(second, "r2", "0.2", task_id="job", workflow="triage")
    track(first, "lone", "0.05")
    await first.close(), await second.close()           # both bookings landed
    task = await second.report({"request_id": "r1", "outcome": "success", "value_usd": 2.5}, tenant="acme")
    assert (task.route, task.workflow, task.requests, task.cost_usd) == ("chat", "triage", 2, Decimal("0.3"))
    assert (await second.report({"request_id": "lone", "outcome": "failure"}, tenant="acme")).cost_usd \
        == Decimal("0.05")
    for book in (first, second):
        with pytest.raises(AlreadyReported):
            await book.report({"task_id": "job", "outcome": "failure"}, tenant="acme")
    assert await first.stats() == await second.stats()
    assert (await first.stats())["tenant"]["acme"]["cost_usd"] == "0.35"


async def test_concurrent_reports_of_one_task_from_many_processes_set_it_once(redis_client):
    """Ten books reporting one task at once: exactly one outcome is set, the others are 409, stats count one."""
    books = [redis_book(redis_client) for _ in range(10)]
    track(books[0], "r", "1", task_id="job")
    await books[0].close()
    results = await asyncio.gather(*(book.report({"task_id": "job", "outcome": outcome}, tenant="acme")
                                     for book, outcome in zip(books, ["success", "failure"] * 5)),
                                   return_exceptions=True)
    assert sum(not isinstance(r, Exception) for r in results) == 1
    assert sum(isinstance(r, AlreadyReported) for r in results) == 9
    assert (await books[1].stats())["tenant"]["acme"]["tasks"] == 1


async def test_costs_stay_exact_to_the_pico_dollar(redis_client):
    """Costs with 12 decimals and carries over whole dollars add up exactly, in the task and in the stats."""
    book = redis_book(redis_client)
    costs = [Decimal("0.999999999999"), Decimal("0.000000000001"), Decimal("123.456789012345"),
             Decimal("0.7"), Decimal("0.6")] + [Decimal("0.000000123456")] * 1000
    for index, cost in enumerate(costs):
        track(book, f"r{index}", str(cost), task_id="big")
    task = await book.report({"task_id": "big", "outcome": "success", "value_usd": 0.1}, tenant="acme")
    assert task.cost_usd == sum(costs) == Decimal("125.756912468345")
    stats = (await book.stats())["tenant"]["acme"]
    assert (Decimal(stats["cost_usd"]), stats["value_usd"]) == (sum(costs), "0.1")
    assert split_usd(Decimal("1.0000000000005")) == ("1", "0")      # half to even, once, when booked


async def test_keys_are_tenant_tagged_and_expire_ttl_s_after_the_last_booking(redis_client):
    """Each tenant's keys carry its hash tag and the key prefix; entries expire ttl_s after their last
    booking."""
    book = redis_book(redis_client, ttl_s=600)
    track(book, "r1", "0.1", task_id="job")
    track(book, "lone", "0.1", tenant="globex")
    await book.close()
    keys = sorted(key.decode() for key in await redis_client.keys("*"))
    assert keys == ["test:{acme}:oc:rt:r1", "test:{acme}:oc:t:job", "test:{globex}:oc:r:lone"]
    for key in keys:
        assert 590_000 < await redis_client.pttl(key) <= 600_000
    await redis_client.pexpire("test:{acme}:oc:t:job", 1000)
    track(book, "r2", "0.1", task_id="job")
    await book.close()
    assert await redis_client.pttl("test:{acme}:oc:t:job") > 590_000


async def test_a_report_waits_for_the_booking_this_process_has_under_way(redis_client):
    """A report sent while its request's booking is still on its way counts that request (no 404, full cost)."""
    book = redis_book(redis_client)
    track(book, "r1", "0.5", task_id="job")
    track(book, "r2", "0.25", task_id="job")
    task = await book.report({"task_id": "job", "outcome": "success"}, tenant="acme")    # no close(): in flight
    assert (task.requests, task.cost_usd) == (2, Decimal("0.75"))


async def test_a_report_through_another_process_counts_the_call_the_first_is_still_booking(redis_client):
    """A task's last call served by one process, its outcome reported through another just after: the report
    waits for the first process's booking, which gathers for FLUSH_S, and counts that call."""
    first, second = redis_book(redis_client), redis_book(redis_client)
    track(first, "r1", "0.5", task_id="job")
    await first.close()
    track(first, "r2", "0.25", task_id="job")           # not sent yet
    task = await second.report({"task_id": "job", "outcome": "success"}, tenant="acme")
    assert (task.requests, task.cost_usd) == (2, Decimal("0.75"))
    assert (await second.stats())["tenant"]["acme"]["cost_usd"] == "0.75"


@pytest.mark.parametrize("by", ["task_id", "request_id"])
async def test_a_report_waits_while_another_process_prices_a_call_of_its_task(redis_client, by):
    """A call on measured GPUs is booked only once its joules are priced, well after its answer: a report of its
    task (or of the call itself) through another process waits while the call is marked as being priced, then
    counts it; once booked, no mark is left in Redis."""
    first, second = redis_book(redis_client), redis_book(redis_client)
    track(first, "r1", "0.5", task_id="job")
    first.pricing(request_id="r2", task_id="job", tenant="acme", for_s=5.0)
    await first.close()                                 # booked r1, marked r2

    async def priced_later() -> None:
        await asyncio.sleep(0.3)
        first.track(request_id="r2", task_id="job", route="chat", tenant="acme", workflow=None,
                    cost_usd=Decimal("0.25"), priced_late=True)

    pricing = asyncio.create_task(priced_later())
    task = await second.report({by: "job" if by == "task_id" else "r2", "outcome": "success"}, tenant="acme",
                               pricing_s=5.0)
    await pricing
    assert (task.requests, task.cost_usd) == (2, Decimal("0.75"))
    await first.close()
    assert await redis_client.keys("test:{acme}:oc:p*") == []


async def test_a_report_waits_for_a_call_still_being_priced_at_most_pricing_s(redis_client):
    """A call marked as being priced whose booking never comes (its process stopped): a report waits
    `pricing_s`, no longer, and the mark expires by itself once the pricing could no longer end."""
    first, second = redis_book(redis_client), redis_book(redis_client)
    track(first, "r1", "0.5", task_id="job")
    first.pricing(request_id="r2", task_id="job", tenant="acme", for_s=3.0)
    await first.close()
    started = asyncio.get_running_loop().time()
    task = await second.report({"task_id": "job", "outcome": "success"}, tenant="acme", pricing_s=0.3)
    assert 0.3 <= asyncio.get_running_loop().time() - started < 2.0
    assert (task.requests, task.cost_usd) == (1, Decimal("0.5"))
    assert 3_000 < await redis_client.pttl("test:{acme}:oc:pt:job") <= 5_000     # for_s and the store timeout


async def test_a_stats_bucket_expires_ttl_s_after_its_end(redis_client):
    """The stats bucket a report lands in lives until ttl_s after the bucket's end (ttl_s / 24 per bucket), then
    goes, so Redis keeps no stats older than the last ttl_s."""
    clock = Clock()
    clock.now_s = 1_050.0
    book = redis_book(redis_client, ttl_s=2_400, clock=clock)          # buckets of 100 s: this one ends at 1,100
    track(book, "r1", "0.1", task_id="job")
    await book.report({"task_id": "job", "outcome": "success"}, tenant="acme")
    [bucket] = await redis_client.keys("test:{acme}:oc:stats:*")
    assert 2_440_000 < await redis_client.pttl(bucket) <= 2_450_000


async def test_a_short_store_timeout_still_gives_redis_min_timeout_s(redis_server, redis_client):
    """A book given a store timeout under MIN_TIMEOUT_S still waits that long: a booking through a Redis that
    answers 0.2 s late lands, uncounted as a failure."""
    from tests.support.redis_delay import DelayingRedisProxy

    proxy = DelayingRedisProxy(redis_server.port, 0.2).start()
    slow_client = Redis.from_url(proxy.url)
    book = RedisOutcomeBook(slow_client, "test", 0.05, recheck_s=0.01)
    try:
        await book.warm_up()
        track(book, "r1", "0.1", task_id="job")
        await book.close()
        assert book.store_failures == 0
        assert await redis_client.hget("test:{acme}:oc:t:job", "requests") == b"1"
    finally:
        await slow_client.aclose()
        proxy.stop()


async def test_a_report_waits_for_this_processs_booking_even_without_waiting_for_others(redis_client):
    """With no wait for other processes' bookings (others_s 0), a report still counts the call this process is
    booking: it waits for that booking itself."""
    book = redis_book(redis_client, others_s=0)
    track(book, "r1", "0.5", task_id="job")
    await book.close()
    track(book, "r2", "0.25", task_id="job")            # still gathering
    task = await book.report({"task_id": "job", "outcome": "success"}, tenant="acme")
    assert (task.requests, task.cost_usd) == (2, Decimal("0.75"))


async def test_a_report_of_a_task_another_process_is_still_booking_looks_again(redis_client):
    """A report that finds its task unknown looks once more after recheck_s: a task whose only call another
    process is still booking is found then, not answered 404."""
    first = redis_book(redis_client)
    second = RedisOutcomeBook(redis_client, "test", 2.0, recheck_s=0.5, others_s=0)
    track(first, "r1", "0.5", task_id="job")            # gathering for FLUSH_S in the first process
    try:
        assert (await second.report({"task_id": "job", "outcome": "success"}, tenant="acme")).cost_usd \
            == Decimal("0.5")
    finally:
        await first.close()


async def test_redis_down_loses_bookings_quietly_and_reports_answer_503(caplog):
    """With Redis gone a booking never raises (warned of once, counted) and a report or stats read is 503
    store_unavailable; when it is back, reports work again."""
    caplog.set_level(logging.WARNING)
    server = RedisServer().start()
    client = Redis.from_url(server.url, socket_timeout=0.5, socket_connect_timeout=0.5)
    book = RedisOutcomeBook(client, "test", 0.5, recheck_s=0.01)
    try:
        server.stop()
        for index in range(3):
            track(book, f"r{index}", "0.1", task_id="job")
        await book.close()
        assert book.store_failures == 3         # one call lost, and with it the three bookings it carried
        for call in (book.report({"task_id": "job", "outcome": "success"}, tenant="acme"), book.stats()):
            with pytest.raises(StoreUnavailable) as caught:
                await call
            assert (caught.value.status, caught.value.code) == (503, "store_unavailable")
        warnings = [r.getMessage() for r in caplog.records if "outcome store unavailable" in r.getMessage()]
        assert len(warnings) == 1 and not [r for r in caplog.records if r.levelno >= logging.ERROR]
        server.start()
        await asyncio.sleep(1.0)                # the guard's back-off
        track(book, "r9", "0.1", task_id="job")
        assert (await book.report({"task_id": "job", "outcome": "success"}, tenant="acme")).cost_usd \
            == Decimal("0.1")
    finally:
        server.stop()
        await client.aclose()


async def test_ids_and_workflows_that_are_not_utf8_are_booked_and_reported(redis_client):
    """A header byte that is not UTF-8 (kept by aiohttp as a lone surrogate) in a task id or workflow is booked,
    reported and grouped like any other, not refused by the Redis client's encoding."""
    book = redis_book(redis_client)
    track(book, "r\udcff", "0.5", task_id="caf\udce9", workflow="w\udcff")
    task = await book.report({"request_id": "r\udcff", "outcome": "success"}, tenant="acme")
    assert (task.workflow, task.cost_usd) == ("w\udcff", Decimal("0.5"))
    assert (await book.stats())["workflow"]["w\udcff"]["tasks"] == 1


async def test_a_tenants_bookings_gather_into_one_call(redis_server):
    """Bookings made together (a task's several requests, and lone requests) reach Redis in one script call
    (MAX_BATCH at most), not one each, and every one of them counts."""
    from tests.support.redis_counting import CountingRedis

    counting = CountingRedis.from_url(redis_server.url)
    book = redis_book(counting)
    try:
        await book.warm_up()
        for index in range(300):                # past MAX_BATCH: two calls
            track(book, f"r{index}", "0.001", task_id="job" if index % 2 else None)
        await book.close()
        assert counting.sent.count("EVALSHA") == 2
        task = await book.report({"task_id": "job", "outcome": "success"}, tenant="acme")
        assert (task.requests, task.cost_usd) == (150, Decimal("0.150"))
        lone = await book.report({"request_id": "r0", "outcome": "failure"}, tenant="acme")
        assert (lone.requests, lone.cost_usd) == (1, Decimal("0.001"))
    finally:
        await counting.aclose()


async def test_a_booking_redis_refuses_loses_only_itself_and_counts(redis_client):
    """A booking Redis refuses in the middle of a flush (here WRONGTYPE) is lost alone and counted; the others of
    the same script call land."""
    book = redis_book(redis_client)
    await redis_client.set("test:{acme}:oc:t:bad", "not a hash")
    for index, task_id in enumerate(("a", "bad", "b")):
        track(book, f"r{index}", "0.1", task_id=task_id)
    await book.close()
    assert book.store_failures == 1 and book.guard.healthy
    for task_id in ("a", "b"):
        task = await book.report({"task_id": task_id, "outcome": "success"}, tenant="acme")
        assert task.cost_usd == Decimal("0.1")


async def test_a_reported_value_is_returned_as_stored_to_the_pico_dollar(redis_client):
    """A value_usd with more than 12 decimals comes back rounded as Redis keeps it, the same as the stats show."""
    book = redis_book(redis_client)
    track(book, "r1", "0.1", task_id="tiny")
    track(book, "r2", "0.1", task_id="long")
    tiny = await book.report({"task_id": "tiny", "outcome": "success", "value_usd": 1e-13}, tenant="acme")
    long = await book.report({"task_id": "long", "outcome": "success", "value_usd": 0.1234567890125},
                             tenant="acme")
    assert (tiny.value_usd, long.value_usd) == (Decimal(0), Decimal("0.123456789012"))
    assert Decimal((await book.stats())["tenant"]["acme"]["value_usd"]) == tiny.value_usd + long.value_usd


async def test_a_booking_made_while_the_book_closes_lands(redis_server, redis_client):
    """close() waits for a flush started while it drains (a request that ended during shutdown), not only the
    flushes under way when it began. Redis answers through a proxy holding each reply 0.2 s."""
    from tests.support.redis_delay import DelayingRedisProxy

    proxy = DelayingRedisProxy(redis_server.port, 0.2).start()
    slow_client = Redis.from_url(proxy.url)
    book = redis_book(slow_client)
    try:
        await book.warm_up()
        track(book, "r1", "0.1", task_id="job")
        closing = asyncio.ensure_future(book.close())
        await asyncio.sleep(0.1)                # the first flush is sent, its reply on the way
        track(book, "r2", "0.2", task_id="job")
        await closing
        assert await redis_client.hget("test:{acme}:oc:t:job", "requests") == b"2"
    finally:
        await slow_client.aclose()
        proxy.stop()


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_stats_keep_a_reported_task_for_24_hours(kind, request):
    """`/admin/stats` shows the tasks reported in the last 24 hours: a task reported now is there 3, 12 and 23
    hours later, and gone after 25."""
    clock = Clock()
    async with book_of(kind, request, clock=clock) as book:
        track(book, "r1", "0.5", task_id="job")
        await book.report({"task_id": "job", "outcome": "success"}, tenant="acme")
        seen = {}
        for hours in (0, 3, 12, 23, 25):
            clock.now_s = 1_000.0 + hours * 3600
            seen[hours] = (await book.stats())["route"].get("chat", {}).get("tasks")
        assert seen == {0: 1, 3: 1, 12: 1, 23: 1, 25: None}


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_a_task_reported_at_the_end_of_an_hour_is_kept_for_24_hours(kind, request):
    """A task reported in the last second of a stats hour is still shown 23.9 hours later."""
    clock = Clock()
    clock.now_s = 3_599.0
    async with book_of(kind, request, clock=clock) as book:
        track(book, "r1", "0.5", task_id="job")
        await book.report({"task_id": "job", "outcome": "success"}, tenant="acme")
        clock.now_s += 23.9 * 3600
        assert (await book.stats())["route"]["chat"]["tasks"] == 1
