"""End to end: tasks, POST /v1/outcomes and cost per successful task on GET /admin/stats.

Clients group calls with `x-gateway-task-id` / `x-gateway-workflow`, report
how a task went, and read cost per successful task by route, tenant and
workflow; every cost is checked against the simulator's usage x the prices.
Each test runs against the in-process outcome book and the Redis one.
"""

from __future__ import annotations

import os
import uuid
from decimal import Decimal

import pytest
import requests

from gateway.cost import format_usd
from tests.support import accounting
from tests.support.harness import Harness
from tests.support.policies import models, short_timeouts, standard_model, tenants
from tests.support.redis_server import RedisServer

ADMIN_TOKEN = "admin-secret-for-tests"
KEYS = {"alpha": "key-alpha-0001", "beta": "key-beta-0002"}
MESSAGES = [{"role": "user", "content": "Triage this ticket"}]

POLICY = models(
    standard_model("small", timeouts=short_timeouts()),
    standard_model("large", timeouts=short_timeouts()),
) + """
routes:
  - name: support
    match: {{models: ["support"]}}
    candidates: [small]
  - name: escalation
    match: {{models: ["escalation"]}}
    candidates: [large]
ledger: {{path: "@LEDGER@"}}
""" + tenants(KEYS)
SIMS = {"small": dict(ttft_ms=5, tpot_ms=1), "large": dict(ttft_ms=10, tpot_ms=2)}


@pytest.fixture(scope="module", params=["memory", "redis"])
def gw(request, tmp_path_factory):
    """The gateway with the in-process outcome book, then with the shared one on a real redis-server."""
    ledger = tmp_path_factory.mktemp("ledger") / "requests.jsonl"
    environ = {k: v for k, v in os.environ.items() if k != "GATEWAY_REDIS_URL"}
    environ.update(GATEWAY_ADMIN_TOKEN=ADMIN_TOKEN, OTEL_SDK_DISABLED="true")
    redis = RedisServer().start() if request.param == "redis" else None
    if redis is not None:
        environ["GATEWAY_REDIS_URL"] = redis.url
    harness = Harness(POLICY.replace("@LEDGER@", str(ledger)), SIMS, environ).start()
    harness.ledger_path = ledger
    yield harness
    harness.stop()
    if redis is not None:
        redis.stop()


# helpers -----------------------------------------------------------------------------------------

PRICES = {"support": ("0.10", "0.20"), "escalation": ("5.00", "15.00")}


def call(gw, task: str | None, max_tokens: int, *, route: str = "support", workflow: str | None = None,
         tenant: str = "alpha", stream: bool = False, request_id: str | None = None) -> tuple[str, Decimal]:
    """One chat call in a task: (x-request-id, its cost by hand from the simulator's usage)."""
    headers = {k: v for k, v in (("x-gateway-task-id", task), ("x-gateway-workflow", workflow),
                                 ("x-request-id", request_id)) if v}
    raw = gw.openai(api_key=KEYS[tenant]).chat.completions.with_raw_response.create(
        model=route, messages=MESSAGES, max_tokens=max_tokens, extra_headers=headers, stream=stream,
        **({"stream_options": {"include_usage": True}} if stream else {}))
    if stream:
        usage = list(raw.parse())[-1].usage
    else:
        usage = raw.parse().usage
    cost = accounting.api_cost(usage.prompt_tokens, usage.completion_tokens, *PRICES[route])
    if not stream:
        assert raw.headers["x-gateway-cost-usd"] == format_usd(cost)
    return raw.headers["x-request-id"], cost


def report(gw, body: object, tenant: str | None = "alpha", **kwargs) -> tuple[int, dict]:
    return accounting.post_outcome(gw.base_url, body, api_key=KEYS[tenant] if tenant else None, **kwargs)


def stats(gw) -> dict:
    return accounting.admin_stats(gw.base_url, ADMIN_TOKEN)


# tests -------------------------------------------------------------------------------------------

def test_cost_per_successful_task_by_route_workflow_and_tenant(gw):
    """A 3-call task reported as a success, beside a failed and an escalated task, gives the hand-computed stats."""
    good = sum(call(gw, "ticket-1", n, workflow="triage")[1] for n in (3, 5, 8))
    failed = call(gw, "ticket-2", 2, workflow="triage")[1]
    escalated = call(gw, "ticket-3", 4, workflow="triage")[1]
    for task, outcome in (("ticket-1", "success"), ("ticket-2", "failure"), ("ticket-3", "escalated")):
        status, body = report(gw, {"task_id": task, "outcome": outcome})
        assert status == 200, body
        assert (body["task_id"], body["outcome"], body["route"], body["workflow"]) == (
            task, outcome, "support", "triage")
    assert Decimal(body["cost_usd"]) == escalated
    total = good + failed + escalated
    summary = stats(gw)
    for group in (summary["workflow"]["triage"], summary["route"]["support"]):
        assert (group["tasks"], group["success"], group["failure"], group["escalated"]) == (3, 1, 1, 1)
        assert Decimal(group["cost_usd"]) == total
        assert Decimal(group["cost_per_successful_task_usd"]) == total      # failures were paid for too
        assert group["success_rate"] == pytest.approx(1 / 3)
        assert group["escalation_rate"] == pytest.approx(1 / 3)
    assert summary["tenant"]["alpha"]["tasks"] >= 3


def test_task_spanning_streams_and_routes_costs_all_its_calls(gw):
    """A task's cost adds its streamed calls and its calls on another route, and is reportable right after a stream."""
    cost = call(gw, "ticket-mixed", 3, workflow="mixed")[1]
    cost += call(gw, "ticket-mixed", 2, route="escalation", workflow="mixed")[1]
    request_id, streamed = call(gw, "ticket-mixed", 6, workflow="mixed", stream=True)
    status, body = report(gw, {"request_id": request_id, "outcome": "success"})
    assert status == 200, body
    assert body["task_id"] is None and body["route"] == "support"
    assert Decimal(body["cost_usd"]) == cost + streamed
    group = stats(gw)["workflow"]["mixed"]
    assert (group["tasks"], group["success"]) == (1, 1)
    assert Decimal(group["cost_per_successful_task_usd"]) == cost + streamed


def test_a_request_without_a_task_is_its_own_task(gw):
    """A lone request is reported by its x-request-id, with the value it produced."""
    request_id, cost = call(gw, None, 2, workflow="single-shot")
    status, body = report(gw, {"request_id": request_id, "outcome": "success", "value_usd": 0.5})
    assert status == 200, body
    assert Decimal(body["cost_usd"]) == cost
    group = stats(gw)["workflow"]["single-shot"]
    assert (group["tasks"], group["success"]) == (1, 1)
    assert Decimal(group["value_usd"]) == Decimal("0.5")


@pytest.mark.parametrize("body", [
    {"task_id": "TASK"},
    {"task_id": "TASK", "outcome": "great"},
    {"outcome": "success"},
    {"task_id": 7, "outcome": "success"},
    {"task_id": "", "outcome": "success"},
    {"task_id": "TASK", "outcome": "success", "value_usd": -1},
    {"task_id": "TASK", "outcome": "success", "value_usd": "lots"},
    {"task_id": "TASK", "outcome": "success", "value_usd": True},
    [1, 2],
])
def test_malformed_outcome_bodies_are_400_and_leave_the_task_reportable(gw, body):
    """Each malformed report is a 400 in OpenAI's error shape, and the task can still be reported afterwards."""
    task = f"ticket-{uuid.uuid4().hex[:8]}"
    call(gw, task, 1)
    status, error = report(gw, {**body, "task_id": task} if isinstance(body, dict) and body.get("task_id") == "TASK"
                           else body)
    assert status == 400, body
    assert set(error["error"]) == {"message", "type", "code", "param"}
    assert report(gw, {"task_id": task, "outcome": "success"})[0] == 200


def test_unknown_repeated_and_unparseable_reports(gw):
    """Unknown ids are 404, a body that is not JSON is 400, and a second report of one task is 409."""
    call(gw, "ticket-once", 1)
    assert report(gw, {"task_id": "no-such-task", "outcome": "success"})[0] == 404
    assert report(gw, {"request_id": "no-such-request", "outcome": "success"})[0] == 404
    assert report(gw, None, raw=b"{not json")[0] == 400
    assert report(gw, {"task_id": "ticket-once", "outcome": "failure"})[0] == 200
    status, error = report(gw, {"task_id": "ticket-once", "outcome": "success"})
    assert status == 409
    assert error["error"]["code"] == "outcome_already_reported"


def test_a_report_over_the_body_size_limit_is_413_and_the_task_stays_reportable(gw):
    """A report larger than server.max_body_bytes (20 MiB) is refused with 413 `request_too_large`, as a completion
    would be, and not booked: the task can still be reported."""
    call(gw, "ticket-huge", 1)
    status, error = report(gw, {"task_id": "ticket-huge", "outcome": "success", "note": "x" * (21 * 1024 * 1024)})
    assert status == 413 and error["error"]["code"] == "request_too_large", error
    assert report(gw, {"task_id": "ticket-huge", "outcome": "success"})[0] == 200


def test_a_tenant_reports_only_its_own_tasks(gw):
    """Another tenant's task is unknown (404) to a tenant, and a report without an API key is 401."""
    call(gw, "ticket-private", 1, tenant="alpha")
    assert report(gw, {"task_id": "ticket-private", "outcome": "success"}, tenant="beta")[0] == 404
    assert report(gw, {"task_id": "ticket-private", "outcome": "success"}, tenant=None)[0] == 401
    assert report(gw, {"task_id": "ticket-private", "outcome": "success"}, tenant="alpha")[0] == 200


def test_tenants_reusing_a_task_id_or_request_id_keep_their_own_records(gw):
    """Beta's calls under alpha's task id or x-request-id neither add to alpha's record nor take it: each tenant
    reports its own cost."""
    alpha_task = call(gw, "ticket-shared", 1, tenant="alpha")[1]
    beta_task = sum(call(gw, "ticket-shared", n, tenant="beta")[1] for n in (20, 30))
    alpha_request = call(gw, None, 1, tenant="alpha", request_id="req-shared")[1]
    beta_request = call(gw, None, 40, tenant="beta", request_id="req-shared")[1]
    for tenant, body, cost in (("alpha", {"task_id": "ticket-shared"}, alpha_task),
                               ("beta", {"task_id": "ticket-shared"}, beta_task),
                               ("alpha", {"request_id": "req-shared"}, alpha_request),
                               ("beta", {"request_id": "req-shared"}, beta_request)):
        status, reported = report(gw, {**body, "outcome": "success"}, tenant=tenant)
        assert status == 200, reported
        assert (reported["tenant"], Decimal(reported["cost_usd"])) == (tenant, cost)


def test_outcomes_are_written_to_the_ledger_beside_their_requests(gw):
    """The ledger carries each call with its task id and workflow, then the outcome line that judges them."""
    first, _ = call(gw, "ticket-ledger", 2, workflow="ledgered")
    second, _ = call(gw, "ticket-ledger", 3, workflow="ledgered")
    assert report(gw, {"task_id": "ticket-ledger", "outcome": "escalated"})[0] == 200
    for request_id in (first, second):
        record = accounting.ledger_record(gw.ledger_path, request_id)
        assert (record["task_id"], record["workflow"], record["tenant"]) == ("ticket-ledger", "ledgered", "alpha")
    outcome = accounting.ledger_find(
        gw.ledger_path, lambda line: line.get("type") == "outcome" and line.get("task_id") == "ticket-ledger")
    assert len(outcome) == 1 and outcome[0]["outcome"] == "escalated"


@pytest.mark.parametrize("header, value", [("x-gateway-workflow", "caf\xff"), ("x-gateway-task-id", "t\xff2"),
                                           ("x-gateway-task-id", "t" * 257)])
def test_a_task_header_that_is_no_utf8_text_is_refused_and_stats_stay_readable(gw, header, value):
    """A task id or workflow carrying a byte that is no UTF-8 (aiohttp reads it as a lone surrogate, which no ledger
    line, label or Prometheus text can hold), or too long, is a 400 naming the header; no upstream call is made,
    and /admin/stats keeps answering."""
    before = gw.sim_stats("small")["total"]
    answer = requests.post(f"{gw.base_url}/v1/chat/completions", timeout=10,
                           headers={"Authorization": f"Bearer {KEYS['alpha']}", header: value},
                           json={"model": "support", "messages": MESSAGES, "max_tokens": 2})
    assert answer.status_code == 400, answer.text
    assert header in answer.json()["error"]["message"]
    assert gw.sim_stats("small")["total"] == before
    assert isinstance(stats(gw), dict)         # an HTTP error would raise


def test_a_request_refused_before_routing_is_no_task(gw):
    """A request for a model no route serves is refused before routing: it books nothing, so its request id is
    unknown to /v1/outcomes and /admin/stats keeps answering."""
    answer = requests.post(f"{gw.base_url}/v1/chat/completions", timeout=10,
                           headers={"Authorization": f"Bearer {KEYS['alpha']}", "x-request-id": "refused-1"},
                           json={"model": "no-such-model", "messages": MESSAGES, "max_tokens": 2})
    assert answer.status_code == 404, answer.text
    assert report(gw, {"request_id": "refused-1", "outcome": "failure"})[0] == 404
    assert isinstance(stats(gw), dict)         # an HTTP error would raise
