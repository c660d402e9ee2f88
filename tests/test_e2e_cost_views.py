"""End to end: one request's cost told the same way in every view (ledger, metrics, tenant spend, cache saving)."""

from __future__ import annotations

from decimal import Decimal

import pytest

from gateway.outcomes_redis import PICO_USD
from tests.support import accounting
from tests.support.policies import models, price
from tests.test_e2e_energy import measured_gateway, measured_model

ENERGY_CACHED_POLICY = models(measured_model(price=price(0.10, 0.20))) + """
routes:
  - name: chat
    match: {{models: ["auto"]}}
    candidates: [small]
    cache: {{enabled: true, ttl_s: 60}}
energy: {{sample_interval_s: 0.05}}
ledger: {{path: "LEDGER"}}
"""


@pytest.fixture(scope="module")
def energy_cached_gw(tmp_path_factory):
    """A gateway whose one model is priced per token and per kWh of its DCGM-measured GPUs, with the cache on."""
    harness = measured_gateway(ENERGY_CACHED_POLICY, tmp_path_factory.mktemp("energy"))
    yield harness
    harness.stop()


def test_a_cache_hit_saves_what_the_answer_it_replays_cost_energy_included(energy_cached_gw):
    """A hit on an answer whose cost included the price of its measured GPU energy records that whole cost as
    saved, as the ledger charged it: the saving and the original's cost are one figure."""
    gw = energy_cached_gw
    client = gw.openai()
    messages = [{"role": "user", "content": "a cached answer on measured GPUs"}]
    first = client.chat.completions.with_raw_response.create(model="auto", messages=messages, temperature=0,
                                                             max_tokens=20)
    original = accounting.ledger_record(gw.ledger_path, first.headers["x-request-id"])
    assert original["cache"] == "stored" and original["energy_j"]
    hit = client.chat.completions.with_raw_response.create(model="auto", messages=messages, temperature=0,
                                                           max_tokens=20)
    assert hit.headers["x-gateway-cache"] == "hit"
    replayed = accounting.ledger_record(gw.ledger_path, hit.headers["x-request-id"])
    assert Decimal(replayed["saved_usd"]) == Decimal(original["cost_usd"])


def test_an_outcome_reported_as_soon_as_the_answer_came_counts_its_call_energy_included(energy_cached_gw):
    """A task whose one call ran on measured GPUs, reported the moment its answer arrived, is known to
    POST /v1/outcomes and costs what the ledger charged its call: the answer has ended, so the call is the task's
    (the outcome view must not wait on the GPU sampler to learn that the request happened)."""
    gw = energy_cached_gw
    client = gw.openai(default_headers={"x-gateway-task-id": "measured-task-1"})
    answer = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "a task on measured GPUs"}], max_tokens=20)
    status, reported = accounting.post_outcome(gw.base_url, {"task_id": "measured-task-1", "outcome": "success"})
    assert status == 200, reported
    record = accounting.ledger_record(gw.ledger_path, answer.headers["x-request-id"])
    assert record["energy_j"] and Decimal(reported["cost_usd"]) == Decimal(record["cost_usd"])


SLOW_SAMPLING_POLICY = ENERGY_CACHED_POLICY.replace("sample_interval_s: 0.05", "sample_interval_s: 1.0")


@pytest.fixture(scope="module")
def measured_pair(module_redis_server, tmp_path_factory):
    """Two gateways sharing one redis-server, each serving `small` on DCGM-measured GPUs sampled every second, so
    a call's joules are priced a good while after its answer."""
    gateways = [measured_gateway(SLOW_SAMPLING_POLICY, tmp_path_factory.mktemp(f"measured-{n}"),
                                 GATEWAY_REDIS_URL=module_redis_server.url) for n in range(2)]
    yield gateways
    for gateway in gateways:
        gateway.stop()


@pytest.mark.parametrize("by", ["task_id", "request_id"])
def test_an_outcome_reported_through_another_gateway_waits_for_the_call_still_being_priced(measured_pair, by):
    """A task's call on measured GPUs, served by one gateway and reported through another the moment its answer
    came (several workers or replicas share one port or Service): the report finds the call, at the whole cost
    the serving gateway's ledger charged it (energy included), not 404 unknown_id while its joules are priced."""
    served, reporting = measured_pair
    task = f"measured-elsewhere-{by}"
    client = served.openai(default_headers={"x-gateway-task-id": task})
    answer = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": f"priced after the answer, {by}"}], max_tokens=20)
    request_id = answer.headers["x-request-id"]
    status, reported = accounting.post_outcome(reporting.base_url, {by: task if by == "task_id" else request_id,
                                                                    "outcome": "success"})
    assert status == 200, reported
    record = accounting.ledger_record(served.ledger_path, request_id)
    # (the shared book keeps money to 1e-12 USD)
    assert record["energy_j"] and Decimal(reported["cost_usd"]) == Decimal(record["cost_usd"]).quantize(PICO_USD)
