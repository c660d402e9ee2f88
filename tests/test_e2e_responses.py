"""End to end: the Responses API (`POST /v1/responses`) through the gateway, with the official openai SDK against
simulated model servers: routing, usage and cost, streams relayed event by event, fallback, continuing a stored
response on the model that stored it, for its tenant alone."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import openai
import pytest

from gateway.policy.load import load_policy
from gateway.replay import read_traffic, replay
from gateway.stages.answers import responses_output_parts
from gateway.stages.relay import ResponsesStreamState, responses_failure
from gateway.telemetry.content import input_messages, output_messages
from gateway.tokens import count_prompts
from tests.support import policies
from tests.support.accounting import ledger_record
from tests.support.harness import Harness, ledgered_harness
from tests.support.raw_upstream import RawUpstream

KEYS = {"acme": "sk-acme-responses", "bravo": "sk-bravo-responses"}
POLICY = policies.standard_models() + """
routes:
  - name: agents
    match: {{models: ["auto"], endpoints: [chat, responses]}}
    candidates: [small, medium, large]
    cache: {{enabled: true, nondeterministic: true}}
  - name: chat-only
    match: {{models: ["chat-only"]}}
    candidates: [small]
""" + policies.tenants(KEYS)


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    harness = ledgered_harness(POLICY, tmp_path_factory.mktemp("ledger"))
    yield harness
    harness.stop()


@pytest.fixture(autouse=True)
def healthy_sims(gw):
    yield
    for name in ("small", "medium", "large"):
        gw.sim_config(name, error_rate=0.0, drop_rate=0.0)


def client(gw, tenant: str = "acme") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.base_url}/v1", api_key=KEYS[tenant], max_retries=0)


def create(gw, tenant: str = "acme", **fields):
    fields = {"model": "auto", "input": "Say hello.", "max_output_tokens": 20, **fields}
    return client(gw, tenant).responses.with_raw_response.create(**fields)


def test_a_response_is_routed_priced_and_booked(gw):
    raw = create(gw, instructions="Be brief.")
    response = raw.parse()
    assert raw.headers["x-gateway-model"] == "small" and raw.headers["x-gateway-route"] == "agents"
    assert response.output_text and response.usage.output_tokens == 20
    line = ledger_record(gw.ledger_path, raw.headers["x-request-id"])
    assert line["endpoint"] == "responses" and line["status"] == 200 and not line["tokens_estimated"]
    assert (line["input_tokens"], line["output_tokens"]) == (response.usage.input_tokens, 20)
    # small's prices: 0.10 and 0.20 USD per million tokens
    assert float(line["cost_usd"]) == pytest.approx((response.usage.input_tokens * 0.10 + 20 * 0.20) / 1e6)
    assert abs(line["prompt_tokens"] - response.usage.input_tokens) <= 5      # the gateway's own count, for routing


def test_a_stream_is_relayed_event_by_event_and_booked_from_its_last_event(gw):
    before = gw.sim_stats("small")["total"]
    with client(gw).responses.with_streaming_response.create(model="auto", input="Say hello.",
                                                             max_output_tokens=16, stream=True) as raw:
        assert raw.headers["content-type"].startswith("text/event-stream")
        lines = list(raw.iter_lines())
        request_id = raw.headers["x-request-id"]
    events = [json.loads(line[len("data: "):]) for line in lines if line.startswith("data: ")]
    kinds = [line[len("event: "):] for line in lines if line.startswith("event: ")]
    assert kinds == [event["type"] for event in events]          # each event keeps its `event:` line
    assert kinds[0] == "response.created" and kinds[-1] == "response.incomplete"
    assert not any(line.startswith("data: [DONE]") for line in lines)
    deltas = "".join(event["delta"] for event in events if event["type"] == "response.output_text.delta")
    final = events[-1]["response"]
    assert deltas == final["output"][0]["content"][0]["text"]
    line = ledger_record(gw.ledger_path, request_id)
    assert line["stream"] and line["status"] == 200 and line["ttft_s"] is not None
    assert line["output_tokens"] == final["usage"]["output_tokens"] == 16 and not line["tokens_estimated"]
    assert line["input_tokens"] == final["usage"]["input_tokens"]
    assert gw.sim_stats("small")["total"] == before + 1


def test_the_sdk_stream_helper_reads_the_relayed_stream(gw):
    with client(gw).responses.stream(model="auto", input="Say hello.") as stream:
        text = "".join(event.delta for event in stream if event.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert text and text == final.output_text and final.usage.output_tokens > 0


def test_a_model_failing_before_its_first_event_falls_back(gw):
    gw.sim_config("small", error_rate=1.0)
    raw = create(gw)
    assert raw.headers["x-gateway-model"] == "medium" and raw.headers["x-gateway-fallback"] == "fallback"
    with client(gw).responses.with_streaming_response.create(model="auto", input="hi", stream=True) as stream:
        assert stream.headers["x-gateway-model"] == "medium"
        assert any(line.startswith("event: response.completed") for line in stream.iter_lines())


def test_a_stream_cut_mid_way_ends_with_an_error_the_sdk_raises(gw):
    """The in-band error is the Responses API's `error` event (`event: error`, its type, code and message, for
    clients that read events by type) carrying the `error` object the SDKs raise on."""
    gw.sim_config("small", drop_rate=1.0)
    with pytest.raises(openai.APIError, match="dropped the connection"):
        for _ in client(gw).responses.create(model="auto", input="Say hello.", max_output_tokens=40, stream=True):
            pass
    with client(gw).responses.with_streaming_response.create(model="auto", input="Say hello.",
                                                             max_output_tokens=40, stream=True) as raw:
        lines = list(raw.iter_lines())
    assert lines[-3] == "event: error"
    last = json.loads(lines[-2][len("data: "):])
    assert last["type"] == "error" and last["message"] == last["error"]["message"] and last["code"]


def test_a_route_that_does_not_name_responses_does_not_take_them(gw):
    """The Responses API is taken only where match.endpoints names it (a server without /v1/responses answers
    404, which would open its circuit for chat too)."""
    with pytest.raises(openai.NotFoundError, match="no route serves it on responses"):
        create(gw, model="chat-only")


def test_responses_are_never_cached(gw):
    """The route caches sampled answers, yet the same Responses request twice reaches the model twice: a stored
    answer would carry the id of another response, which the server was never asked to store."""
    before = gw.sim_stats("small")["total"]
    first, second = create(gw, input="cache me", temperature=0), create(gw, input="cache me", temperature=0)
    assert first.parse().id != second.parse().id and gw.sim_stats("small")["total"] == before + 2
    assert first.headers.get("x-gateway-cache") != "hit" and second.headers.get("x-gateway-cache") != "hit"


def test_a_continued_response_goes_to_the_model_that_stored_it(gw):
    """The follow-up asks for tier 2 and up (medium would serve it), but only small has the stored response."""
    first = create(gw).parse()
    assert create(gw).headers["x-gateway-model"] == "small"
    raw = create(gw, previous_response_id=first.id, extra_headers={"x-gateway-min-tier": "2"})
    assert raw.headers["x-gateway-model"] == "small"
    assert create(gw, extra_headers={"x-gateway-min-tier": "2"}).headers["x-gateway-model"] == "medium"
    # a stream's response is noted too, and continued the same way
    with client(gw).responses.stream(model="auto", input="hi") as stream:
        streamed = stream.get_final_response()
    raw = create(gw, previous_response_id=streamed.id, extra_headers={"x-gateway-min-tier": "3"})
    assert raw.headers["x-gateway-model"] == "small"


def test_a_tenant_cannot_continue_another_tenants_response(gw):
    """Every tenant's calls reach the server with the gateway's own key, which would continue anyone's stored
    response: a response the gateway did not relay to the tenant is not found, as OpenAI answers an unknown id."""
    stored = create(gw, tenant="acme").parse()
    with pytest.raises(openai.BadRequestError) as refused:
        create(gw, tenant="bravo", previous_response_id=stored.id)
    assert refused.value.body["code"] == "previous_response_not_found"
    assert refused.value.body["param"] == "previous_response_id"
    unstored = create(gw, tenant="acme", store=False).parse()
    with pytest.raises(openai.BadRequestError, match="not found"):
        create(gw, tenant="acme", previous_response_id=unstored.id)
    assert create(gw, tenant="acme", previous_response_id=stored.id).parse().output_text


@pytest.mark.parametrize(("fields", "param"), [
    ({"background": True, "store": False}, "store"),
    ({"background": "yes"}, "background"),
    ({"conversation": "conv_123"}, "conversation"),
    ({"previous_response_id": 7}, "previous_response_id"),
    ({"input": 7}, "input"),
])
def test_what_the_gateway_cannot_serve_is_a_clear_400(gw, fields, param):
    with pytest.raises(openai.BadRequestError) as refused:
        create(gw, **fields)
    assert refused.value.body["param"] == param


def test_an_image_in_the_input_goes_to_a_model_that_takes_images(gw):
    gw.write_policy(POLICY.replace("    timeouts:", "    supports: [tools]\n    timeouts:", 1))
    assert gw.reload_policy()
    try:
        image = {"type": "input_image", "image_url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}
        raw = create(gw, input=[{"role": "user", "content": [{"type": "input_text", "text": "what is it?"}, image]}])
        assert raw.headers["x-gateway-model"] == "medium"
        assert create(gw).headers["x-gateway-model"] == "small"
    finally:
        gw.write_policy(POLICY)
        assert gw.reload_policy()


def test_the_stream_state_reads_output_ends_and_failures():
    state = ResponsesStreamState(assemble_for=None)
    assert not state.absorb({"type": "response.created", "response": {"id": "resp_1"}})
    assert state.absorb({"type": "response.output_text.delta", "output_index": 0, "delta": "Hel"})
    assert state.absorb({"type": "response.output_text.delta", "output_index": 0, "delta": "lo"})
    assert state.absorb({"type": "response.function_call_arguments.delta", "output_index": 1, "delta": "{}"})
    assert not state.absorb({"type": "response.output_text.delta", "delta": ""})
    assert state.parts.texts() == [(0, "Hello")] and state.output_chunks == 3 and not state.finished(1)
    state.absorb({"type": "response.incomplete", "response": {"incomplete_details": {"reason": "content_filter"}}})
    assert state.finished(1) and state.finish_reasons == ["content_filter"]
    failed = responses_failure("m", {"type": "response.failed",
                                     "response": {"error": {"code": "server_error", "message": "it broke"}}})
    assert failed is not None and "it broke" in str(failed)
    assert "overloaded" in str(responses_failure("m", {"type": "error", "code": "x", "message": "overloaded"}))
    assert responses_failure("m", {"type": "response.output_text.delta", "delta": "x"}) is None


def test_content_capture_reads_the_responses_shapes():
    body = {"instructions": "Be brief.", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}, {"type": "input_image"}]},
        {"type": "function_call", "call_id": "c1", "name": "weather", "arguments": "{\"city\": \"Oslo\"}"},
        {"type": "function_call_output", "call_id": "c1", "output": "rain"},
        {"type": "reasoning", "summary": []}]}
    ctx = SimpleNamespace(endpoint="responses", body=body, response_body={
        "status": "incomplete", "output": [
            {"type": "reasoning", "summary": []},
            {"type": "message", "content": [{"type": "output_text", "text": "It rains."}]},
            {"type": "function_call", "call_id": "c2", "name": "umbrella", "arguments": "{}"}]})
    assert input_messages(ctx) == [
        {"role": "system", "parts": [{"type": "text", "content": "Be brief."}]},
        {"role": "user", "parts": [{"type": "text", "content": "Weather?"}, {"type": "input_image"}]},
        {"role": "assistant", "parts": [{"type": "tool_call", "id": "c1", "name": "weather",
                                         "arguments": {"city": "Oslo"}}]},
        {"role": "tool", "parts": [{"type": "tool_call_response", "response": "rain", "id": "c1"}]},
        {"role": "user", "parts": [{"type": "reasoning"}]}]
    answered = SimpleNamespace(status=200, finish_reasons=("length",))
    assert output_messages(ctx, answered) == [{"role": "assistant", "parts": [
        {"type": "text", "content": "It rains."}, {"type": "tool_call", "id": "c2", "name": "umbrella",
                                                   "arguments": {}}], "finish_reason": "length"}]
    assert input_messages(SimpleNamespace(endpoint="responses", body={"input": "hi"})) == \
        [{"role": "user", "parts": [{"type": "text", "content": "hi"}]}]


@pytest.mark.parametrize("stream", [False, True])
def test_a_server_that_reports_no_usage_is_billed_on_the_gateways_count(gw, stream):
    gw.sim_config("small", usage=False)
    try:
        if stream:
            with client(gw).responses.with_streaming_response.create(
                    model="auto", input="Say hello.", max_output_tokens=24, stream=True) as raw:
                lines = list(raw.iter_lines())
                request_id = raw.headers["x-request-id"]
            text = "".join(json.loads(line[6:])["delta"] for line in lines
                           if line.startswith("data: ") and '"response.output_text.delta"' in line)
        else:
            raw = create(gw, max_output_tokens=24)
            request_id, text = raw.headers["x-request-id"], raw.parse().output_text
    finally:
        gw.sim_config("small", usage=True)
    line = ledger_record(gw.ledger_path, request_id)
    assert line["tokens_estimated"] and text
    assert abs(line["output_tokens"] - 24) <= 2 and line["input_tokens"] == line["prompt_tokens"]


def sse(kind: str, **data) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode()


def test_a_model_failing_after_its_opening_events_before_any_output_falls_back():
    """A Responses API server opens a stream with response.created (and in_progress) before it generates
    anything: those are held, so a model that then reports an error is replaced, and the client sees one stream,
    the next model's, from its own response.created."""
    raw = RawUpstream().start()
    opening = {"id": "resp_broken", "object": "response", "status": "in_progress", "model": "raw", "output": []}
    raw.script = [(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n", 0),
                  (sse("response.created", sequence_number=0, response=opening), 0),
                  (sse("response.in_progress", sequence_number=1, response=opening), 0),
                  (sse("error", sequence_number=2, code="server_error", message="the model overloaded"), 0)]
    policy = policies.models(policies.model("raw", None, endpoint=raw.url, size_b=0.5,
                                            timeouts=policies.short_timeouts()),
                             policies.standard_model("small", timeouts=policies.short_timeouts())) + """
routes:
  - name: agents
    match: {{models: ["auto"], endpoints: [responses]}}
    candidates: [raw, small]
"""
    gw = Harness(policy, sims={"small": {"ttft_ms": 5, "tpot_ms": 1}}).start()
    try:
        with gw.openai().responses.with_streaming_response.create(model="auto", input="hi", stream=True) as stream:
            assert stream.headers["x-gateway-model"] == "small" and stream.headers["x-gateway-fallback"] == "fallback"
            lines = list(stream.iter_lines())
        created = [json.loads(line[6:]) for line in lines if line.startswith("data: ") and "response.created" in line]
        assert len(created) == 1 and created[0]["response"]["id"].startswith("resp_")
        assert created[0]["response"]["id"] != "resp_broken" and len(raw.requests) == 1
        assert any(line.startswith("event: response.completed") for line in lines)
    finally:
        gw.stop()
        raw.stop()


def test_events_and_parts_of_odd_types_are_passed_over():
    """A `type` that is a list or an object (a server's or a client's bug) is no event, no failure and no text."""
    state = ResponsesStreamState(assemble_for=None)
    assert not state.absorb({"type": ["response.output_text.delta"], "delta": "x"}) and not state.finished(1)
    assert responses_failure("m", {"type": {"error": 1}}) is None
    odd = {"model": "m", "input": [{"role": "user", "content": [{"type": ["input_text"], "text": "x"}]}]}
    assert count_prompts("responses", odd, "o200k_base")[0] > 0
    assert input_messages(SimpleNamespace(endpoint="responses", body=odd)) == \
        [{"role": "user", "parts": [{"type": "['input_text']"}]}]


def test_a_continuation_is_recorded_and_replayed_on_the_model_that_stored_it(gw, tmp_path):
    """The ledger says which requests continued a stored response (`continues`), and `gateway replay` plans each
    on the model that stored it, whatever the SLA, as live; a replayed policy without that model refuses it, as
    live would (400, the response not found)."""
    stored = create(gw).parse()
    raw = create(gw, previous_response_id=stored.id, extra_headers={"x-gateway-min-tier": "2"})
    line = ledger_record(gw.ledger_path, raw.headers["x-request-id"])
    assert line["continues"] is True and line["model"] == "small"
    assert ledger_record(gw.ledger_path, create(gw).headers["x-request-id"])["continues"] is False
    traffic = tmp_path / "ledger.jsonl"
    continued = {"ts": 100.0, "endpoint": "responses", "alias": "auto", "stream": False, "input_tokens": 50,
                 "tenant": "acme", "output_tokens": 5, "route": "agents", "model": "large", "continues": True}
    traffic.write_text(json.dumps(continued) + "\n" + json.dumps({**continued, "ts": 101.0, "continues": False}) + "\n")
    policy = load_policy(gw.policy_path)
    assert [outcome.label for outcome in replay(policy, read_traffic(traffic, "ledger"), jitter_sigma=0.0).outcomes] \
        == ["large", "small"]
    without_large = dataclasses.replace(policy, models={k: v for k, v in policy.models.items() if k != "large"},
                                        routes=tuple(dataclasses.replace(route, candidates=("small", "medium"))
                                                     if route.name == "agents" else route for route in policy.routes))
    first, second = replay(without_large, read_traffic(traffic, "ledger"), jitter_sigma=0.0).outcomes
    assert (first.status, first.reason) == ("rejected", "continuation") and second.label == "small"


def test_content_capture_and_estimates_pass_over_lists_that_are_not_lists():
    """A client's or a server's odd shape (a number where a list belongs) is passed over, never a failure of the
    request's recording or of its usage estimate."""
    chat = SimpleNamespace(endpoint="chat", body={"messages": [{"role": "assistant", "tool_calls": 5}]},
                           response_body={"choices": 1.5})
    assert input_messages(chat) == [{"role": "assistant", "parts": []}]
    assert output_messages(chat, SimpleNamespace(status=200, finish_reasons=())) == []
    odd = SimpleNamespace(endpoint="responses", body={"input": "hi"}, response_body={
        "output": [{"type": "message", "content": 2.0}, {"type": "reasoning", "summary": "x"}]})
    assert output_messages(odd, SimpleNamespace(status=200, finish_reasons=("stop",)))[0]["parts"] == []
    assert list(responses_output_parts(odd.response_body["output"])) == []
    assert output_messages(SimpleNamespace(endpoint="responses", response_body={"output": 3}),
                           SimpleNamespace(status=200, finish_reasons=()))[0]["parts"] == []


def test_a_streamed_tool_calls_name_is_kept_for_the_estimate_as_a_whole_answers_is():
    """The name comes with the item (`response.output_item.added`, held with the opening events when it is the
    first), the arguments as deltas: both are counted when the server reports no usage, as a whole answer's are."""
    state = ResponsesStreamState(assemble_for=None)
    call = {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": ""}
    state.absorb({"type": "response.output_item.added", "output_index": 0, "item": call})
    state.absorb({"type": "response.function_call_arguments.delta", "output_index": 0, "delta": "{\"city\":"})
    state.absorb({"type": "response.function_call_arguments.delta", "output_index": 0, "delta": "\"Oslo\"}"})
    streamed = sorted(text for _, _, text in state.parts.items())
    whole = sorted(text for _, _, text in responses_output_parts([{**call, "arguments": "{\"city\":\"Oslo\"}"}]))
    assert streamed == whole == ["get_weather", "{\"city\":\"Oslo\"}"]


def test_a_responses_event_with_a_usage_field_is_relayed_as_it_came():
    """The usage chunk the gateway asks a chat stream for is taken out for a client that did not ask; a Responses
    API event is never such a chunk: one carrying a `usage` field of its own (a server's extension) is relayed
    whole, its `event:` line kept."""
    raw = RawUpstream().start()
    opening = {"id": "resp_u", "object": "response", "status": "in_progress", "model": "raw", "output": []}
    done = {**opening, "status": "completed",
            "usage": {"input_tokens": 3, "output_tokens": 1, "total_tokens": 4}}
    raw.script = [(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n", 0),
                  (sse("response.created", sequence_number=0, response=opening), 0),
                  (sse("response.output_text.delta", sequence_number=1, output_index=0, delta="Hi",
                       usage={"output_tokens": 1}), 0),
                  (sse("response.completed", sequence_number=2, response=done), 0)]
    policy = policies.models(policies.model("raw", None, endpoint=raw.url, timeouts=policies.short_timeouts())) + """
routes:
  - name: agents
    match: {{models: ["auto"], endpoints: [responses]}}
    candidates: [raw]
"""
    gw = Harness(policy, sims={}).start()
    try:
        with gw.openai().responses.with_streaming_response.create(model="auto", input="hi", stream=True) as stream:
            lines = list(stream.iter_lines())
    finally:
        gw.stop()
        raw.stop()
    assert "event: response.output_text.delta" in lines
    delta = next(json.loads(line[6:]) for line in lines if line.startswith("data: ") and "output_text.delta" in line)
    assert delta["usage"] == {"output_tokens": 1} and delta["delta"] == "Hi"
