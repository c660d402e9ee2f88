"""The GenAI semantic conventions (v1.41.0, the last release holding them before they moved to
open-telemetry/semantic-conventions-genai) as they arrive on the wire: the real gateway, the official SDK,
and a real OTLP receiver decoding what it is sent.

- model/gen-ai/spans.yaml (span.gen_ai.inference.client, span.gen_ai.embeddings.client): the request
  attributes an inference or embeddings CLIENT span carries.
- docs/gen-ai/gen-ai-input-messages.json, gen-ai-output-messages.json: the shape of gen_ai.input.messages
  and gen_ai.output.messages (tool_call / tool_call_response parts; finish_reason required per output message).
- model/gen-ai/metrics.yaml, docs/gen-ai/gen-ai-metrics.md: names, instruments, units, advised buckets and
  required attributes of the gen_ai.client.* metrics.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest

from tests.support.harness import DEFAULT_SIMS, Harness
from tests.support.otlp_receiver import OtlpReceiver, SpanRecord
from tests.support.policies import latency, model, models, price, short_timeouts, tenants

KEYS = {"acme": "key-acme"}
POLICY = models(*(
    model(name, size_b=1, tier=1, price=price(1.00, 2.00), latency_prior=latency(10, 2), timeouts=short_timeouts())
    for name in ("small",))) + """
routes:
  - name: chat
    match: {{models: ["auto"], endpoints: [chat, completions]}}
    candidates: [small]
  - name: embeddings
    match: {{models: ["text-embedding-3-small"], endpoints: [embeddings]}}
    candidates: [small]
""" + tenants(KEYS)

#: advised ExplicitBucketBoundaries (docs/gen-ai/gen-ai-metrics.md, v1.41.0)
TOKEN_BOUNDS = [1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864]
DURATION_BOUNDS = [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92]


def environ(receiver: OtlpReceiver, service: str, **extra: str) -> dict[str, str]:
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.http_endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_SERVICE_NAME": service, "OTEL_METRIC_EXPORT_INTERVAL": "60000", "OTEL_BSP_SCHEDULE_DELAY": "50",
            **extra}


@pytest.fixture(scope="module")
def gw(receiver):
    harness = Harness(POLICY, sims={"small": DEFAULT_SIMS["small"]},
                      environ=environ(receiver, "gw-semconv")).start()
    harness.service = "gw-semconv"
    yield harness
    harness.stop()


@pytest.fixture(scope="module")
def capturing(receiver):
    harness = Harness(POLICY, sims={"small": DEFAULT_SIMS["small"]},
                      environ=environ(receiver, "gw-semconv-capture",
                                      OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT="true")).start()
    yield harness
    harness.stop()


def traced() -> tuple[str, dict[str, str]]:
    trace_id = uuid.uuid4().hex
    return trace_id, {"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"}


def client_span(gw: Harness, receiver: OtlpReceiver, trace_id: str) -> SpanRecord:
    """The trace's one CLIENT span, once the SERVER span has arrived too."""
    gw.flush_telemetry()
    receiver.wait_for(lambda: {s.kind for s in receiver.trace(trace_id)} >= {"SERVER", "CLIENT"})
    (span,) = [span for span in receiver.trace(trace_id) if span.kind == "CLIENT"]
    return span


def test_inference_span_carries_every_request_parameter_sent(gw, receiver):
    """stop_sequences (string[]), frequency/presence penalty and top_k (double), choice.count (int, when != 1)
    and output.type (json for a JSON response_format) are on the inference CLIENT span, typed as the registry
    says."""
    trace_id, headers = traced()
    gw.openai(api_key=KEYS["acme"]).chat.completions.create(
        model="auto", messages=[{"role": "user", "content": "Answer in JSON"}], max_tokens=4, n=2,
        stop=["END", "\n\n"], frequency_penalty=0.5, presence_penalty=-0.25,
        response_format={"type": "json_object"}, extra_body={"top_k": 40}, extra_headers=headers)
    span = client_span(gw, receiver, trace_id)
    attributes = span.attributes
    assert (span.name, span.kind) == ("chat sim-small", "CLIENT")
    assert attributes["gen_ai.request.stop_sequences"] == ["END", "\n\n"]
    assert attributes["gen_ai.request.choice.count"] == 2 and type(attributes["gen_ai.request.choice.count"]) is int
    for key, value in (("gen_ai.request.frequency_penalty", 0.5), ("gen_ai.request.presence_penalty", -0.25),
                       ("gen_ai.request.top_k", 40.0)):
        assert attributes[key] == value and type(attributes[key]) is float, key
    assert attributes["gen_ai.output.type"] == "json"


def test_one_stop_string_is_a_one_item_list_and_one_choice_is_left_out(gw, receiver):
    """`stop` sent as one string is still a string[]; n=1 (the default) leaves gen_ai.request.choice.count out,
    and a plain-text response_format is gen_ai.output.type `text`."""
    trace_id, headers = traced()
    gw.openai(api_key=KEYS["acme"]).chat.completions.create(
        model="auto", messages=[{"role": "user", "content": "Hi"}], max_tokens=3, n=1, stop="END",
        response_format={"type": "text"}, extra_headers=headers)
    attributes = client_span(gw, receiver, trace_id).attributes
    assert attributes["gen_ai.request.stop_sequences"] == ["END"]
    assert "gen_ai.request.choice.count" not in attributes
    assert attributes["gen_ai.output.type"] == "text"


def test_embeddings_span_carries_encoding_formats_and_dimension_count(gw, receiver):
    """span.gen_ai.embeddings.client: `embeddings {model}`, gen_ai.request.encoding_formats (string[]) and
    gen_ai.embeddings.dimension.count (int), input tokens and no output tokens."""
    trace_id, headers = traced()
    answer = gw.openai(api_key=KEYS["acme"]).embeddings.create(
        model="text-embedding-3-small", input="hello", encoding_format="float", dimensions=8,
        extra_headers=headers)
    span = client_span(gw, receiver, trace_id)
    attributes = span.attributes
    assert (span.name, attributes["gen_ai.operation.name"]) == ("embeddings sim-small", "embeddings")
    assert attributes["gen_ai.request.encoding_formats"] == ["float"]
    assert attributes["gen_ai.embeddings.dimension.count"] == 8 == len(answer.data[0].embedding)
    assert attributes["gen_ai.usage.input_tokens"] == answer.usage.prompt_tokens
    assert "gen_ai.usage.output_tokens" not in attributes and "gen_ai.request.max_tokens" not in attributes


def test_captured_input_messages_keep_tool_calls_and_tool_answers(capturing, receiver):
    """An assistant's tool call is a `tool_call` part (id, name, arguments as an object) and a tool's answer a
    `tool_call_response` part (id, response), as gen-ai-input-messages.json defines them."""
    trace_id, headers = traced()
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"location": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "rainy, 57F"},
    ]
    capturing.openai(api_key=KEYS["acme"]).chat.completions.create(
        model="auto", messages=messages, max_tokens=3, extra_headers=headers)
    captured = json.loads(client_span(capturing, receiver, trace_id).attributes["gen_ai.input.messages"])
    assert captured == [
        {"role": "system", "parts": [{"type": "text", "content": "You are terse."}]},
        {"role": "user", "parts": [{"type": "text", "content": "Weather in Paris?"}]},
        {"role": "assistant", "parts": [{"type": "tool_call", "name": "get_weather", "id": "call_1",
                                         "arguments": {"location": "Paris"}}]},
        {"role": "tool", "parts": [{"type": "tool_call_response", "response": "rainy, 57F", "id": "call_1"}]},
    ]


def test_every_captured_output_message_has_a_finish_reason(capturing, receiver):
    """finish_reason is required in each output message: both choices of a streamed n=2 answer carry it."""
    trace_id, headers = traced()
    chunks = list(capturing.openai(api_key=KEYS["acme"]).chat.completions.create(
        model="auto", messages=[{"role": "user", "content": "Count"}], max_tokens=3, n=2, stream=True,
        extra_headers=headers))
    reasons = {choice.finish_reason for chunk in chunks for choice in chunk.choices if choice.finish_reason}
    time.sleep(0.05)              # a stream's spans are recorded just after its last byte
    captured = json.loads(client_span(capturing, receiver, trace_id).attributes["gen_ai.output.messages"])
    assert len(captured) == 2
    assert all(message["role"] == "assistant" and message["parts"][0]["type"] == "text" for message in captured)
    assert [message.get("finish_reason") for message in captured] == [reasons.pop()] * 2 and not reasons


def test_genai_client_metrics_follow_the_conventions(gw, receiver):
    """Each gen_ai.client.* metric: a histogram of the documented unit and advised buckets, carrying the
    required gen_ai.operation.name and gen_ai.provider.name; token usage by gen_ai.token.type input/output."""
    client = gw.openai(api_key=KEYS["acme"])
    client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    list(client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "Count"}],
                                        max_tokens=4, stream=True))
    time.sleep(0.05)
    gw.flush_telemetry()
    receiver.wait_for(lambda: "gen_ai.client.operation.time_per_output_chunk" in receiver.latest_metrics(gw.service))
    metrics = receiver.latest_metrics(gw.service)
    expected = {"gen_ai.client.token.usage": ("{token}", TOKEN_BOUNDS),
                "gen_ai.client.operation.duration": ("s", DURATION_BOUNDS),
                "gen_ai.client.operation.time_to_first_chunk": ("s", DURATION_BOUNDS),
                "gen_ai.client.operation.time_per_output_chunk": ("s", DURATION_BOUNDS)}
    for name, (unit, bounds) in expected.items():
        metric = metrics[name]
        assert (metric.kind, metric.unit) == ("histogram", unit), name
        assert metric.points, name
        for point in metric.points:
            assert point.bounds == [float(bound) for bound in bounds], name
            assert point.attributes["gen_ai.operation.name"] in ("chat", "embeddings"), name
            assert point.attributes["gen_ai.provider.name"] == "openai", name
            assert point.attributes["gen_ai.request.model"] == "sim-small", name
            assert point.attributes["server.port"] == gw.sims["small"].port, name
    assert {p.attributes["gen_ai.token.type"] for p in metrics["gen_ai.client.token.usage"].points} == {
        "input", "output"}
