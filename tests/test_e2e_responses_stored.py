"""End to end: a stored response retrieved, listed, deleted and cancelled through the gateway, with the official openai
SDK, on the model server that stored it; for the tenant it was relayed to alone; its store shared by replicas in a
real redis-server, and down."""

from __future__ import annotations

import os
import time

import urllib.error
import urllib.request

import openai
import pytest
import redis

from tests.support.harness import DEFAULT_SIMS, Harness, raw_model_gateway, raw_model_policy, reset_raw_model
from tests.support.policies import QUICK_STOP
from tests.support.raw_upstream import RawUpstream, http_head, json_answer
from tests.test_e2e_responses import KEYS, POLICY
from tests.test_e2e_telemetry import CALLER_SPAN_ID, exported_trace, new_traceparent, one, otel_environ

STORED_GET = "/v1/responses/{response_id}"


@pytest.fixture(scope="module")
def gw():
    harness = Harness(POLICY).start()
    yield harness
    harness.stop()


def client(gw: Harness, tenant: str = "acme", prefix: str = "/v1") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.base_url}{prefix}", api_key=KEYS[tenant], max_retries=0)


def stored(gw: Harness, tenant: str = "acme", **fields):
    return client(gw, tenant).responses.create(**{"model": "auto", "input": "Say hello.", "max_output_tokens": 16,
                                                  **fields})


def asked(gw: Harness, route: str = STORED_GET, model: str = "small") -> int:
    """How many calls on stored responses the model's server answered (counted by route, not by id)."""
    return sum(gw.sim_stats(model)["by_endpoint"].get(route, {}).values())


def test_a_stored_response_is_retrieved_from_the_server_that_stored_it(gw):
    created = stored(gw, instructions="Be brief.")
    raw = client(gw).responses.with_raw_response.retrieve(created.id)
    found = raw.parse()
    assert (found.id, found.output_text, found.usage.output_tokens) == (created.id, created.output_text, 16)
    assert raw.headers["x-request-id"] and raw.headers["x-gateway-model"] == "small"
    request = next(r for r in reversed(gw.sim_requests("small")) if r["method"] == "GET")
    assert request["path"] == f"/v1/responses/{created.id}"
    assert request["headers"]["x-request-id"] == raw.headers["x-request-id"]
    assert KEYS["acme"] not in str(request["headers"])         # the tenant's key never reaches the model server


def test_a_streamed_response_is_retrieved_once_it_has_ended(gw):
    with client(gw).responses.stream(model="auto", input="Say hello.") as stream:
        final = stream.get_final_response()
    assert client(gw).responses.retrieve(final.id).output_text == final.output_text


def test_another_tenants_response_is_not_found_and_its_server_never_asked(gw):
    created = stored(gw)
    before = asked(gw)
    with pytest.raises(openai.NotFoundError, match=f"Response with id '{created.id}' not found"):
        client(gw, "bravo").responses.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        client(gw, "bravo").responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        client(gw, "bravo").responses.input_items.list(created.id)
    assert asked(gw) == before
    assert client(gw).responses.retrieve(created.id).id == created.id      # still there for its own tenant


def test_a_response_not_stored_or_unknown_is_not_found(gw):
    unstored = stored(gw, store=False)
    before = asked(gw)
    for response_id in (unstored.id, "resp_never_relayed", "a" * 300):
        with pytest.raises(openai.NotFoundError) as raised:
            client(gw).responses.retrieve(response_id)
        assert raised.value.body["message"].startswith("Response with id")
    for path in ("resp_x%2F..%2Fmodels", "..%2F..%2Fadmin", "%00"):    # what the SDK would not send
        request = urllib.request.Request(f"{gw.base_url}/v1/responses/{path}",
                                         headers={"Authorization": f"Bearer {KEYS['acme']}"})
        with pytest.raises(urllib.error.HTTPError) as raised:
            urllib.request.urlopen(request, timeout=10)
        assert raised.value.code == 404 and b"not found" in raised.value.read()
    assert asked(gw) == before


def test_input_items_are_listed_with_the_clients_query(gw):
    created = stored(gw, input=[{"role": "user", "content": "First."}, {"role": "user", "content": "Second."}])
    items = client(gw).responses.input_items.list(created.id, order="asc", limit=1)
    assert [item.content[0].text for item in items.data] == ["First."] and items.has_more
    newest = client(gw).responses.input_items.list(created.id)
    assert [item.content[0].text for item in newest.data] == ["Second.", "First."]
    paths = [r["path"] for r in gw.sim_requests("small") if r["method"] == "GET"]
    assert f"/v1/responses/{created.id}/input_items" in paths


def test_a_deleted_response_is_forgotten(gw):
    created = stored(gw)
    deleted = client(gw).responses.with_raw_response.delete(created.id)
    assert deleted.status_code == 200 and deleted.http_response.json()["deleted"] is True
    before = asked(gw)
    with pytest.raises(openai.NotFoundError):
        client(gw).responses.retrieve(created.id)
    assert asked(gw) == before                  # its pin went with it: the server is not asked again
    with pytest.raises(openai.BadRequestError, match="not found"):
        stored(gw, previous_response_id=created.id)


def test_a_response_its_server_no_longer_has_is_not_found_and_forgotten(gw):
    created = stored(gw)
    assert client(gw).responses.retrieve(created.id).id == created.id
    gw.http("POST", f"{gw.sims['small'].control_url}/reset")      # the server restarted: its store is empty
    with pytest.raises(openai.NotFoundError, match=created.id):
        client(gw).responses.retrieve(created.id)
    before = asked(gw)
    with pytest.raises(openai.NotFoundError):
        client(gw).responses.retrieve(created.id)
    assert asked(gw) == before


def test_cancel_passes_on_the_servers_refusal(gw):
    created = stored(gw)
    with pytest.raises(openai.BadRequestError, match="background=true"):
        client(gw).responses.cancel(created.id)
    assert client(gw).responses.retrieve(created.id).id == created.id


def test_streaming_a_response_not_made_in_the_background_is_the_servers_to_refuse(gw):
    """The gateway relays `?stream=true` to the server that stored it, which refuses it for a response answered at
    once (OpenAI's and vLLM's 400); `stream=false` is the JSON retrieval."""
    created = stored(gw)
    with pytest.raises(openai.BadRequestError) as raised:
        for _ in client(gw).responses.retrieve(created.id, stream=True):
            pass
    assert raised.value.param == "stream" and "background" in raised.value.message
    assert [r["path"] for r in gw.sim_requests("small")][-1] == f"/v1/responses/{created.id}"
    assert client(gw).responses.retrieve(created.id, extra_query={"stream": "false"}).id == created.id


def test_azure_paths_reach_the_same_response(gw):
    created = stored(gw)
    for prefix in ("/openai/v1", "/openai"):
        assert client(gw, prefix=prefix).responses.retrieve(created.id).id == created.id


def test_the_azure_sdk_creates_retrieves_and_deletes_a_response(gw):
    """AzureOpenAI's responses.create() posts to /openai/responses (no deployment in its path), which was a 404;
    its calls on the stored response go to /openai/responses/{id}, with its api-version."""
    azure = openai.AzureOpenAI(azure_endpoint=gw.base_url, api_key=KEYS["acme"], api_version="2025-04-01-preview",
                               max_retries=0)
    raw = azure.responses.with_raw_response.create(model="auto", input="Say hello.", max_output_tokens=16)
    created = raw.parse()
    assert raw.headers["x-gateway-route"] == "agents" and created.output_text
    assert azure.responses.retrieve(created.id).output_text == created.output_text
    azure.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        azure.responses.retrieve(created.id)


def test_an_unknown_key_is_refused_before_any_lookup(gw):
    created = stored(gw)
    request = urllib.request.Request(f"{gw.base_url}/v1/responses/{created.id}",
                                     headers={"Authorization": "Bearer sk-nobody"})
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=10)
    assert raised.value.code == 401


def test_a_response_whose_model_left_the_policy_is_not_found(gw):
    raw = client(gw).responses.with_raw_response.create(model="auto", input="Hi.",
                                                        extra_headers={"x-gateway-min-tier": "3"})
    created = raw.parse()
    assert raw.headers["x-gateway-model"] == "large"
    assert client(gw).responses.retrieve(created.id).id == created.id
    without_large = POLICY.replace("[small, medium, large]", "[small, medium]")
    gw.write_policy(policies_without(without_large, "large"))
    try:
        assert gw.reload_policy()
        with pytest.raises(openai.NotFoundError):
            client(gw).responses.retrieve(created.id)
    finally:
        gw.write_policy(POLICY)
        assert gw.reload_policy()


def policies_without(policy: str, model: str) -> str:
    """`policy` without the model `model` (its entry under `models:`, up to the next one)."""
    lines = policy.splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.startswith(f"  {model}:"))
    end = next(i for i in range(start + 1, len(lines)) if not lines[i].startswith("    "))
    return "".join(lines[:start] + lines[end:])


# a model server answering what the simulator never does ------------------------------------------------------------

RAW_ROUTE = """  - name: raw-responses
    match: {{models: ["raw-responses"], endpoints: [responses]}}
    candidates: [raw]
"""
RAW_RESPONSE = {"id": "resp_raw1", "object": "response", "created_at": 1, "status": "completed", "model": "fake",
                "output": [{"type": "message", "id": "msg_raw1", "status": "completed", "role": "assistant",
                            "content": [{"type": "output_text", "text": "Hi.", "annotations": []}]}],
                "usage": {"input_tokens": 3, "output_tokens": 2, "total_tokens": 5}}


@pytest.fixture(scope="module")
def raw_gw():
    with raw_model_gateway(first_byte_s=0.5, total_s=1, tail=RAW_ROUTE) as (harness, raw):
        yield harness, raw


def stored_on_raw(harness: Harness, raw) -> str:
    """A response the gateway relayed from the scripted server (and pinned to it); nothing received since."""
    reset_raw_model(harness, raw)
    raw.script = json_answer(RAW_RESPONSE)
    created = harness.openai().responses.create(model="raw-responses", input="Hi.")
    raw.requests.clear()
    return created.id


@pytest.mark.parametrize(("script", "status", "code"), [
    ([(http_head(200, {"Content-Type": "application/json"}, 9) + b"not json!", 0.0)], 502, "upstream_bad_response"),
    ([(http_head(200, {"Content-Type": "application/json"}, 2) + b"[]", 0.0)], 502, "upstream_bad_response"),
    ([(b"", 5.0)], 504, "upstream_timeout"),
    (json_answer({"error": {"message": "boom"}}, status=500), 500, "upstream_error"),
])
def test_a_broken_answer_is_an_openai_error_and_charges_no_circuit(raw_gw, script, status, code):
    harness, raw = raw_gw
    response_id = stored_on_raw(harness, raw)
    raw.script = script
    with pytest.raises(openai.APIStatusError) as raised:
        harness.openai().responses.retrieve(response_id)
    assert raised.value.status_code == status and raised.value.code == code
    assert b"GET /v1/responses/resp_raw1 " in raw.requests[0][0]
    assert "Traceback" not in str(raised.value.body)
    assert harness.services.fleet.breakers.state("raw") == "closed"


def test_a_deletion_answered_204_is_openais_answer_and_forgets_the_response(raw_gw):
    """A server that says a deletion with 204 and no body: the client gets OpenAI's 200 body, the pin is gone; a
    204 to a retrieval is a broken answer, and keeps the pin."""
    harness, raw = raw_gw
    response_id = stored_on_raw(harness, raw)
    raw.script = [(http_head(204, {}, 0), 0.0)]
    with pytest.raises(openai.APIStatusError) as raised:
        harness.openai().responses.retrieve(response_id)
    assert (raised.value.status_code, raised.value.code) == (502, "upstream_bad_response")
    deleted = harness.openai().responses.with_raw_response.delete(response_id)
    assert deleted.status_code == 200 and deleted.headers["x-gateway-model"] == "raw"
    assert deleted.http_response.json() == {"id": response_id, "object": "response.deleted", "deleted": True}
    raw.requests.clear()
    with pytest.raises(openai.NotFoundError):
        harness.openai().responses.retrieve(response_id)
    assert raw.requests == []


def test_the_model_servers_key_and_the_clients_query_are_sent(raw_gw):
    harness, raw = raw_gw
    response_id = stored_on_raw(harness, raw)
    raw.script = json_answer({"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False})
    listed = harness.openai().responses.input_items.list(response_id, limit=5, order="asc",
                                                         include=["message.input_image.image_url"])
    assert listed.data == []
    head = raw.requests[0][0].decode()
    assert head.startswith(f"GET /v1/responses/{response_id}/input_items?")
    assert "limit=5" in head and "order=asc" in head and "include" in head
    assert "test-key" not in head


def test_the_models_own_query_is_sent_once_before_the_clients():
    """A model whose endpoint carries a query (Azure's `api-version`) keeps it; the client's own `api-version`
    (the AzureOpenAI SDK sends one) does not replace or repeat it; the caller's trace is continued."""
    raw = RawUpstream().start()
    policy = raw_model_policy(raw.url + "?api-version=2025-05-01", first_byte_s=1, tail=RAW_ROUTE)
    harness = Harness(policy, sims={name: dict(ttft_ms=1, tpot_ms=0) for name in DEFAULT_SIMS}).start()
    try:
        response_id = stored_on_raw(harness, raw)
        raw.script = json_answer(RAW_RESPONSE)
        traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        found = harness.openai().responses.retrieve(response_id, extra_query={"api-version": "2024-01-01"},
                                                    extra_headers={"traceparent": traceparent})
        assert found.id == response_id
        head = raw.requests[0][0].decode()
        assert head.startswith(f"GET /v1/responses/{response_id}?api-version=2025-05-01 HTTP/1.1")
        # the caller's trace continues: the model server's parent is the gateway's CLIENT span in it
        assert "traceparent: 00-0af7651916cd43dd8448eb211c80319c-" in head.lower()
        assert f"traceparent: {traceparent}" not in head.lower()
    finally:
        harness.stop()
        raw.stop()


# the pins' store shared, and down ----------------------------------------------------------------------------------

def environ(redis_url: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k != "GATEWAY_REDIS_URL"}
    return {**base, "GATEWAY_REDIS_URL": redis_url, "OTEL_SDK_DISABLED": "true"}


def test_a_response_relayed_by_one_replica_is_retrieved_and_deleted_through_another(module_redis_server):
    first = Harness(POLICY, environ=environ(module_redis_server.url)).start()
    # the second replica calls the first one's model servers, as replicas of one gateway share them
    shared = POLICY.format(**{name: sim.url for name, sim in first.sims.items()})
    second = Harness(shared.replace("{", "{{").replace("}", "}}"), environ=environ(module_redis_server.url)).start()
    replicas = [first, second]
    try:
        created = stored(first)
        assert client(second).responses.retrieve(created.id).output_text == created.output_text
        with pytest.raises(openai.NotFoundError):
            client(second, "bravo").responses.retrieve(created.id)
        client(second).responses.delete(created.id)
        before = asked(first)
        with pytest.raises(openai.NotFoundError):
            client(first).responses.retrieve(created.id)
        assert asked(first) == before
    finally:
        for harness in replicas:
            harness.stop()


def test_pins_last_the_policys_stored_response_ttl_s_and_a_reload_applies_to_later_ones(module_redis_server):
    """In Redis, each pin expires after the `routing.stored_response_ttl_s` in force when it was written."""
    policy = POLICY + "routing: {{stored_response_ttl_s: 3600}}\n"
    harness = Harness(policy, environ=environ(module_redis_server.url)).start()
    client_ = redis.Redis.from_url(module_redis_server.url)
    try:
        first = stored(harness)
        assert 3590 < client_.ttl(f"gw:{{acme}}:rp:{first.id}") <= 3600
        harness.write_policy(POLICY + "routing: {{stored_response_ttl_s: 7200}}\n")
        assert harness.reload_policy()
        second = stored(harness)
        assert 7190 < client_.ttl(f"gw:{{acme}}:rp:{second.id}") <= 7200
        assert 3590 < client_.ttl(f"gw:{{acme}}:rp:{first.id}") <= 3600
    finally:
        client_.close()
        harness.stop()


def test_a_pin_in_memory_expires_after_stored_response_ttl_s():
    harness = Harness(POLICY + "routing: {{stored_response_ttl_s: 1}}\n").start()
    try:
        created = stored(harness)
        assert client(harness).responses.retrieve(created.id).id == created.id
        time.sleep(1.1)
        with pytest.raises(openai.NotFoundError):
            client(harness).responses.retrieve(created.id)
        with pytest.raises(openai.BadRequestError, match="not found"):
            stored(harness, previous_response_id=created.id)
    finally:
        harness.stop()


@pytest.mark.parametrize("on_failure", ["allow", "deny"])
def test_a_retrieval_while_redis_is_down_is_a_503(redis_server, on_failure):
    policy = POLICY + QUICK_STOP + f"store: {{{{on_store_failure: {on_failure}, timeout_ms: 200}}}}\n"
    harness = Harness(policy, environ=environ(redis_server.url)).start()
    try:
        created = stored(harness)
        redis_server.stop()
        with pytest.raises(openai.APIStatusError) as raised:
            client(harness).responses.retrieve(created.id)
        assert raised.value.status_code == 503 and raised.value.code == "store_unavailable"
    finally:
        harness.stop()


# telemetry -----------------------------------------------------------------------------------------------------------

def test_a_stored_response_call_has_its_server_and_client_spans_on_the_wire(receiver):
    """A retrieval's SERVER span continues the caller's trace (route, status, tenant, the model asked) and parents
    the CLIENT span of its call to the model server, whose traceparent names it; an unknown id's 404 has its
    SERVER span alone; a model server failing is an error on both."""
    environ = otel_environ(receiver.http_endpoint, "http/protobuf", "gw-stored")
    harness = Harness(POLICY, environ=environ).start()
    try:
        created = stored(harness)
        trace_id, traceparent = new_traceparent()
        client(harness).responses.retrieve(created.id, extra_headers={"traceparent": traceparent})
        spans = exported_trace(harness, receiver, trace_id, spans=2)
        server = one(spans, "GET /v1/responses/{response_id}")
        assert (server.kind, server.parent_span_id) == ("SERVER", CALLER_SPAN_ID)
        assert server.attributes["http.response.status_code"] == 200 and server.status_code == "UNSET"
        assert (server.attributes["gateway.tenant"], server.attributes["gateway.model.selected"]) == ("acme", "small")
        assert server.attributes["url.path"] == f"/v1/responses/{created.id}"
        call = one(spans, "GET")
        assert (call.kind, call.parent_span_id) == ("CLIENT", server.span_id)
        assert call.attributes["server.address"] == "127.0.0.1" and call.attributes["http.response.status_code"] == 200
        sent = next(r for r in reversed(harness.sim_requests("small")) if r["method"] == "GET")
        assert sent["headers"]["traceparent"] == f"00-{trace_id}-{call.span_id}-01"

        trace_id, traceparent = new_traceparent()
        with pytest.raises(openai.NotFoundError):
            client(harness).responses.retrieve("resp_unknown", extra_headers={"traceparent": traceparent})
        [missing] = exported_trace(harness, receiver, trace_id, spans=1)
        assert missing.attributes["http.response.status_code"] == 404 and missing.status_code == "UNSET"

        harness.call(harness.sims["small"].stop())       # the model server is gone: its port closes
        trace_id, traceparent = new_traceparent()
        with pytest.raises(openai.APIStatusError):
            client(harness).responses.retrieve(created.id, extra_headers={"traceparent": traceparent})
        failed = exported_trace(harness, receiver, trace_id, spans=2)
        assert one(failed, "GET /v1/responses/{response_id}").status_code == "ERROR"
        assert one(failed, "GET").attributes["error.type"] == "connect_error"
    finally:
        harness.stop()


def test_every_call_outside_the_pipeline_has_its_server_span(receiver):
    """The model list, one model, an outcome report and an input token count each have a SERVER span: its route,
    status, tenant, and the request id its client was answered with (a refused key's too)."""
    environ = otel_environ(receiver.http_endpoint, "http/protobuf", "gw-plain")
    harness = Harness(POLICY, environ=environ).start()
    try:
        calls = {
            "GET /v1/models": lambda sdk, headers: sdk.models.with_raw_response.list(extra_headers=headers),
            "GET /v1/models/{model}": lambda sdk, headers: sdk.models.with_raw_response.retrieve(
                "auto", extra_headers=headers),
            "POST /v1/responses/input_tokens": lambda sdk, headers: sdk.responses.input_tokens.with_raw_response
            .count(model="auto", input="Hi.", extra_headers=headers),
        }
        for name, call in calls.items():
            trace_id, traceparent = new_traceparent()
            raw = call(client(harness), {"traceparent": traceparent})
            [span] = exported_trace(harness, receiver, trace_id, spans=1)
            assert (span.name, span.kind, span.parent_span_id) == (name, "SERVER", CALLER_SPAN_ID)
            assert span.attributes["http.response.status_code"] == 200
            assert span.attributes["gateway.tenant"] == "acme"
            assert span.attributes["gateway.request.id"] == raw.headers["x-request-id"]

        trace_id, traceparent = new_traceparent()
        outcome = urllib.request.Request(
            f"{harness.base_url}/v1/outcomes", data=b'{"task_id": "never-booked", "outcome": "success"}',
            method="POST", headers={"Authorization": f"Bearer {KEYS['acme']}", "Content-Type": "application/json",
                                    "traceparent": traceparent})
        with pytest.raises(urllib.error.HTTPError) as unknown:
            urllib.request.urlopen(outcome, timeout=10)
        [span] = exported_trace(harness, receiver, trace_id, spans=1)
        assert (span.name, span.attributes["http.response.status_code"]) == ("POST /v1/outcomes", 404)
        assert span.attributes["gateway.request.id"] == unknown.value.headers["x-request-id"]

        trace_id, traceparent = new_traceparent()
        with pytest.raises(openai.AuthenticationError) as refused:
            openai.OpenAI(base_url=f"{harness.base_url}/v1", api_key="sk-nobody", max_retries=0).models.list(
                extra_headers={"traceparent": traceparent})
        [span] = exported_trace(harness, receiver, trace_id, spans=1)
        assert span.attributes["http.response.status_code"] == 401 and "gateway.tenant" not in span.attributes
        assert span.attributes["gateway.request.id"] == refused.value.response.headers["x-request-id"]
    finally:
        harness.stop()
