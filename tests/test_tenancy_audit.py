"""Tenancy as a platform team running many tenants sees it: what the admin report and the budget's refusals say."""

from __future__ import annotations

import json
import urllib.request
from datetime import UTC, datetime

import openai
import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.errors import PolicyError
from gateway.policy.load import parse_policy
from gateway.stages.parse import grouping_header
from gateway.tenancy.keys import new_key
from gateway.telemetry.peers import merged
from tests.support.harness import DEFAULT_SIMS, Harness
from tests.support.policies import SMART_AND_EMBEDDINGS_ROUTES, models, standard_model, standard_models

ADMIN_TOKEN = "admin-" + new_key()[0]
CONC, TPM, PRICEY = new_key(), new_key(), new_key()
HELLO = [{"role": "user", "content": "Hello there"}]

POLICY = standard_models(*DEFAULT_SIMS) + """
routes:
  - name: chat-default
    match: {{models: ["auto"], endpoints: [chat]}}
    candidates: [small, medium, large]
""" + SMART_AND_EMBEDDINGS_ROUTES + f"""
tenants:
  conc-only: {{{{keys_sha256: ["{CONC[1]}"], limits: {{{{concurrent: 5}}}}}}}}
  tpm-only: {{{{keys_sha256: ["{TPM[1]}"], limits: {{{{tokens_per_minute: 100000}}}}}}}}
  pricey: {{{{keys_sha256: ["{PRICEY[1]}"], budget: {{{{usd_per_day: 0.0001}}}}}}}}
"""


@pytest.fixture(scope="module")
def gw():
    harness = Harness(POLICY, environ={"GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN, "OTEL_SDK_DISABLED": "true"}).start()
    yield harness
    harness.stop()


def usage_of(gw: Harness, tenant: str) -> dict:
    """The `usage` GET /admin/tenants reports for one tenant."""
    request = urllib.request.Request(f"{gw.base_url}/admin/tenants", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        report = json.loads(response.read())["tenants"]
    return next(entry["usage"] for entry in report if entry["tenant"] == tenant)


@pytest.mark.parametrize("key, tenant, counts", [(CONC, "conc-only", ("requests", "tokens")),
                                                  (TPM, "tpm-only", ("requests",))])
def test_the_admin_report_never_shows_zero_for_a_count_it_does_not_keep(gw, key, tenant, counts):
    """A tenant limited only by concurrency (or only by tokens) that made requests in the last minute is not reported
    as having made none: a count the limiter does not keep for it is unknown (null), never 0."""
    sdk = gw.openai(api_key=key[0])
    for _ in range(3):
        sdk.chat.completions.create(model="auto", messages=HELLO, max_tokens=5)
    usage = usage_of(gw, tenant)
    for count in counts:
        assert usage[count] is None or usage[count] > 0, f"{tenant} reported {count}={usage[count]} after 3 requests"


def test_a_request_dearer_than_the_whole_budget_is_not_told_to_retry_when_the_period_ends(gw):
    """A request whose predicted cost is more than the whole day's budget can never be admitted, however long it
    waits: with 30 s left of the day it is refused with `x-should-retry: false` (the SDK would retry it at
    midnight and be refused again), as a request larger than tokens_per_minute is."""
    budgets = gw.services.stores.budgets
    midnight_s = datetime(2026, 1, 2, tzinfo=UTC).timestamp()
    clock, budgets.clock = budgets.clock, lambda: midnight_s - 30
    try:
        with pytest.raises(openai.RateLimitError) as caught:   # medium: 5 000 output tokens at $2/M = $0.01
            gw.openai(api_key=PRICEY[0]).chat.completions.create(model="smart", messages=HELLO, max_tokens=5000)
    finally:
        budgets.clock = clock
    assert caught.value.code == "budget_exceeded"
    assert caught.value.response.headers.get("x-should-retry") == "false", dict(caught.value.response.headers)


def test_a_key_hash_given_to_two_tenants_is_refused_without_quoting_the_hash():
    """The same key given to two tenants is a policy problem, said without the key's hash: problems are logged by a
    failed reload and shown by GET /admin/policy, and the README promises keys and hashes never reach the logs."""
    shared = new_key()[1]
    text = models(standard_model("small")).format(small="http://127.0.0.1:9") + f"""
routes:
  - name: chat
    match: {{models: ["auto"]}}
    candidates: [small]
tenants:
  alpha: {{keys_sha256: ["{shared}"]}}
  beta: {{keys_sha256: ["{shared}"]}}
"""
    with pytest.raises(PolicyError) as caught:
        parse_policy(text)
    assert "tenants.beta.keys_sha256[0]" in str(caught.value)
    assert shared not in str(caught.value)


def test_a_merged_scrape_of_several_workers_stays_parseable_whatever_a_label_value_holds():
    """Under `gateway run --workers N` a scrape merges every worker's exposition. A label value may hold any UTF-8
    text but a line feed: a tenant named `acme\\u2028corp` (the policy accepts it), or a workflow a tenant's client
    sends in `x-gateway-workflow` (accepted: no control character), must not split its sample across lines, which
    makes Prometheus reject the whole scrape, every tenant's series with it."""
    odd = "acme\u2028corp"
    assert grouping_header({"x-gateway-workflow": odd}, "x-gateway-workflow") == odd
    registry = CollectorRegistry()
    Counter("gateway_task_outcomes", "tasks", ["gateway_workflow"], registry=registry).labels(odd).inc()
    text = merged([(0, generate_latest(registry)), (1, generate_latest(registry))]).decode()
    samples = [sample for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == "gateway_task_outcomes_total"]
    assert sorted((s.labels["gateway_worker"], s.labels["gateway_workflow"]) for s in samples) == \
        [("0", odd), ("1", odd)]
