"""Audit of the Responses API through the gateway: a continuation's pin against a budget's downgrade and a reject
route, the pin's store frozen on the response path, and `truncation: auto` against the context check."""

from __future__ import annotations

import json
import os
import time

import openai
import pytest

from tests.support import policies
from tests.support.accounting import ledger_record
from tests.support.harness import Harness, ledgered_harness, raw_model_gateway
from tests.support.policies import QUICK_STOP
from tests.support.redis_delay import DelayingRedisProxy

KEYS = {"acme": "sk-acme-audit", "thrifty": "sk-thrifty-audit"}
POLICY = policies.standard_models() + (
    # the smallest model, yet the dearest: the SLA plan picks it first, a budget's downgrade never does
    policies.model("tiny-dear", sim="small", size_b=0.5, tier=1, context_window=8192,
                   price=policies.price(50.0, 100.0), latency_prior=policies.latency(5, 1),
                   timeouts=policies.short_timeouts())
    # a text model with tool calling, and a vision model, as an agent's route would pair them
    + policies.model("text-tools", sim="small", size_b=0.5, tier=1, context_window=8192, supports=["tools"],
                     price=policies.price(0.1, 0.2), latency_prior=policies.latency(5, 1),
                     timeouts=policies.short_timeouts())
    + policies.model("vision", sim="medium", size_b=8, tier=2, context_window=32768, supports=["images", "tools"],
                     price=policies.price(1.0, 2.0), latency_prior=policies.latency(10, 2),
                     timeouts=policies.short_timeouts())) + """
routes:
  - name: big
    match: {{models: ["big"], endpoints: [responses]}}
    candidates: [large]
  - name: agents
    match: {{models: ["auto"], endpoints: [responses]}}
    candidates: [small, medium, large]
  - name: strict
    match: {{models: ["strict"], endpoints: [responses]}}
    candidates: [small, medium, large]
    sla: {{p95_ttft_ms: 5000, on_violation: reject}}
  - name: short
    match: {{models: ["short"], endpoints: [responses]}}
    candidates: [small]
  - name: probe
    match: {{models: ["probe"], endpoints: [responses]}}
    candidates: [tiny-dear, small]
  - name: screens
    match: {{models: ["screens"], endpoints: [responses]}}
    candidates: [text-tools, vision]
tenants:
  acme: {{keys_sha256: ["@acme@"]}}
  thrifty:
    keys_sha256: ["@thrifty@"]
    budget: {{usd_per_day: 0.000001, on_exhausted: downgrade}}
"""


def with_keys(template: str) -> str:
    for name, key in KEYS.items():
        template = template.replace(f"@{name}@", policies.sha256_hex(key))
    return template


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    harness = ledgered_harness(with_keys(POLICY), tmp_path_factory.mktemp("ledger"))
    yield harness
    harness.stop()


def create(gw: Harness, tenant: str = "acme", **fields):
    client = openai.OpenAI(base_url=f"{gw.base_url}/v1", api_key=KEYS[tenant], max_retries=0)
    return client.responses.with_raw_response.create(**{"model": "auto", "input": "Say hello.",
                                                        "max_output_tokens": 16, **fields})


def wait_until(predicate, timeout_s: float = 5.0):
    ends = time.monotonic() + timeout_s
    while time.monotonic() < ends:
        if (found := predicate()):
            return found
        time.sleep(0.05)
    raise AssertionError("the condition was not met in time")


def test_a_continuation_by_a_tenant_whose_budget_downgrades_still_goes_to_the_model_that_stored_it(gw):
    """Only the model that stored a response can continue it: a budget's downgrade re-plans the cheapest model
    first, but a continuation sent there names a response its server never stored."""
    stored = create(gw, tenant="thrifty", model="big")
    assert stored.headers["x-gateway-model"] == "large"
    # the budget is spent: a plain request is downgraded from the smallest model to the cheapest
    wait_until(lambda: create(gw, tenant="thrifty", model="probe").headers["x-gateway-model"] == "small")
    raw = create(gw, tenant="thrifty", previous_response_id=stored.parse().id)
    assert raw.headers["x-gateway-model"] == "large"
    # nor is it said to be downgraded (the ledger, the span): nothing was re-planned
    assert not ledger_record(gw.ledger_path, raw.headers["x-request-id"])["budget_downgrade"]


def test_a_continuation_on_a_reject_route_goes_to_the_model_that_stored_it_whatever_the_sla_headers(gw):
    """README: a request naming a stored response goes to the model that stored it, whatever the SLA would choose
    (x-gateway-* headers included); on a reject route a header no model meets must not turn it into a 503."""
    stored = create(gw, model="strict").parse()
    raw = create(gw, model="strict", previous_response_id=stored.id,
                 extra_headers={"x-gateway-max-latency-ms": "1"})
    assert raw.status_code == 200 and raw.headers["x-gateway-model"] == "small"


def test_truncation_auto_lets_a_history_longer_than_the_context_window_reach_the_model(gw):
    """With `truncation: auto` the server drops the oldest input items to fit its context window (the Agents
    SDK's long runs use it): the gateway must not refuse such a request as context_length_exceeded itself."""
    before = gw.sim_stats("small")["total"]
    turn = "a long earlier turn of the conversation " * 60           # about 480 tokens each
    history = [{"role": "user" if i % 2 == 0 else "assistant", "content": turn} for i in range(20)]
    history.append({"role": "user", "content": "And now, say hello."})
    gw.sim_config("small", context_window=1_000_000)   # the simulator does not truncate: it takes it all instead
    try:
        assert create(gw, model="short", input=history, truncation="auto").status_code == 200
    finally:
        gw.sim_config("small", context_window=8192)
    assert gw.sim_stats("small")["total"] == before + 1


def test_a_frozen_redis_costs_a_non_stream_response_the_store_timeout_once_per_back_off_not_every_time(
        module_redis_server):
    """A Redis that stops answering is waited for once, then left alone for the back-off (the store guard's
    promise): noting a response's model before the answer leaves must not make every answer wait the timeout."""
    proxy = DelayingRedisProxy(module_redis_server.port, 0.0).start()
    env = {**{k: v for k, v in os.environ.items() if k != "GATEWAY_REDIS_URL"},
           "GATEWAY_REDIS_URL": proxy.url, "OTEL_SDK_DISABLED": "true"}
    gw = Harness(with_keys(POLICY) + QUICK_STOP + "store: {{timeout_ms: 400}}\n", environ=env).start()
    try:
        create(gw)                                  # connected, and a pin noted
        proxy.holding.set()                         # Redis frozen: no reply comes
        started = time.monotonic()
        for _ in range(4):
            assert create(gw).status_code == 200
        elapsed_s = time.monotonic() - started
    finally:
        proxy.holding.clear()
        gw.stop()
        proxy.stop()
    # the first waits the 0.4 s timeout; the back-off (1 s) spares the others
    assert elapsed_s < 1.45, f"4 answers took {elapsed_s:.2f} s: each waited the store timeout"


def test_a_tenant_cannot_reach_another_tenants_stored_items_by_item_reference(gw):
    """An `item_reference` input item names an item of a stored response by its id, which the server (called with
    the gateway's one key) resolves for whoever names it: with tenants, a reference to an item the gateway did not
    relay to the tenant must be refused as a previous_response_id naming it is, not passed on."""
    stored = create(gw, tenant="acme").parse()
    item_id = stored.output[0].id
    before = gw.sim_stats("small")["total"]
    with pytest.raises(openai.BadRequestError) as refused:
        create(gw, tenant="thrifty", input=[{"type": "item_reference", "id": item_id},
                                            {"role": "user", "content": "Repeat that."}])
    assert refused.value.body["param"] == "input"
    assert gw.sim_stats("small")["total"] == before


def test_a_responses_stream_that_ends_whole_is_not_cut_with_an_error_whatever_n_says(gw):
    """The Responses API makes one answer (it has no `n`; a server that ignores the field answers once): a
    request carrying `n: 2` must not have its whole stream ended with an in-band error, waiting for a second."""
    client = openai.OpenAI(base_url=f"{gw.base_url}/v1", api_key=KEYS["acme"], max_retries=0)
    try:
        events = list(client.responses.create(model="auto", input="Say hello.", max_output_tokens=16, stream=True,
                                              extra_body={"n": 2}))
    except openai.BadRequestError as refused:        # refusing the field, as OpenAI does, is right too
        assert refused.body["param"] == "n"
        return
    assert events[-1].type in ("response.completed", "response.incomplete")


NOT_FOUND = json.dumps({"error": {"message": "Response with id 'resp_gone' not found.", "type": "invalid_request_error",
                                  "param": "response_id", "code": None}}).encode()
RAW_RESPONSES_ROUTE = """  - name: raw-responses
    match: {{models: ["raw-responses"], endpoints: [chat, responses]}}
    candidates: [raw]
    fallback: [medium]
routing: {{breaker: {{failure_threshold: 2, open_s: 30}}}}
"""


def test_a_continuation_the_server_does_not_know_is_the_clients_404_not_a_broken_model():
    """vLLM answers 404 "Response with id ... not found" to a previous_response_id it does not hold (expired, or
    served by a vLLM started without its store): that is the client's request, not a model serving no such path.
    It must reach the client as a 4xx, try no fallback (which has the response even less), and leave the
    model's circuit closed: the chat traffic of a model whose continuations miss must not be cut."""
    with raw_model_gateway(first_byte_s=2, tail=RAW_RESPONSES_ROUTE) as (gw, raw):
        raw.script = [(b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: "
                       + str(len(NOT_FOUND)).encode() + b"\r\n\r\n" + NOT_FOUND, 0)]
        client = gw.openai()
        before = gw.sim_stats("medium")["total"]
        for _ in range(3):
            with pytest.raises(openai.APIStatusError) as refused:
                client.responses.create(model="raw-responses", input="And then?", previous_response_id="resp_gone")
            assert refused.value.status_code in (400, 404), refused.value.body
        assert gw.sim_stats("medium")["total"] == before        # no fallback: no other server has it
        assert gw.services.fleet.breakers.state("raw") == "closed"


def test_a_screenshot_a_tool_returned_is_an_image_for_routing_and_counting_not_its_base64_text(gw):
    """A computer-use agent returns a screenshot from its tool as a function_call_output whose output is parts
    (`input_image`, the Agents SDK's ToolOutputImage): it needs a model that takes images, and it is an image's
    tokens, not 140,000 tokens of base64 that no context window of the route holds (a 400 before any model)."""
    screenshot = {"type": "input_image", "image_url": "data:image/png;base64," + "iVBORw0KGgo" * 20000}
    raw = create(gw, model="screens", tools=[{"type": "function", "name": "screenshot",
                                              "parameters": {"type": "object", "properties": {}}}],
                 input=[{"role": "user", "content": "What is on my screen?"},
                        {"type": "function_call", "call_id": "c1", "name": "screenshot", "arguments": "{}"},
                        {"type": "function_call_output", "call_id": "c1", "output": [screenshot]}])
    assert raw.status_code == 200 and raw.headers["x-gateway-model"] == "vision"
