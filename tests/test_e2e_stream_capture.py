"""Content capture of streamed answers, on the wire: a stream's gen_ai.output.messages hold the parts the same
answer sent whole would (text, tool_call parts with id, name and arguments, the legacy function_call, each
choice's finish_reason), and are cut by the attribute length limit as a whole answer's are.

The model is a RawUpstream writing scripted streams of tool-call deltas (the simulated backend streams text
only); the client is the openai SDK; spans are read from a real OTLP receiver.
"""

from __future__ import annotations

import json
import os
import time
import uuid

import pytest

from tests.support.harness import RAW_CACHED_ROUTE, Harness, raw_model_policy, reset_raw_model
from tests.support.otlp_receiver import OtlpReceiver
from tests.support.raw_upstream import SSE_HEAD, RawUpstream, json_answer, sse

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
#: the attribute value length limit of the `capped` gateway
VALUE_LIMIT = 300


def environ(receiver: OtlpReceiver, service: str, **extra: str) -> dict[str, str]:
    base = {key: value for key, value in os.environ.items() if key != "GATEWAY_REDIS_URL"}
    return {**base, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.http_endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf", "OTEL_SERVICE_NAME": service,
            "OTEL_METRIC_EXPORT_INTERVAL": "60000", "OTEL_BSP_SCHEDULE_DELAY": "50",
            "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT": "true", **extra}


def gateway(receiver: OtlpReceiver, service: str, **extra: str) -> tuple[Harness, RawUpstream]:
    raw = RawUpstream().start()
    harness = Harness(raw_model_policy(raw.url, first_byte_s=2, tail=RAW_CACHED_ROUTE),
                      sims={name: dict(ttft_ms=1, tpot_ms=0) for name in ("small", "medium", "large")},
                      environ=environ(receiver, service, **extra)).start()
    return harness, raw


@pytest.fixture(scope="module")
def capturing(receiver):
    harness, raw = gateway(receiver, "gw-stream-capture")
    yield harness, raw
    harness.stop()
    raw.stop()


@pytest.fixture(scope="module")
def capped(receiver):
    with pytest.MonkeyPatch.context() as patch:     # the SDK's span limits read the process environment
        patch.setenv("OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT", str(VALUE_LIMIT))
        harness, raw = gateway(receiver, "gw-stream-capture-capped")
    yield harness, raw
    harness.stop()
    raw.stop()


@pytest.fixture
def gw(capturing):
    reset_raw_model(*capturing)
    return capturing


def delta(index: int = 0, finish: str | None = None, **fields) -> bytes:
    """One chat chunk: choice `index` with `fields` as its delta."""
    return json.dumps({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "fake",
                       "choices": [{"index": index, "delta": fields, "finish_reason": finish}]}).encode()


def streamed(*chunks: bytes) -> list[tuple[bytes, float]]:
    return [(SSE_HEAD + sse(*chunks, b"[DONE]"), 0.0)]


def whole(*choices: dict) -> list[tuple[bytes, float]]:
    return json_answer({"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "fake",
                        "choices": list(choices),
                        "usage": {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}})


def tool_call_fragments(index: int, call_id: str, name: str, arguments: str, size: int = 4) -> list[bytes]:
    """A tool call as a live stream sends it: id and name first, then its arguments a few characters at a time."""
    head = delta(tool_calls=[{"index": index, "id": call_id, "type": "function",
                              "function": {"name": name, "arguments": ""}}])
    return [head, *(delta(tool_calls=[{"index": index, "function": {"arguments": arguments[at:at + size]}}])
                    for at in range(0, len(arguments), size))]


def captured_output(harness: Harness, receiver: OtlpReceiver, model: str, *, stream: bool,
                    **request) -> tuple[list[dict], str]:
    """Ask `model` through the SDK (a stream read to its end); the CLIENT span's gen_ai.output.messages, parsed,
    and as exported."""
    trace_id = uuid.uuid4().hex
    answer = harness.openai().chat.completions.create(
        model=model, messages=[{"role": "user", "content": f"Weather? {uuid.uuid4().hex}"}], stream=stream,
        extra_headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"}, **request)
    if stream:
        list(answer)

    time.sleep(0.05)                    # a stream's spans are recorded just after its last byte
    harness.flush_telemetry()
    receiver.wait_for(lambda: {span.kind for span in receiver.trace(trace_id)} >= {"SERVER", "CLIENT"})
    (client,) = [span for span in receiver.trace(trace_id) if span.kind == "CLIENT"]
    exported = client.attributes["gen_ai.output.messages"]
    try:
        return json.loads(exported), exported
    except ValueError:                  # cut by the attribute length limit
        return [], exported


def test_streamed_tool_calls_are_captured_as_tool_call_parts(gw, receiver):
    """Text and two parallel tool calls streamed in fragments are captured as one text part and two tool_call
    parts (id, name, arguments as an object), with the stream's finish_reason."""
    harness, raw = gw
    raw.script = streamed(delta(role="assistant", content="Let me "), delta(content="check."),
                          *tool_call_fragments(0, "call_1", "get_weather", '{"city": "Oslo"}'),
                          *tool_call_fragments(1, "call_2", "get_weather", '{"city": "Bergen"}'),
                          delta(finish="tool_calls"))
    captured, _ = captured_output(harness, receiver, "raw-cached", stream=True, tools=TOOLS)
    assert captured == [{"role": "assistant", "finish_reason": "tool_calls", "parts": [
        {"type": "text", "content": "Let me check."},
        {"type": "tool_call", "name": "get_weather", "id": "call_1", "arguments": {"city": "Oslo"}},
        {"type": "tool_call", "name": "get_weather", "id": "call_2", "arguments": {"city": "Bergen"}}]}]


def test_a_streamed_answer_is_captured_as_the_same_answer_sent_whole(gw, receiver):
    """A tool-call answer streamed and the same answer sent whole give the same gen_ai.output.messages."""
    harness, raw = gw
    raw.script = streamed(delta(role="assistant", content=None),
                          *tool_call_fragments(0, "call_9", "get_weather", '{"city": "Tromsø", "days": 3}'),
                          delta(finish="tool_calls"))
    from_stream, _ = captured_output(harness, receiver, "raw-only", stream=True, tools=TOOLS)
    raw.script = whole({"index": 0, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": None, "tool_calls": [{"id": "call_9", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Tromsø", "days": 3}'}}]}})
    from_whole, _ = captured_output(harness, receiver, "raw-only", stream=False, tools=TOOLS)
    assert from_stream == from_whole and from_whole[0]["parts"][0]["id"] == "call_9"


def test_a_legacy_function_call_is_a_tool_call_part_streamed_or_whole(gw, receiver):
    """The legacy `function_call` (no id) is captured as a tool_call part with its name and arguments, from a
    stream of name and argument fragments as from a whole answer."""
    harness, raw = gw
    raw.script = streamed(delta(role="assistant", content=None, function_call={"name": "get_", "arguments": ""}),
                          delta(function_call={"name": "weather"}),
                          delta(function_call={"arguments": '{"city": '}),
                          delta(function_call={"arguments": '"Oslo"}'}),
                          delta(finish="function_call"))
    from_stream, _ = captured_output(harness, receiver, "raw-only", stream=True, functions=[TOOLS[0]["function"]])
    raw.script = whole({"index": 0, "finish_reason": "function_call", "message": {"role": "assistant", "content": None,
                        "function_call": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}})
    from_whole, _ = captured_output(harness, receiver, "raw-only", stream=False, functions=[TOOLS[0]["function"]])
    expected = [{"role": "assistant", "finish_reason": "function_call", "parts": [
        {"type": "tool_call", "name": "get_weather", "arguments": {"city": "Oslo"}}]}]
    assert from_stream == expected and from_whole == expected


def test_each_streamed_choice_is_captured_with_its_own_parts_and_finish_reason(gw, receiver):
    """With n=2 and interleaved chunks, choice 0's text (stop) and choice 1's tool call (tool_calls) are two
    output messages in choice order, each with its own finish_reason."""
    harness, raw = gw
    raw.script = streamed(delta(1, role="assistant", content=None), delta(0, role="assistant", content="Sun"),
                          delta(1, tool_calls=[{"index": 0, "id": "call_b", "type": "function",
                                                "function": {"name": "get_weather", "arguments": '{"city"'}}]),
                          delta(0, content="ny."),
                          delta(1, tool_calls=[{"index": 0, "function": {"arguments": ': "Oslo"}'}}]),
                          delta(1, finish="tool_calls"), delta(0, finish="stop"))
    captured, _ = captured_output(harness, receiver, "raw-only", stream=True, tools=TOOLS, n=2)
    assert captured == [
        {"role": "assistant", "finish_reason": "stop", "parts": [{"type": "text", "content": "Sunny."}]},
        {"role": "assistant", "finish_reason": "tool_calls", "parts": [
            {"type": "tool_call", "name": "get_weather", "id": "call_b", "arguments": {"city": "Oslo"}}]}]


def test_large_streamed_arguments_are_cut_at_the_attribute_limit_as_a_whole_answer_is(capped, receiver):
    """Arguments of 20,000 characters streamed in fragments are captured and cut to
    OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT exactly as the same answer sent whole is."""
    harness, raw = capped
    reset_raw_model(harness, raw)
    arguments = json.dumps({"city": "Oslo", "notes": "x" * 20_000})
    raw.script = streamed(delta(role="assistant", content=None),
                          *tool_call_fragments(0, "call_big", "get_weather", arguments, size=500),
                          delta(finish="tool_calls"))
    _, from_stream = captured_output(harness, receiver, "raw-only", stream=True, tools=TOOLS)
    raw.script = whole({"index": 0, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": None, "tool_calls": [{"id": "call_big", "type": "function", "function": {
            "name": "get_weather", "arguments": arguments}}]}})
    _, from_whole = captured_output(harness, receiver, "raw-only", stream=False, tools=TOOLS)
    assert len(from_stream) == VALUE_LIMIT and from_stream == from_whole
    assert '"id": "call_big"' in from_stream


def test_a_delta_nested_past_the_recursion_limit_ends_no_stream(gw, receiver):
    """A chunk whose delta holds a field nested 600 deep (orjson reads it; folding it into a whole answer
    recurses too deep) gives up the cache's and capture's copies, never the client's stream: the SDK reads the
    answer to its end, with no in-band error, and the text is still captured."""
    harness, raw = gw
    nested = "{}"
    for _ in range(600):
        nested = '{"a":' + nested + "}"
    deep = (b'{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"fake","choices":[{"index":0,'
            b'"delta":{"content":" world","extra":' + nested.encode() + b'},"finish_reason":null}]}')
    raw.script = streamed(delta(role="assistant", content="Hello"), deep, delta(finish="stop"))
    captured, _ = captured_output(harness, receiver, "raw-cached", stream=True)
    assert captured[0]["parts"] == [{"type": "text", "content": "Hello world"}]
    assert captured[0]["finish_reason"] == "stop"


def test_the_captured_copy_of_a_stream_is_bounded_as_the_caches_is():
    """A stream longer than the cache would keep stops being assembled for capture (its text is still kept by
    the relay's own record), so capture holds no unbounded second copy of a long answer."""
    from gateway.cache.assemble import MAX_ASSEMBLED_CHARS
    from gateway.stages.relay import StreamState

    state = StreamState(assemble_for=None, capture_for="chat")
    piece = "x" * 65536
    for _ in range(MAX_ASSEMBLED_CHARS // len(piece) + 2):
        state.absorb(json.loads(delta(content=piece)))
    assert state.captured is None and state.captured_answer() is None
    assert sum(len(text) for _, text in state.parts.texts()) > MAX_ASSEMBLED_CHARS
