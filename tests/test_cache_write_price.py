"""Prompt tokens written to the provider's prompt cache, priced apart (`price.cache_write_input_per_mtok`): OpenAI's
`cache_write_tokens` (chat and Responses usage) and Anthropic's `cache_creation_input_tokens`, read from usage,
priced, kept in the ledger's attempts and priced again by `gateway replay`."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest

from gateway.context import Usage
from gateway.cost import request_cost_usd
from gateway.policy.load import parse_policy
from gateway.policy.model import Match, Model, Policy, Price, Route
from gateway.replay import read_traffic, replay
from gateway.tokens import usage_from_response
from tests.support.accounting import ledger_record
from tests.support.harness import ledgered_raw_model_gateway
from tests.support.raw_upstream import json_answer

#: Anthropic-like prices: 3 in, 0.30 read from the cache, 3.75 written to it (1.25x), 15 out
PRICE = Price(Decimal(3), Decimal(15), cached_input_per_mtok=Decimal("0.30"),
              cache_write_input_per_mtok=Decimal("3.75"))
MODEL = Model(name="m", endpoint="http://127.0.0.1:1/v1", upstream_model="m", price=PRICE)


@pytest.mark.parametrize(("usage", "expected"), [
    # OpenAI chat: prompt_tokens_details
    ({"prompt_tokens": 1000, "completion_tokens": 10, "prompt_tokens_details": {
        "cached_tokens": 200, "cache_write_tokens": 700}}, (1000, 200, 700)),
    # the Responses API: input_tokens_details
    ({"input_tokens": 1000, "output_tokens": 10, "input_tokens_details": {
        "cached_tokens": 0, "cache_write_tokens": 900}, "output_tokens_details": {"reasoning_tokens": 0}},
     (1000, 0, 900)),
    # Anthropic's own: the input leaves its cache reads and writes out
    ({"input_tokens": 100, "output_tokens": 10, "cache_read_input_tokens": 200,
      "cache_creation_input_tokens": 700}, (1000, 200, 700)),
    # a proxy's (LiteLLM): OpenAI's prompt_tokens, which hold them, and Anthropic's counts beside
    ({"prompt_tokens": 1000, "completion_tokens": 10, "cache_creation_input_tokens": 700,
      "prompt_tokens_details": {"cached_tokens": 200}}, (1000, 200, 700)),
    # more written than the input leaves after the cached: capped
    ({"prompt_tokens": 1000, "completion_tokens": 10, "prompt_tokens_details": {
        "cached_tokens": 600, "cache_write_tokens": 700}}, (1000, 600, 400)),
    ({"prompt_tokens": 1000, "completion_tokens": 10}, (1000, 0, 0)),
])
def test_written_tokens_are_read_from_each_usage_shape(usage, expected):
    parsed = usage_from_response({"usage": usage})
    assert (parsed.input_tokens, parsed.cached_input_tokens, parsed.cache_write_input_tokens) == expected


def test_written_tokens_pay_the_cache_write_price_and_default_to_the_input_price():
    usage = Usage(input_tokens=1000, output_tokens=10, cached_input_tokens=200, cache_write_input_tokens=700)
    # (100 x 3 + 200 x 0.30 + 700 x 3.75 + 10 x 15) / 1e6
    assert request_cost_usd(MODEL, usage) == Decimal("0.003135")
    plain = Model(name="p", endpoint="e", upstream_model="p", price=Price(Decimal(3), Decimal(15)))
    assert request_cost_usd(plain, usage) == (1000 * Decimal(3) + 10 * Decimal(15)) / Decimal(1_000_000)


def test_the_price_is_a_policy_key():
    policy = parse_policy("""version: 1
models:
  m: {endpoint: "http://127.0.0.1:1/v1", price: {input_per_mtok: 3, output_per_mtok: 15,
                                                 cache_write_input_per_mtok: 3.75}}
routes:
  - {name: r, candidates: [m]}
""")
    assert policy.models["m"].price.cache_write_input_per_mtok == Decimal("3.75")


def test_a_call_is_billed_for_its_writes_and_its_ledger_line_replays_at_the_same_cost(tmp_path: Path):
    """A model server reports 700 of 1,000 prompt tokens written to its cache: the request is billed the write
    price for them (its x-gateway-cost-usd), its ledger attempt keeps them, and `gateway replay` of that line
    under the same policy books the same cost."""
    keys = "    price: {{input_per_mtok: 3, output_per_mtok: 15, cache_write_input_per_mtok: 3.75}}\n"
    answer = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "fake",
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
              "usage": {"prompt_tokens": 1000, "completion_tokens": 10, "total_tokens": 1010,
                        "prompt_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 700}}}
    with ledgered_raw_model_gateway(tmp_path, first_byte_s=2, raw_keys=keys) as (gw, raw):
        raw.script = json_answer(answer)
        response = gw.openai().chat.completions.with_raw_response.create(
            model="raw-only", messages=[{"role": "user", "content": "hi"}], max_tokens=10)
        # (300 x 3 + 700 x 3.75 + 10 x 15) / 1e6
        assert Decimal(response.headers["x-gateway-cost-usd"]) == Decimal("0.003675")
        line = ledger_record(gw.ledger_path, response.headers["x-request-id"])
        policy = gw.holder.current.policy
    assert line["attempts"][-1]["cache_write_input_tokens"] == 700
    ledger = tmp_path / "one.jsonl"
    ledger.write_text(json.dumps(line) + "\n")
    replay_policy = Policy(version=1, models={"raw": policy.models["raw"]},
                           routes=(Route("raw-only", Match(models=("raw-only",)), candidates=("raw",)),))
    outcome, = replay(replay_policy, read_traffic(ledger, "ledger"), jitter_sigma=0.0).outcomes
    assert outcome.cost_usd == Decimal("0.003675")
