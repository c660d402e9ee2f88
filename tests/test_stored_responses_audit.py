"""A review of the stored responses' calls (GET, input_items, DELETE, cancel through the gateway): a 404 for a call
its server does not serve keeps the response's pin, an answer past `server.max_answer_bytes` is refused however it
arrives, a model's error names the model and passes on its Retry-After, and no tenant shares the open gateway's name
(`anonymous`), with which it would share its stored responses.

A scripted model server (RawUpstream) answers what the simulator never does; the official openai SDK and urllib
are the clients."""

from __future__ import annotations

import gzip
import json

import openai
import pytest

from gateway.errors import PolicyError
from gateway.policy.load import load_policy, tenant_name_problem
from tests.support import policies
from tests.support.harness import Harness, raw_model_gateway, reset_raw_model
from tests.support.raw_upstream import http_head, json_answer
from tests.test_e2e_responses_stored import RAW_RESPONSE, RAW_ROUTE, stored_on_raw

#: the most of a model's answer the gateway under test reads
MAX_ANSWER_BYTES = 5000
#: FastAPI's answer for a path it has no route for: vLLM's for `/input_items` and `DELETE`, which it does not serve
ROUTE_NOT_FOUND = {"detail": "Not Found"}


@pytest.fixture(scope="module")
def raw_gw():
    tail = RAW_ROUTE + f"server: {{{{max_answer_bytes: {MAX_ANSWER_BYTES}}}}}\n"
    with raw_model_gateway(first_byte_s=0.5, total_s=2, tail=tail) as (harness, raw):
        yield harness, raw


@pytest.mark.parametrize("action", ["input_items", "cancel", "retrieve", "delete"])
def test_a_404_for_a_call_its_server_does_not_serve_keeps_the_response(raw_gw, action):
    """vLLM serves a stored response's retrieval and cancel but not its input items; a server without the
    Responses API's store serves none of them: such a 404 (FastAPI's, naming no response) says nothing of the
    response, which must stay retrievable, and continuable, through the gateway (forgetting it would lose the
    tenant's conversation with it). It is the gateway's set-up, as any model's 404 is: 502 `upstream_not_found`,
    naming the model."""
    harness, raw = raw_gw
    response_id = stored_on_raw(harness, raw)
    raw.script = json_answer(ROUTE_NOT_FOUND, status=404)
    calls = {"input_items": harness.openai().responses.input_items.list, "cancel": harness.openai().responses.cancel,
             "retrieve": harness.openai().responses.retrieve, "delete": harness.openai().responses.delete}
    with pytest.raises(openai.APIStatusError) as raised:
        calls[action](response_id)
    assert (raised.value.status_code, raised.value.code) == (502, "upstream_not_found")
    assert raised.value.response.headers["x-gateway-model"] == "raw"
    raw.script = json_answer(RAW_RESPONSE)
    assert harness.openai().responses.retrieve(response_id).id == response_id
    assert len(raw.requests) == 2                   # the server was asked again: the pin is still there


def test_a_404_naming_the_response_on_its_input_items_forgets_it(raw_gw):
    """A 404 that names the response says the server no longer has it, whichever call got it."""
    harness, raw = raw_gw
    response_id = stored_on_raw(harness, raw)
    raw.script = json_answer({"error": {"message": f"Response with id '{response_id}' not found."}}, status=404)
    with pytest.raises(openai.NotFoundError):
        harness.openai().responses.input_items.list(response_id)
    with pytest.raises(openai.NotFoundError):
        harness.openai().responses.retrieve(response_id)
    assert len(raw.requests) == 1


def test_a_404_for_a_retrieval_still_forgets_the_response(raw_gw):
    """The server no longer has the response (its 404 for the response itself): forgotten, the server not asked
    again."""
    harness, raw = raw_gw
    response_id = stored_on_raw(harness, raw)
    raw.script = json_answer({"error": {"message": f"Response with id '{response_id}' not found."}}, status=404)
    for _ in range(2):
        with pytest.raises(openai.NotFoundError):
            harness.openai().responses.retrieve(response_id)
    assert len(raw.requests) == 1


def test_the_models_refusal_names_the_model_and_its_retry_after(raw_gw):
    """A model's error on these calls is answered with the headers of any other of its errors: `x-gateway-model`
    (README: the server's answer, its error included, comes with it) and the model's Retry-After, also in
    milliseconds, which the SDKs wait for before trying again."""
    harness, raw = raw_gw
    response_id = stored_on_raw(harness, raw)
    raw.script = json_answer({"error": {"message": "Slow down."}}, status=429, headers={"Retry-After": "7"})
    with pytest.raises(openai.RateLimitError) as raised:
        harness.openai().responses.retrieve(response_id)
    headers = raised.value.response.headers
    assert (headers.get("x-gateway-model"), headers.get("retry-after"), headers.get("retry-after-ms")) == \
        ("raw", "7", "7000")
    raw.script = json_answer({"error": {"message": "Only responses created with background=true can be cancelled.",
                                        "type": "invalid_request_error"}}, status=400)
    with pytest.raises(openai.BadRequestError) as refused:
        harness.openai().responses.cancel(response_id)
    assert refused.value.response.headers.get("x-gateway-model") == "raw"
    assert refused.value.response.headers.get("x-request-id")


def chunked(body: bytes) -> bytes:
    return b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"


BIG = json.dumps({"id": "resp_raw1", "object": "response", "padding": "a" * (20 * MAX_ANSWER_BYTES)}).encode()
COMPRESSED = gzip.compress(BIG)


@pytest.mark.parametrize("answer", [
    http_head(200, {"Content-Type": "application/json", "Transfer-Encoding": "chunked"}) + chunked(BIG),
    http_head(200, {"Content-Type": "application/json", "Content-Encoding": "gzip"}, len(COMPRESSED)) + COMPRESSED,
], ids=["chunked", "gzip"])
def test_an_answer_past_max_answer_bytes_is_refused_however_it_arrives(raw_gw, answer):
    """`server.max_answer_bytes` bounds what is read into memory and relayed: an answer larger than it is a 502
    `upstream_bad_response` also when it comes whole with its head (chunked, with no Content-Length to refuse
    early), or compressed under the limit."""
    assert len(COMPRESSED) < MAX_ANSWER_BYTES < len(BIG)
    harness, raw = raw_gw
    response_id = stored_on_raw(harness, raw)
    raw.script = [(answer, 0.0)]
    with pytest.raises(openai.APIStatusError) as raised:
        harness.openai().responses.retrieve(response_id)
    assert raised.value.status_code == 502 and raised.value.code == "upstream_bad_response"
    assert "max_answer_bytes" in raised.value.message


@pytest.mark.parametrize("answer", [
    http_head(200, {"Content-Type": "application/json", "Transfer-Encoding": "chunked"}) + chunked(BIG),
    http_head(200, {"Content-Type": "application/json", "Content-Encoding": "gzip"}, len(COMPRESSED)) + COMPRESSED,
], ids=["chunked", "gzip"])
def test_a_generated_answer_past_max_answer_bytes_is_refused_however_it_arrives(raw_gw, answer):
    """The same bound on a model's answer to a generating call (`HttpTransport.complete` reads it the same way)."""
    harness, raw = raw_gw
    reset_raw_model(harness, raw)
    raw.script = [(answer, 0.0)]
    with pytest.raises(openai.APIStatusError) as raised:
        harness.openai().responses.create(model="raw-responses", input="Hi.")
    assert raised.value.status_code == 502 and raised.value.code == "upstream_bad_response"
    assert "max_answer_bytes" in raised.value.message


def test_an_answer_within_max_answer_bytes_is_relayed(raw_gw):
    harness, raw = raw_gw
    response_id = stored_on_raw(harness, raw)
    body = json.dumps(RAW_RESPONSE).encode()
    raw.script = [(http_head(200, {"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
                   + chunked(body), 0.0)]
    assert harness.openai().responses.retrieve(response_id).id == response_id


# the open gateway's callers and a tenant named `anonymous` ----------------------------------------------------------

OPEN_POLICY = policies.standard_models() + """
routes:
  - name: agents
    match: {{models: ["auto"], endpoints: [responses]}}
    candidates: [small]
"""
ANONYMOUS_KEY = "sk-anonymous-tenant"


def test_a_tenant_named_anonymous_cannot_reach_the_open_gateways_responses():
    """The open gateway's callers are `anonymous` in the pins (and outcome reports, metrics): a tenant of that name,
    added by a reload, would retrieve, delete and continue every response the gateway relayed while open, and
    the open gateway's callers its own after a reload back. The name is refused."""
    harness = Harness(OPEN_POLICY).start()
    try:
        created = harness.openai().responses.create(model="auto", input="A secret.", max_output_tokens=16)
        harness.write_policy(OPEN_POLICY + policies.tenants({"anonymous": ANONYMOUS_KEY}))
        if harness.reload_policy():
            tenant = openai.OpenAI(base_url=f"{harness.base_url}/v1", api_key=ANONYMOUS_KEY, max_retries=0)
            with pytest.raises(openai.NotFoundError):
                tenant.responses.retrieve(created.id)
            pytest.fail("a tenant named 'anonymous' was taken")
    finally:
        harness.stop()


def test_the_name_anonymous_is_refused_in_a_policy_and_for_a_new_key(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text((OPEN_POLICY + policies.tenants({"anonymous": ANONYMOUS_KEY})).format(
        small="http://127.0.0.1:1/v1", medium="http://127.0.0.1:2/v1", large="http://127.0.0.1:3/v1"))
    with pytest.raises(PolicyError, match="tenants.anonymous.*open gateway"):
        load_policy(path)
    assert "open gateway" in tenant_name_problem("anonymous")
    assert tenant_name_problem("Anonymous") is None and tenant_name_problem("acme") is None
