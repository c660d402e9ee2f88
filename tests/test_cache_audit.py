"""Audit of the response cache: a stored answer where the route has no model to call, the key's bookkeeping fields,
the key order a JSON schema's answer follows, audio answers that expire and completions the provider is asked to
store.

Gateways run in-process over the embedded in-memory store (no tenants: every caller is anonymous), in front of the
simulated `small` model or the scripted raw model server; clients are the official openai SDK.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.request

import openai
import pytest

from gateway.tenancy.identity import sha256_hex
from tests.support.harness import RAW_CACHED_ROUTE, Harness, raw_model_gateway, reset_raw_model
from tests.support.policies import models, short_timeouts, standard_model
from tests.support.raw_upstream import json_answer

STRICT_POLICY = models(standard_model("small", timeouts=short_timeouts())) + """
routes:
  - name: strict
    match: {{models: ["strict"]}}
    candidates: [small]
    sla: {{p95_latency_ms: 5000, on_violation: reject}}
    cache: {{enabled: true, ttl_s: 60}}
routing:
  breaker: {{failure_threshold: 1, open_s: 30}}
"""


def metrics_environ() -> dict[str, str]:
    """The environment with telemetry on (its /metrics endpoint), no OTLP export and no Redis."""
    return {k: v for k, v in os.environ.items() if k not in ("GATEWAY_REDIS_URL", "OTEL_SDK_DISABLED")}


@pytest.fixture(scope="module")
def strict_gw():
    harness = Harness(STRICT_POLICY, {"small": dict(ttft_ms=1, tpot_ms=0)},
                      {**metrics_environ(), "GATEWAY_PROMETHEUS": "1", "OTEL_METRIC_EXPORT_INTERVAL": "60000"}).start()
    yield harness
    harness.stop()


@pytest.fixture
def gw(strict_gw):
    """The strict gateway with its model answering and every circuit closed."""
    strict_gw.sim_config("small", error_rate=0.0)
    strict_gw.services.fleet.breakers._circuits.clear()
    return strict_gw


@pytest.fixture(scope="module")
def raw_env():
    with raw_model_gateway(first_byte_s=2, tail=RAW_CACHED_ROUTE) as running:
        yield running


@pytest.fixture
def raw_gw(raw_env):
    harness, raw = raw_env
    reset_raw_model(harness, raw)
    return harness, raw


def ask(content: str, model: str = "strict", **changes) -> dict:
    """A cacheable chat request (temperature 0)."""
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 5,
            "temperature": 0, **changes}


def chat(gw: Harness, headers: dict | None = None, **request):
    """A non-streamed chat through the SDK: (completion, response headers)."""
    raw = gw.openai().chat.completions.with_raw_response.create(**request, extra_headers=headers or {})
    return raw.parse(), raw.headers


# a stored answer where no model of the route may be called ---------------------------------------

def test_a_stored_answer_is_served_while_the_reject_route_s_only_model_has_an_open_circuit(gw):
    """During a model outage (its circuit open) a `reject` route still answers a request its cache holds, free, as
    README's Cache section promises for a candidate dropped only for an open circuit; a request it does not hold is
    still refused with the route's 503."""
    first, headers = chat(gw, **ask("outage"))
    assert headers["x-gateway-cache"] == "stored"
    gw.sim_config("small", error_rate=1.0)
    with pytest.raises(openai.InternalServerError):        # opens small's circuit (failure_threshold 1)
        chat(gw, **ask("another question"))
    again, headers = chat(gw, **ask("outage"))
    assert headers["x-gateway-cache"] == "hit" and headers["x-gateway-cost-usd"] == "0"
    assert again.choices[0].message.content == first.choices[0].message.content
    with pytest.raises(openai.InternalServerError) as refused:
        chat(gw, **ask("never asked before"))
    assert refused.value.response.json()["error"]["code"] == "sla_unmet"


def test_a_stored_answer_is_served_to_a_request_whose_headers_tighten_a_reject_route_past_every_model(gw):
    """A stored answer has no latency: a request whose `x-gateway-max-latency-ms` no model meets on a `reject` route
    is answered from the cache (a model dropped only for speed may answer it), not refused with a 503."""
    chat(gw, **ask("tight"))
    again, headers = chat(gw, headers={"x-gateway-max-latency-ms": "1"}, **ask("tight"))
    assert headers["x-gateway-cache"] == "hit"


# the key -----------------------------------------------------------------------------------------

def test_requests_differing_only_in_safety_identifier_or_prompt_cache_key_share_an_entry(gw):
    """`safety_identifier` (OpenAI's successor to `user`, one per end user) and `prompt_cache_key` are bookkeeping
    like `user`: requests differing only there get the stored answer, instead of a key per end user."""
    chat(gw, **ask("shared", safety_identifier="end-user-1", prompt_cache_key="app-a"))
    _, headers = chat(gw, **ask("shared", safety_identifier="end-user-2", prompt_cache_key="app-b"))
    assert headers["x-gateway-cache"] == "hit"


# the metrics -------------------------------------------------------------------------------------

def cache_lookups(gw: Harness) -> float:
    """gateway.cache.lookups summed over every label, as /metrics exports it now."""
    gw.call(asyncio.sleep(0.05))            # a request is recorded in a loop callback just after its response
    with urllib.request.urlopen(f"{gw.base_url}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("gateway_cache_lookups_total{"))


def test_a_no_cache_request_is_not_counted_as_a_cache_lookup(gw):
    """`Cache-Control: no-cache` skips the lookup (no gateway.cache.lookup span is made): gateway.cache.lookups does
    not count it, so a client that always refreshes does not lower the hit rate dashboards divide by lookups; an
    ordinary request's lookup is counted."""
    before = cache_lookups(gw)
    _, headers = chat(gw, headers={"Cache-Control": "no-cache"}, **ask("refreshed"))
    assert headers["x-gateway-cache"] == "stored"
    assert cache_lookups(gw) == before
    chat(gw, **ask("refreshed"))
    assert cache_lookups(gw) == before + 1


# structured outputs, audio and stored completions (SDK features) -----------------------------

def answer_with(message: dict) -> dict:
    """A whole chat answer of the scripted model carrying `message`."""
    return {"id": "chatcmpl-9", "object": "chat.completion", "created": 7, "model": "fake",
            "choices": [{"index": 0, "message": {"role": "assistant", "refusal": None, **message},
                         "logprobs": None, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}


def schema_format(*order: str) -> dict:
    """A strict json_schema response format whose properties come in `order` (required: the same names)."""
    return {"type": "json_schema", "json_schema": {"name": "reply", "strict": True, "schema": {
        "type": "object", "properties": {name: {"type": "string"} for name in order},
        "required": sorted(order), "additionalProperties": False}}}


def test_structured_outputs_whose_schema_properties_differ_in_order_do_not_share_a_cached_answer(raw_gw):
    """OpenAI generates a structured output's keys in its schema's order ("reasoning" before "answer" is
    chain-of-thought; the other order is not), so two requests whose schemas differ only there are two
    questions: the second is a miss, and gets its own answer, keys in its own order."""
    harness, raw = raw_gw
    raw.script_for = lambda body: json_answer(answer_with({"content": json.dumps(dict.fromkeys(
        json.loads(body)["response_format"]["json_schema"]["schema"]["properties"], "x"))}))
    client = harness.openai()
    asked = dict(model="raw-cached", messages=[{"role": "user", "content": "order"}], temperature=0)
    first = client.chat.completions.with_raw_response.create(
        **asked, response_format=schema_format("answer", "reasoning"))
    second = client.chat.completions.with_raw_response.create(
        **asked, response_format=schema_format("reasoning", "answer"))
    assert first.headers["x-gateway-cache"] == "stored"
    assert second.headers["x-gateway-cache"] == "stored"
    assert list(json.loads(second.parse().choices[0].message.content)) == ["reasoning", "answer"]


def test_a_model_server_s_own_schema_field_whose_properties_differ_in_order_does_not_share_a_cached_answer(raw_gw):
    """A self-hosted model's guided decoding (vLLM's `guided_json`, sent through the SDK's `extra_body`) writes its
    JSON in its schema's order too: the schema is hashed as sent whatever field carries it, not only the fields
    the gateway knows by name."""
    harness, raw = raw_gw
    raw.script_for = lambda body: json_answer(answer_with({"content": json.dumps(dict.fromkeys(
        json.loads(body)["guided_json"]["properties"], "x"))}))
    client = harness.openai()
    asked = dict(model="raw-cached", messages=[{"role": "user", "content": "guided"}], temperature=0)
    schema = schema_format("answer", "reasoning")["json_schema"]["schema"]
    other = schema_format("reasoning", "answer")["json_schema"]["schema"]
    first = client.chat.completions.with_raw_response.create(**asked, extra_body={"guided_json": schema})
    second = client.chat.completions.with_raw_response.create(**asked, extra_body={"guided_json": other})
    assert first.headers["x-gateway-cache"] == "stored"
    assert second.headers["x-gateway-cache"] == "stored"
    assert list(json.loads(second.parse().choices[0].message.content)) == ["reasoning", "answer"]


def test_a_cached_audio_answer_is_not_served_once_its_audio_has_expired(raw_gw):
    """An audio answer's `audio.id` is what the next turn of a voice conversation names, and the model server
    keeps it only until `audio.expires_at`: past that, a cached copy is no answer to give (its next turn would
    be refused), so the request is a miss and gets a fresh answer."""
    harness, raw = raw_gw
    expires_at = int(time.time()) + 1
    audio = {"id": "audio_1", "data": "AAAA", "expires_at": expires_at, "transcript": "Hi there"}
    raw.script = json_answer(answer_with({"content": None, "audio": audio}))
    client = harness.openai()
    asked = dict(model="raw-cached", messages=[{"role": "user", "content": "say hi"}], temperature=0,
                 modalities=["text", "audio"], audio={"voice": "alloy", "format": "wav"})
    assert client.chat.completions.with_raw_response.create(**asked).headers["x-gateway-cache"] == "stored"
    while time.time() <= expires_at:        # until the stored answer's audio has expired
        time.sleep(0.05)
    fresh = {**audio, "id": "audio_2", "expires_at": int(time.time()) + 3600}
    raw.script = json_answer(answer_with({"content": None, "audio": fresh}))
    again = client.chat.completions.create(**asked)
    assert again.choices[0].message.audio.id == "audio_2"


def test_a_request_asking_the_model_to_store_its_completion_reaches_the_model_even_when_the_answer_is_cached(raw_gw):
    """`store: true` asks OpenAI to keep the completion (with its `metadata`) for evals and distillation: an
    answer from the cache never reaches it, so such a request is sent to the model (its answer is still
    stored in the cache for the others)."""
    harness, raw = raw_gw
    raw.script = json_answer(answer_with({"content": "Hi"}))
    client = harness.openai()
    asked = dict(model="raw-cached", messages=[{"role": "user", "content": "keep me"}], temperature=0)
    assert client.chat.completions.with_raw_response.create(**asked).headers["x-gateway-cache"] == "stored"
    sent = len(raw.requests)
    kept = client.chat.completions.with_raw_response.create(**asked, store=True, metadata={"eval": "v2"})
    assert kept.headers["x-gateway-cache"] != "hit"
    assert len(raw.requests) == sent + 1
    assert json.loads(raw.requests[-1][1])["store"] is True


# a hit and the tenant's tokens per minute ----------------------------------------------------------------

TPM_KEY = "key-tpm-cache-0001"
TPM_POLICY = models(standard_model("small", timeouts=short_timeouts())) + """
routes:
  - name: cached
    match: {{models: ["cached"]}}
    candidates: [small]
    cache: {{enabled: true, ttl_s: 60}}
tenants:
""" + f'''  reader: {{{{keys_sha256: ["{sha256_hex(TPM_KEY)}"], limits: {{{{tokens_per_minute: 400}}}}}}}}
'''


def test_a_cache_hit_takes_nothing_of_the_tenants_tokens_per_minute():
    """A hit calls no model: it is admitted (its reservation checked) but uses none of the tenant's tokens per
    minute, so a tenant whose traffic the cache answers is not throttled as if a model served every request; the
    miss that stored the answer counts its real tokens."""
    harness = Harness(TPM_POLICY, {"small": dict(ttft_ms=1, tpot_ms=0)}).start()
    try:
        client = harness.openai(api_key=TPM_KEY)
        ask = dict(model="cached", messages=[{"role": "user", "content": "the same question"}], max_tokens=60,
                   temperature=0)
        caches = [client.chat.completions.with_raw_response.create(**ask).headers["x-gateway-cache"]
                  for _ in range(8)]     # each reserves about 70 tokens; eight misses would pass 400
        assert caches == ["stored"] + ["hit"] * 7
    finally:
        harness.stop()
