"""The gateway's span encoder produces the same OTLP message as the SDK exporter's encode_spans."""

from __future__ import annotations

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace import set_span_in_context
from opentelemetry.trace.span import TraceState

from gateway.telemetry import encoding
from gateway.telemetry.encoding import SpanEncoder

REMOTE_PARENT = SpanContext(0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7, is_remote=True,
                            trace_flags=TraceFlags(TraceFlags.SAMPLED), trace_state=TraceState([("vendor", "abc")]))


def finished_spans() -> list:
    """Spans of every shape the SDK can make: kinds, parents, statuses, events, links, value types, two scopes."""
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "gw", "team": "ml"}),
                              span_limits=SpanLimits(max_span_attributes=6))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    gateway = provider.get_tracer("inference-gateway", "1.0", schema_url="https://opentelemetry.io/schemas/1.41.0")
    other = provider.get_tracer("other-scope")
    for index in range(3):
        server = gateway.start_span("POST /v1/chat/completions", kind=SpanKind.SERVER,
                                    context=set_span_in_context(NonRecordingSpan(REMOTE_PARENT)),
                                    attributes={"http.request.method": "POST", "gateway.tenant": "acme",
                                                "http.response.status_code": 200 + index,
                                                "gateway.cost.usd": 0.00123 * index, "gateway.sla.met": index == 1})
        child_context = set_span_in_context(server)
        route = gateway.start_span("gateway.route", context=child_context, attributes={
            "gateway.route.candidates": ("small", "large"), "gateway.route.flags": (True, False),
            "gateway.route.ints": (1, 2, 3), "gateway.route.floats": (0.5,), "gateway.bytes": b"\x00\x01"})
        route.add_event("decided", {"gateway.model.selected": "small", "n": index})
        route.end()
        client = gateway.start_span("chat sim-small-1b", context=child_context, kind=SpanKind.CLIENT,
                                    links=[Link(REMOTE_PARENT, {"link.kind": "caller"})],
                                    attributes={f"attr.{n}": n for n in range(9)})      # 3 over the limit: dropped
        client.set_status(Status(StatusCode.ERROR, "timeout"))
        client.end()
        server.end()
    root = other.start_span("background", attributes={"gateway.payload": {"nested": "map", "n": 1}})
    root.set_status(Status(StatusCode.OK))
    root.end()
    return list(memory.get_finished_spans())


def decoded(encoder: SpanEncoder, spans: list) -> ExportTraceServiceRequest:
    return ExportTraceServiceRequest.FromString(encoder.encode(spans))


def test_encoded_batch_equals_the_sdk_encoder_message():
    """Every span shape the SDK makes decodes to exactly the message encode_spans builds."""
    spans = finished_spans()
    assert decoded(SpanEncoder(), spans) == encode_spans(spans)


def test_reused_attribute_bytes_stay_exact_across_batches():
    """A second batch served from the attribute cache, and a cache that starts over when full, stay exact."""
    spans = finished_spans()
    warm, tiny = SpanEncoder(), SpanEncoder(cache_entries=3)
    for _ in range(3):
        assert decoded(warm, spans) == encode_spans(spans)
        assert decoded(tiny, spans) == encode_spans(spans)


def test_values_that_look_equal_keep_their_types():
    """True, 1 and 1.0 hash alike in Python, yet each is encoded as its own OTLP type."""
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("t")
    for value in (True, 1, 1.0, "1"):
        tracer.start_span("s", attributes={"v": value}).end()
    spans = list(memory.get_finished_spans())
    message = decoded(SpanEncoder(), spans)
    assert message == encode_spans(spans)
    values = [span.attributes[0].value.WhichOneof("value") for span in message.resource_spans[0].scope_spans[0].spans]
    assert values == ["bool_value", "int_value", "double_value", "string_value"]


def test_a_value_the_encoder_cannot_write_is_left_out_as_the_sdk_does(caplog):
    """An attribute of an unknown type is skipped and logged; the rest of the span is exported."""
    from opentelemetry.sdk.trace import ReadableSpan

    span = ReadableSpan("odd", context=REMOTE_PARENT, attributes={"good": "yes", "bad": object()},
                        resource=Resource.create({}), start_time=1, end_time=2)
    message = decoded(SpanEncoder(), [span])
    attributes = message.resource_spans[0].scope_spans[0].spans[0].attributes
    assert [kv.key for kv in attributes] == ["good"]
    assert "Failed to encode key bad" in caplog.text


@pytest.mark.parametrize("size", [0, 1, 2, 100])
def test_empty_and_sized_batches(size):
    """Empty and larger batches match too (an empty batch is an empty request)."""
    spans = (finished_spans() * 40)[:size]
    assert decoded(SpanEncoder(), spans) == encode_spans(spans)


def test_equal_resources_and_scopes_group_as_the_sdk_groups_them():
    """Spans from two equal but distinct resource objects, interleaved, land in one ResourceSpans, in order."""
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    first, second = Resource.create({"service.name": "gw"}), Resource.create({"service.name": "gw"})
    scopes = InstrumentationScope("gw", "1"), InstrumentationScope("gw", "1")
    spans = [ReadableSpan(f"s{index}", context=REMOTE_PARENT, resource=(first, second)[index % 2],
                          instrumentation_scope=scopes[index // 2 % 2], attributes={"n": index},
                          start_time=index, end_time=index + 1) for index in range(6)]
    message = decoded(SpanEncoder(), spans)
    assert message == encode_spans(spans)
    assert len(message.resource_spans) == 1 and len(message.resource_spans[0].scope_spans) == 1


def test_pairs_that_python_finds_equal_in_tuples_keep_their_types():
    """(1, 0), (True, False) and (1.0, 0.0), and 0.0 and -0.0, are different OTLP values; none shares bytes."""
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("t")
    for value in ((1, 0), (True, False), (1.0, 0.0), 0.0, -0.0, ("a", 1), ("a", True)):
        tracer.start_span("s", attributes={"v": value}).end()
    spans = list(memory.get_finished_spans())
    encoder = SpanEncoder()
    for _ in range(2):                       # the second pass is served from the cache
        assert decoded(encoder, spans) == encode_spans(spans)


def test_long_texts_are_never_kept():
    """Captured messages and other long strings are encoded each time and not held by the cache."""
    from opentelemetry.sdk.trace import ReadableSpan

    encoder = SpanEncoder()
    text = "x" * 10_000
    spans = [ReadableSpan("s", context=REMOTE_PARENT, resource=Resource.create({}),
                          attributes={"gen_ai.input.messages": f"{index}{text}", "gateway.tenant": "acme"},
                          start_time=1, end_time=2) for index in range(50)]
    assert decoded(encoder, spans) == encode_spans(spans)
    assert encoder.cached_pairs == 1         # only the short, repeated pair


class SteppingClock:
    """perf_counter for the encoder: each reading is `step_s` later than the last."""

    def __init__(self, step_s: float) -> None:
        self.now_s, self.step_s = 0.0, step_s

    def __call__(self) -> float:
        self.now_s += self.step_s
        return self.now_s


@pytest.mark.parametrize(("step_s", "offered"), [(0.0, 0), (0.0006, 50)])
def test_a_long_batch_offers_the_gil_after_each_turn(monkeypatch, step_s, offered):
    """Encoding offers the GIL (sleep(0)) once per TURN_S of work (here: every second span), so the event loop
    never waits for a whole batch; the batch's bytes stay exact."""
    spans = (finished_spans() * 40)[:100]
    offers: list[float] = []
    monkeypatch.setattr(encoding, "perf_counter", SteppingClock(step_s))
    monkeypatch.setattr(encoding, "sleep", offers.append)
    assert decoded(SpanEncoder(), spans) == encode_spans(spans)
    assert offers == [0] * offered
