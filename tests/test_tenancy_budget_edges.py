"""Budgets at their edges: tiny amounts as finance reads them, period boundaries, reloads, key rotation, downgrades."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal

import openai
import pytest
from redis.asyncio import Redis

from gateway.policy.model import Budget, Tenant
from gateway.tenancy.budgets_memory import MemoryBudgets
from gateway.tenancy.budgets_redis import RedisBudgets
from gateway.tenancy.keys import new_key
from tests.support.harness import DEFAULT_SIMS, Harness
from tests.support.policies import models, short_timeouts, standard_model

#: 2025-01-31 23:59:59 UTC: the last second of a day and of a month
LAST_SECOND_S = datetime(2025, 1, 31, 23, 59, 59, tzinfo=UTC).timestamp()
HELLO = [{"role": "user", "content": "Hello there"}]


def tenant(per_day: str | None = None, per_month: str | None = None, on_exhausted: str = "reject") -> Tenant:
    """A tenant named acme with the given budget."""
    return Tenant("acme", budget=Budget(
        usd_per_day=None if per_day is None else Decimal(per_day),
        usd_per_month=None if per_month is None else Decimal(per_month), on_exhausted=on_exhausted))


@pytest.fixture(params=["memory", "redis"])
async def budgets(request):
    """Budgets held in memory, or in a real redis-server."""
    if request.param == "memory":
        yield MemoryBudgets()
        return
    client = Redis.from_url(request.getfixturevalue("redis_server").url)
    yield RedisBudgets(client, "edges", 2.0, "allow")
    await client.aclose()


# amounts as finance reads them ----------------------------------------------------------------------
async def test_tiny_spend_and_limits_are_reported_in_plain_decimal_notation(budgets):
    """Spend and limits of a few nano-dollars read as `0.00000001` in the admin report, never `1E-8`."""
    who = tenant(per_day="0.0000001", per_month="0.00000005")
    await budgets.charge(who, Decimal("0.00000001"), LAST_SECOND_S)
    report = (await budgets.check(who, LAST_SECOND_S)).to_dict()
    assert json.loads(json.dumps(report))["spent_day_usd"] == "0.00000001"
    assert report["spent_month_usd"] == "0.00000001"
    assert (report["usd_per_day"], report["usd_per_month"]) == ("0.0000001", "0.00000005")
    fresh = (await budgets.check(tenant(per_day="1"), LAST_SECOND_S + 10 * 86400)).to_dict()
    assert (fresh["spent_day_usd"], fresh["spent_month_usd"]) == ("0", "0")


async def test_the_budget_exceeded_message_names_its_limit_in_plain_notation(budgets):
    """The 429 budget_exceeded message names a tiny limit as `USD 0.0000001`, not `USD 1E-7`."""
    who = tenant(per_day="0.0000001")
    await budgets.charge(who, Decimal("0.0000002"), LAST_SECOND_S)
    error = (await budgets.check(who, LAST_SECOND_S)).error()
    assert "USD 0.0000001 per day spent" in error.message


# periods -------------------------------------------------------------------------------------------
async def test_a_charge_after_midnight_lands_in_the_new_day_and_month(budgets):
    """A cost charged a second after a UTC month ends counts for the new day and month, not the old ones."""
    who = tenant(per_day="1", per_month="1")
    await budgets.charge(who, Decimal("1"), LAST_SECOND_S)
    before = await budgets.check(who, LAST_SECOND_S + 0.5)
    assert (before.exhausted, before.reason, before.retry_after_s) == (True, "month", 0.5)
    assert before.error().headers["Retry-After"] == "1"
    await budgets.charge(who, Decimal("0.25"), LAST_SECOND_S + 1)
    after = await budgets.check(who, LAST_SECOND_S + 1)
    assert (after.spent_day_usd, after.spent_month_usd, after.exhausted) == (Decimal("0.25"), Decimal("0.25"), False)


async def test_the_retry_after_of_a_spent_budget_is_rounded_up_to_whole_seconds(budgets):
    """With 2.5 s left of the day, a spent budget says Retry-After: 3, never 2: a client told to come back before
    the period ends would only be refused again."""
    who = tenant(per_day="1")
    await budgets.charge(who, Decimal("1"), LAST_SECOND_S)
    state = await budgets.check(who, LAST_SECOND_S - 1.5)
    assert state.retry_after_s == 2.5 and state.error().headers["Retry-After"] == "3"


async def test_a_raised_budget_applies_at_once_and_keeps_the_spend(budgets):
    """A budget raised by a reload (a new Tenant of the same name) frees the tenant at once, its spend kept."""
    await budgets.charge(tenant(per_day="1"), Decimal("1"), LAST_SECOND_S)
    assert (await budgets.check(tenant(per_day="1"), LAST_SECOND_S)).exhausted
    raised = await budgets.check(tenant(per_day="2"), LAST_SECOND_S)
    assert (raised.exhausted, raised.spent_day_usd) == (False, Decimal("1"))
    assert (await budgets.check(tenant(per_day="0.5"), LAST_SECOND_S)).exhausted


# the running gateway, in memory --------------------------------------------------------------------
SPENT, PAYING, SPENT_LIMITED = new_key(), new_key(), new_key()
OLD, ROTATED = new_key(), new_key()

#: route `solo`: one candidate that always fails, and a fallback that serves
FALLBACK_POLICY = models(
    standard_model("small", timeouts=short_timeouts()),
    standard_model("large", timeouts=short_timeouts()),
) + f"""
routes:
  - name: solo
    match: {{{{models: ["auto"], endpoints: [chat]}}}}
    candidates: [small]
    fallback: [large]
tenants:
  spent:
    keys_sha256: ["{SPENT[1]}"]
    budget: {{{{usd_per_day: 0, on_exhausted: downgrade}}}}
  paying: {{{{keys_sha256: ["{PAYING[1]}"], budget: {{{{usd_per_day: 100}}}}}}}}
  spent-limited:
    keys_sha256: ["{SPENT_LIMITED[1]}"]
    limits: {{{{requests_per_minute: 1}}}}
    budget: {{{{usd_per_day: 0, on_exhausted: downgrade}}}}
  rotating: {{{{keys_sha256: ["{OLD[1]}", "{ROTATED[1]}"]}}}}
  tiny: {{{{keys_sha256: ["{new_key()[1]}"], budget: {{{{usd_per_day: 0.0000001}}}}}}}}
"""


@pytest.fixture(scope="module")
def failing_small():
    """A gateway without Redis whose `small` answers every call with a 500."""
    sims = {"small": {**DEFAULT_SIMS["small"], "error_rate": 1.0}, "large": DEFAULT_SIMS["large"]}
    harness = Harness(FALLBACK_POLICY, sims=sims, environ={"OTEL_SDK_DISABLED": "true"}).start()
    yield harness
    harness.stop()


def test_a_budget_downgrade_keeps_the_routes_fallbacks(failing_small):
    """A tenant downgraded for its spent budget still falls back to the route's fallback when the cheapest fails."""
    answer = failing_small.openai(api_key=SPENT[0]).chat.completions.with_raw_response.create(
        model="auto", messages=HELLO, max_tokens=5)
    assert answer.headers["x-gateway-model"] == "large"


def test_a_downgraded_tenant_is_still_held_to_its_rate_limit(failing_small):
    """A tenant downgraded for its spent budget is admitted against its limits like any other: its second request
    of the minute is refused for requests per minute, not served."""
    client = failing_small.openai(api_key=SPENT_LIMITED[0])
    first = client.chat.completions.with_raw_response.create(model="auto", messages=HELLO, max_tokens=5)
    assert first.status_code == 200
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model="auto", messages=HELLO, max_tokens=5)
    assert refused.value.code == "rate_limit_exceeded"


def test_a_paying_tenant_falls_back_and_is_charged_for_the_answer(failing_small):
    """The same route serves a tenant with room through its fallback, and the admin spend equals the cost header."""
    answer = failing_small.openai(api_key=PAYING[0]).chat.completions.with_raw_response.create(
        model="auto", messages=HELLO, max_tokens=5)
    assert (answer.headers["x-gateway-model"], answer.headers["x-gateway-fallback"]) == ("large", "fallback")
    spend = failing_small.call(failing_small.services.stores.budgets.usage(
        failing_small.holder.current.policy.tenants["paying"]))
    assert spend.spent_day_usd == Decimal(answer.headers["x-gateway-cost-usd"]) > 0


def test_both_keys_of_a_rotated_tenant_identify_it_and_the_bearer_key_wins(failing_small):
    """Either key of a tenant in rotation is accepted; a request with both headers is the Bearer key's."""
    for key in (OLD[0], ROTATED[0]):
        status = failing_small.openai(api_key=key).models.with_raw_response.list().status_code
        assert status == 200
    both = failing_small.openai(api_key="gw-wrong", default_headers={"api-key": ROTATED[0]})
    with pytest.raises(openai.AuthenticationError):
        both.models.list()


def test_the_admin_report_lists_tenants_by_name(failing_small):
    """GET /admin/tenants lists the tenants sorted by name, whatever their order in the policy file, so reports
    taken before and after an edit line up."""
    report = failing_small.call(failing_small.services.tenant_usage())
    assert [entry["tenant"] for entry in report] == ["paying", "rotating", "spent", "spent-limited", "tiny"]


def test_the_admin_report_writes_a_tiny_configured_budget_in_plain_notation(failing_small):
    """GET /admin/tenants shows a tenant's configured budget of 0.0000001 USD as written, not as `1E-7`."""
    report = {entry["tenant"]: entry for entry in failing_small.call(failing_small.services.tenant_usage())}
    assert report["tiny"]["spend"]["usd_per_day"] == "0.0000001"
    assert report["tiny"]["budget"]["usd_per_day"] == "0.0000001"
