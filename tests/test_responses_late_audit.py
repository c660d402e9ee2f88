"""Late audit of the Responses API: its spans on the wire against a chat request's, a stream's end after
`response.completed`, and `gateway replay` of the ledger lines it writes."""

from __future__ import annotations

import json
import time
import uuid

import pytest

from gateway.policy.load import load_policy
from gateway.replay import read_traffic, replay
from tests.support import policies
from tests.support.accounting import ledger_record
from tests.support.harness import Harness, ledgered_harness, raw_model_gateway
from tests.support.otlp_receiver import SpanRecord
from tests.support.raw_upstream import SSE_HEAD

POLICY = policies.standard_models() + """
routes:
  - name: agents
    match: {{models: ["auto"], endpoints: [chat, responses]}}
    candidates: [small, medium, large]
  - name: short
    match: {{models: ["short"], endpoints: [responses]}}
    candidates: [small]
"""


@pytest.fixture(scope="module")
def gw(receiver, tmp_path_factory):
    harness = ledgered_harness(POLICY, tmp_path_factory.mktemp("ledger"), environ={
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.http_endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_SERVICE_NAME": "gw-responses-late", "OTEL_METRIC_EXPORT_INTERVAL": "60000",
        "OTEL_BSP_SCHEDULE_DELAY": "50"})
    yield harness
    harness.stop()


def client_span(gw: Harness, receiver, call) -> SpanRecord:
    """The CLIENT span of the request `call` makes with the traceparent headers it is given."""
    trace_id = uuid.uuid4().hex
    call({"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"})
    gw.flush_telemetry()
    (span,) = [span for span in receiver.wait_for_trace(trace_id, 3) if span.kind == "CLIENT"]
    return span


def test_a_whole_responses_answer_has_its_finish_reason_on_its_span_as_its_stream_does(gw, receiver):
    """gen_ai.response.finish_reasons is on the CLIENT span of a chat completion, streamed or not, and of a
    streamed Responses API answer (`response.incomplete`: length); a whole answer of `status: incomplete` must
    say it too, or a dashboard of answers cut by their token limit misses every non-streamed one."""
    client = gw.openai()
    ask = {"model": "auto", "input": "Say hello.", "max_output_tokens": 16}
    whole = client_span(gw, receiver, lambda headers: client.responses.create(**ask, extra_headers=headers))
    streamed = client_span(gw, receiver, lambda headers: list(client.responses.create(**ask, stream=True,
                                                                                        extra_headers=headers)))
    assert streamed.attributes["gen_ai.response.finish_reasons"] == ["length"]
    assert whole.attributes.get("gen_ai.response.finish_reasons") == ["length"]


def test_a_responses_request_for_structured_output_has_json_output_type(gw, receiver):
    """A chat request's `response_format: json_schema` is gen_ai.output.type `json` (conditionally required when
    the request names an output format); the Responses API names it as `text.format`, which must say the same."""
    client = gw.openai()
    schema = {"type": "json_schema", "name": "answer", "schema": {"type": "object", "properties": {}}}
    span = client_span(gw, receiver, lambda headers: client.responses.create(
        model="auto", input="Say hello.", max_output_tokens=16, text={"format": schema}, extra_headers=headers))
    assert span.attributes.get("gen_ai.output.type") == "json"


def test_replay_routes_a_truncation_auto_line_as_live_served_it(gw):
    """Live, a `truncation: auto` request whose history is longer than the model's context window is served (the
    server drops its oldest items); `gateway replay` of its ledger line, on the same policy, must not refuse it
    as too long for every model of its route."""
    turn = "a long earlier turn of the conversation " * 60           # about 480 tokens each
    history = [{"role": "user" if i % 2 == 0 else "assistant", "content": turn} for i in range(20)]
    history.append({"role": "user", "content": "And now, say hello."})
    gw.sim_config("small", context_window=1_000_000)   # the simulator does not truncate: it takes it all instead
    try:
        raw = gw.openai().responses.with_raw_response.create(model="short", input=history, truncation="auto",
                                                             max_output_tokens=16)
    finally:
        gw.sim_config("small", context_window=8192)
    assert raw.status_code == 200 and raw.headers["x-gateway-model"] == "small"
    line = ledger_record(gw.ledger_path, raw.headers["x-request-id"])
    ledger = gw.ledger_path.parent / "one-line.jsonl"
    ledger.write_text(json.dumps(line) + "\n")
    outcome, = replay(load_policy(gw.policy_path), read_traffic(ledger)).outcomes
    assert outcome.label == "small"


RAW_ROUTE = """  - name: raw-responses
    match: {{models: ["raw-responses"], endpoints: [responses]}}
    candidates: [raw]
"""
RESPONSE = {"id": "resp_1", "object": "response", "created_at": 1, "model": "fake", "status": "in_progress",
            "output": [], "usage": None}


def event(kind: str, **fields) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **fields})}\n\n".encode()


WHOLE_STREAM = (
    event("response.created", response=RESPONSE) + event("response.in_progress", response=RESPONSE)
    + event("response.output_item.added", output_index=0,
            item={"type": "message", "id": "m1", "role": "assistant", "status": "in_progress", "content": []})
    + event("response.output_text.delta", output_index=0, content_index=0, item_id="m1", delta="Hello")
    + event("response.completed", response={
        **RESPONSE, "status": "completed", "usage": {"input_tokens": 5, "output_tokens": 1, "total_tokens": 6},
        "output": [{"type": "message", "id": "m1", "role": "assistant", "status": "completed",
                    "content": [{"type": "output_text", "text": "Hello", "annotations": []}]}]}))


def test_a_responses_stream_ends_at_response_completed_without_waiting_for_more():
    """`response.completed` is a Responses API stream's last event (no usage chunk or [DONE] follows, as in chat):
    a server that keeps the connection open after it must not hold the client, nor add the wait to the latency the
    ledger books and the router learns the model's speed from."""
    with raw_model_gateway(first_byte_s=5, tail=RAW_ROUTE) as (gw, raw):
        raw.script = [(SSE_HEAD + WHOLE_STREAM, 0), (b"", 10)]
        started_s = time.monotonic()
        events = list(gw.openai().responses.create(model="raw-responses", input="hi", stream=True))
        took_s = time.monotonic() - started_s
        assert events[-1].type == "response.completed"
        assert took_s < 1.0, f"the stream ended {took_s:.2f} s after it began"
