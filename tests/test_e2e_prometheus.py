"""End to end: a real Prometheus scrapes the gateway's /metrics and answers token usage by model and tenant."""

from __future__ import annotations

import hashlib
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.support.harness import DEFAULT_POLICY, Harness
from tests.support.policies import QUICK_STOP, tenants
from tests.support.prometheus import PROMETHEUS, Prometheus

pytestmark = pytest.mark.skipif(not Path(PROMETHEUS).exists(),
                                reason="the `prometheus` OS package is not installed (no prometheus binary)")

KEYS = {"acme": "key-acme", "globex": "key-globex"}
POLICY = DEFAULT_POLICY + tenants(KEYS)
TOKEN_USAGE = "gen_ai_client_token_usage"


@pytest.fixture(scope="module")
def gw():
    """A gateway with the Prometheus endpoint turned on through GATEWAY_PROMETHEUS=1, and no OTLP export."""
    harness = Harness(POLICY, environ={"GATEWAY_PROMETHEUS": "1", "OTEL_METRIC_EXPORT_INTERVAL": "60000"}).start()
    yield harness
    harness.stop()


@pytest.fixture
def prometheus(gw, tmp_path):
    """Prometheus scraping the gateway's /metrics every second."""
    server = Prometheus(tmp_path, f"127.0.0.1:{gw.port}")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def test_prometheus_reports_token_usage_by_model_and_tenant(gw, prometheus):
    """After SDK requests by two tenants, PromQL token usage by tenant, model and token type matches the usage returned."""
    expected_sum: dict[tuple, float] = {}
    for tenant, requests in (("acme", 2), ("globex", 1)):
        client = gw.openai(api_key=KEYS[tenant])
        for _ in range(requests):
            completion = client.chat.completions.create(
                model="auto", max_tokens=5, messages=[{"role": "user", "content": f"hi {uuid.uuid4().hex}"}])
            usage = completion.usage
            for kind, used in (("input", usage.prompt_tokens), ("output", usage.completion_tokens)):
                key = (("gateway_model_selected", "small"), ("gateway_tenant", tenant), ("gen_ai_token_type", kind))
                expected_sum[key] = expected_sum.get(key, 0) + used
    by = "gateway_tenant, gateway_model_selected, gen_ai_token_type"

    sums = prometheus.wait_for(f"sum by ({by}) ({TOKEN_USAGE}_sum)", expected_sum)
    assert sums == expected_sum
    counts = prometheus.query(f"sum by ({by}) ({TOKEN_USAGE}_count)")
    assert counts == {key: (2.0 if ("gateway_tenant", "acme") in key else 1.0) for key in expected_sum}
    output_buckets = f'{TOKEN_USAGE}_bucket{{le="+Inf", gen_ai_token_type="output"}}'
    buckets = prometheus.query(f"sum by (gateway_tenant) ({output_buckets})")
    assert buckets == {(("gateway_tenant", "acme"),): 2.0, (("gateway_tenant", "globex"),): 1.0}
    requests = prometheus.query("sum by (gateway_tenant, gateway_route, gateway_fallback_state) "
                                "(gateway_requests_total)")
    assert requests[(("gateway_fallback_state", "none"), ("gateway_route", "chat-default"),
                     ("gateway_tenant", "acme"))] == 2.0


def test_store_failures_are_exported_by_part(redis_server):
    """With Redis gone, admissions answered per on_store_failure show as gateway.store.failures{part=limits}."""
    policy = (DEFAULT_POLICY + tenants(KEYS)
              + "  limited: {{keys_sha256: [\"%s\"], limits: {{requests_per_minute: 100}}}}\n"
              % hashlib.sha256(b"key-limited").hexdigest() + QUICK_STOP)
    harness = Harness(policy, environ={"GATEWAY_PROMETHEUS": "1", "OTEL_METRIC_EXPORT_INTERVAL": "60000",
                                       "GATEWAY_REDIS_URL": redis_server.url}).start()
    try:
        client = harness.openai(api_key="key-limited")
        client.chat.completions.create(model="auto", max_tokens=3, messages=[{"role": "user", "content": "up"}])
        redis_server.stop()
        for _ in range(3):
            client.chat.completions.create(model="auto", max_tokens=3, messages=[{"role": "user", "content": "down"}])
        with urllib.request.urlopen(f"{harness.base_url}/metrics", timeout=5) as response:
            text = response.read().decode()
        failures = {line.split("gateway_store_part=\"")[1].split("\"")[0]: float(line.rsplit(" ", 1)[1])
                    for line in text.splitlines() if line.startswith("gateway_store_failures_total{")}
        # the tenant's spend is charged too (a charge Redis did not take is retried, then counted, under budgets)
        assert failures["limits"] == 3 and "budgets" in failures
    finally:
        harness.stop()


def test_a_tenant_a_reload_removed_gives_its_label_place_to_the_next_one():
    """With `tenant_label_top_n: 1`, the first tenant to call keeps its name and the next is `other`; once a reload
    removes the first, the next tenant to call is named in the metrics, not `other` for as long as the process
    runs."""
    keys = {"first": "key-first", "second": "key-second"}
    head = DEFAULT_POLICY + "telemetry: {{tenant_label_top_n: 1}}\n"
    harness = Harness(head + tenants(keys), environ={"GATEWAY_PROMETHEUS": "1",
                                                    "OTEL_METRIC_EXPORT_INTERVAL": "60000"}).start()

    def requests_of() -> set[str]:
        with urllib.request.urlopen(f"{harness.base_url}/metrics", timeout=10) as response:
            text = response.read().decode()
        return {line.split('gateway_tenant="', 1)[1].split('"', 1)[0] for line in text.splitlines()
                if line.startswith("gateway_requests_total{")}

    def call(tenant: str) -> None:
        harness.openai(api_key=keys[tenant]).chat.completions.create(
            model="auto", max_tokens=2, messages=[{"role": "user", "content": "hi"}])

    try:
        call("first")
        call("second")
        assert requests_of() == {"first", "other"}
        harness.write_policy(head + tenants({"second": keys["second"]}))
        assert harness.reload_policy()
        call("second")
        assert "second" in requests_of()
    finally:
        harness.stop()
