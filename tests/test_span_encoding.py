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


LOCAL_PARENT = SpanContext(REMOTE_PARENT.trace_id, 0x1122334455667788, is_remote=False,
                           trace_flags=TraceFlags(TraceFlags.SAMPLED))


def gateway_span(**fields):
    """A ReadableSpan as the gateway's RequestSpans builds it, with `fields` in place of the defaults."""
    from opentelemetry.sdk.trace import ReadableSpan

    context = SpanContext(REMOTE_PARENT.trace_id, 0x0102030405060708, is_remote=False,
                          trace_flags=TraceFlags(TraceFlags.SAMPLED))
    defaults = dict(name="gateway.route", context=context, parent=LOCAL_PARENT, resource=Resource.create({}),
                    attributes={"gateway.tenant": "acme", "gen_ai.request.model": "sim-small-1b"},
                    kind=SpanKind.INTERNAL, status=Status(StatusCode.UNSET),
                    start_time=1_750_000_000_000_000_000, end_time=1_750_000_000_002_500_000)
    return ReadableSpan(**{**defaults, **fields})


def bounded_events(count: int, limit: int):
    """`count` events in a list that keeps `limit` of them and counts the rest as dropped, as the SDK's span does."""
    from opentelemetry.sdk.trace import Event
    from opentelemetry.sdk.util import BoundedList

    events = BoundedList(limit)
    for index in range(count):
        events.append(Event(f"retry {index}", {"attempt": index}, timestamp=1_750_000_000_000_000_000 + index))
    return events


def bounded_links(count: int, limit: int):
    """`count` links in a list that keeps `limit` of them and counts the rest as dropped."""
    from opentelemetry.sdk.util import BoundedList

    links = BoundedList(limit)
    for index in range(count):
        links.append(Link(SpanContext(REMOTE_PARENT.trace_id + index, 0xABC + index, is_remote=index % 2 == 0),
                          {"link.n": index}))
    return links


def over_limit_attributes():
    """The gateway's attributes past the SDK's limits: the last two kept, cut to 4 characters; three dropped."""
    from opentelemetry.attributes import BoundedAttributes

    return BoundedAttributes(2, {"a": 1, "b": 2.5, "c": True, "gen_ai.request.model": "sim-small-1b",
                                 "gateway.tenant": "acme-corporation"}, immutable=True, max_value_len=4)


HEAD_CASES = {
    "root, no parent": dict(parent=None),
    "local parent": dict(parent=LOCAL_PARENT),
    "remote parent": dict(parent=REMOTE_PARENT, kind=SpanKind.SERVER),
    "trace state": dict(context=SpanContext(REMOTE_PARENT.trace_id, 0x0A0B, is_remote=False,
                                            trace_state=TraceState([("vendor", "abc"), ("rojo", "00f067aa0ba902b7")]))),
    "status unset": dict(status=Status(StatusCode.UNSET)),
    "status ok": dict(status=Status(StatusCode.OK)),
    "status error": dict(status=Status(StatusCode.ERROR)),
    "status error, empty description": dict(status=Status(StatusCode.ERROR, "")),
    "status error, description": dict(status=Status(StatusCode.ERROR, "upstream timeout: sim-large-70b ✗")),
    "no status": dict(status=None),
    **{f"kind {kind.name}": dict(kind=kind) for kind in SpanKind},
    "dropped attributes": dict(attributes=over_limit_attributes()),
    "no attributes": dict(attributes=None),
    "events and links": dict(events=bounded_events(2, 8), links=bounded_links(2, 8)),
    "dropped events and links": dict(events=bounded_events(5, 2), links=bounded_links(4, 1)),
    "all events and links dropped": dict(events=bounded_events(3, 0), links=bounded_links(2, 0)),
    "non-ASCII name": dict(name="chat 模型-ß — 🚀"),
    "empty name": dict(name=""),
    "largest timestamps": dict(start_time=2**64 - 2, end_time=2**64 - 1),
    "zero and missing timestamps": dict(start_time=0, end_time=None),
    "largest ids": dict(context=SpanContext(2**128 - 1, 2**64 - 1, is_remote=False),
                        parent=SpanContext(2**128 - 1, 2**64 - 1, is_remote=True)),
}


@pytest.mark.parametrize("fields", HEAD_CASES.values(), ids=HEAD_CASES.keys())
def test_each_span_field_decodes_as_the_sdk_encoder_writes_it(fields):
    """Every field written directly (ids, trace state, parent, name, kind, times, counts, status, flags), and
    events and links left to the exporter's helpers, decode to encode_spans' message, on a cold and a warm cache."""
    spans = [gateway_span(**fields)]
    encoder = SpanEncoder()
    for _ in range(2):
        assert decoded(encoder, spans) == encode_spans(spans)


def test_the_flags_say_whether_the_parent_was_remote():
    """A span's flags always say its parent's remoteness is known, and say remote only for a remote parent."""
    spans = [gateway_span(parent=None), gateway_span(parent=LOCAL_PARENT), gateway_span(parent=REMOTE_PARENT)]
    message = decoded(SpanEncoder(), spans)
    assert message == encode_spans(spans)
    assert [span.flags for span in message.resource_spans[0].scope_spans[0].spans] == [0x100, 0x100, 0x300]


def test_the_cases_carry_what_they_are_named_for():
    """The head cases above exercise what they claim: counts, trace state, status and parent are written."""
    spans = [gateway_span(**fields) for fields in HEAD_CASES.values()]
    by_name = dict(zip(HEAD_CASES, decoded(SpanEncoder(), spans).resource_spans[0].scope_spans[0].spans))
    assert by_name["dropped attributes"].dropped_attributes_count == 3
    assert [kv.value.string_value for kv in by_name["dropped attributes"].attributes] == ["sim-", "acme"]
    assert (by_name["dropped events and links"].dropped_events_count,
            by_name["dropped events and links"].dropped_links_count) == (3, 3)
    assert len(by_name["all events and links dropped"].events) == 0
    assert by_name["all events and links dropped"].dropped_events_count == 3
    assert by_name["trace state"].trace_state == "vendor=abc,rojo=00f067aa0ba902b7"
    assert by_name["status error, description"].status.message == "upstream timeout: sim-large-70b ✗"
    assert by_name["status unset"].HasField("status") and not by_name["no status"].HasField("status")
    assert by_name["root, no parent"].parent_span_id == b"" and len(by_name["local parent"].parent_span_id) == 8
    assert by_name["largest timestamps"].end_time_unix_nano == 2**64 - 1


def test_without_schema_urls_the_bytes_equal_the_sdk_encoders():
    """With no schema URL on the resource or scope (written before the spans here, after them by protobuf), the
    request's bytes equal encode_spans' serialised message: each span's fields are in field-number order."""
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    resource, scope = Resource.create({"service.name": "gw"}), InstrumentationScope("gw", "1")
    spans = [gateway_span(**fields, resource=resource, instrumentation_scope=scope) for fields in HEAD_CASES.values()]
    spans += [ReadableSpan(span.name, context=span.context, parent=span.parent, resource=resource,
                           attributes=span.attributes, events=span.events, links=span.links, kind=span.kind,
                           status=span.status, start_time=span.start_time, end_time=span.end_time,
                           instrumentation_scope=scope) for span in finished_spans()]
    assert SpanEncoder().encode(spans) == encode_spans(spans).SerializeToString()


def attribute_spans(*attribute_sets):
    """One gateway span for each attribute mapping, its attributes kept as given (no SDK limits or checks)."""
    return [gateway_span(attributes=attributes) for attributes in attribute_sets]


def assert_bytes_equal_the_sdk_encoders(encoder: SpanEncoder, spans: list) -> None:
    """The request's bytes equal encode_spans' serialised message, so each span's bytes do (no schema URLs)."""
    assert encoder.encode(spans) == encode_spans(spans).SerializeToString()


INT64_MIN, INT64_MAX = -2**63, 2**63 - 1
BOUND = encoding.CACHED_INT_BOUND
INT_VALUES = [0, 1, -1, 127, 128, 16383, 16384, 2**31, -2**31, 2**32, INT64_MIN, INT64_MAX,
              BOUND - 1, BOUND, -BOUND + 1, -BOUND]
FLOAT_VALUES = [0.0, -0.0, 1.5, -2.25, 1e300, -1e-300, 5e-324, float("inf"), float("-inf")]
TEXT_VALUES = ["", "a", "模型-ß — 🚀", "x" * 127, "x" * 128, "x" * encoding.CACHED_TEXT_CHARS,
               "x" * (encoding.CACHED_TEXT_CHARS + 1), "é" * 10_000]
KEYS = ["v", "", "ключ.模型.🚀", "k" * 200]
SCALAR_VALUES = {**{f"int {value}": value for value in INT_VALUES},
                 **{f"float {value!r}": value for value in FLOAT_VALUES},
                 "true": True, "false": False,
                 **{f"text of {len(value)} chars {value[:3]!r}": value for value in TEXT_VALUES}}


@pytest.mark.parametrize("value", SCALAR_VALUES.values(), ids=SCALAR_VALUES.keys())
def test_each_scalar_value_is_written_as_protobuf_writes_it(value):
    """Ints (edges of each varint length, negatives as ten bytes, int64's ends, the cache bound), floats (signed
    zero, extremes, infinities), bools and texts (empty, non-ASCII, long), under plain, empty, non-ASCII and long
    keys, decode to encode_spans' message and equal its bytes: on a cold cache, a warm one, and one that starts
    over at every pair."""
    spans = attribute_spans({key: value for key in KEYS}, {"before": 1, KEYS[2]: value, "after": "x"})
    warm, churning = SpanEncoder(), SpanEncoder(cache_entries=1)
    for _ in range(2):
        assert decoded(warm, spans) == encode_spans(spans)
        assert_bytes_equal_the_sdk_encoders(warm, spans)
        assert_bytes_equal_the_sdk_encoders(churning, spans)


def test_default_values_are_written_as_oneof_members():
    """0, 0.0, false and "" are written (a oneof member is set even at its default), and decode as their type."""
    spans = attribute_spans({"int": 0, "float": 0.0, "bool": False, "text": ""})
    message = decoded(SpanEncoder(), spans)
    assert message == encode_spans(spans)
    values = [kv.value.WhichOneof("value") for kv in message.resource_spans[0].scope_spans[0].spans[0].attributes]
    assert values == ["int_value", "double_value", "bool_value", "string_value"]


@pytest.mark.parametrize("nan", [float("nan"), -float("nan")], ids=["nan", "negative nan"])
def test_nan_keeps_its_bits(nan):
    """A nan (which equals nothing, so messages cannot be compared) is written bit for bit as protobuf writes it,
    cold and warm."""
    import math
    import struct

    spans = attribute_spans({"gateway.score": nan, "": nan})
    encoder = SpanEncoder()
    for _ in range(2):
        assert_bytes_equal_the_sdk_encoders(encoder, spans)
        value = decoded(encoder, spans).resource_spans[0].scope_spans[0].spans[0].attributes[0].value.double_value
        assert math.isnan(value) and struct.pack("<d", value) == struct.pack("<d", nan)


@pytest.mark.parametrize("value", [2**63, INT64_MIN - 1, 2**64, 10**30], ids=["2**63", "-2**63-1", "2**64", "10**30"])
def test_an_int_past_int64_is_left_out_and_logged_as_the_sdk_does(caplog, value):
    """An int protobuf cannot hold is dropped and logged in every batch, as encode_spans does; the rest stays exact."""
    spans = attribute_spans({"gateway.tenant": "acme", "gateway.huge": value, "after": -1})
    encoder = SpanEncoder()
    for _ in range(2):
        caplog.clear()
        message = decoded(encoder, spans)
        assert message == encode_spans(spans)
        assert_bytes_equal_the_sdk_encoders(encoder, spans)
        assert [kv.key for kv in message.resource_spans[0].scope_spans[0].spans[0].attributes] == ["gateway.tenant",
                                                                                                   "after"]
        assert "Failed to encode key gateway.huge" in caplog.text


@pytest.mark.parametrize("attributes", [{"text": "lone \ud800 surrogate", "ok": 1},
                                        {"text": "x" * 300 + "\udc80", "ok": 1},
                                        {"bad key \udc80": 1.5, "ok": 1}], ids=["short text", "long text", "key"])
def test_a_lone_surrogate_is_left_out_and_logged_as_the_sdk_does(caplog, attributes):
    """A text UTF-8 cannot encode, in a value or a key, drops its pair with a log line, cold and warm."""
    spans = attribute_spans(attributes)
    encoder = SpanEncoder()
    for _ in range(2):
        message = decoded(encoder, spans)
        assert message == encode_spans(spans)
        assert [kv.key for kv in message.resource_spans[0].scope_spans[0].spans[0].attributes] == ["ok"]
        assert "Failed to encode key" in caplog.text


def test_subclasses_and_other_types_go_through_protobuf():
    """Enum members (int and str subclasses), bytes, tuples, mappings and None are typed as _encode_value types
    them, cold and warm."""
    import enum
    import http

    class Tier(enum.StrEnum):
        GOLD = "gold"

    spans = attribute_spans({"status": http.HTTPStatus.OK, "tier": Tier.GOLD, "raw": b"\x00\xff", "none": None,
                             "ints": (0, -1, 2**40), "mixed": ("a", True, 7), "floats": (0.0, -0.0),
                             "map": {"k": 1, "n": [1.5, "x"]}, "empty": ()})
    encoder = SpanEncoder()
    for _ in range(2):
        assert decoded(encoder, spans) == encode_spans(spans)
        assert_bytes_equal_the_sdk_encoders(encoder, spans)


def test_values_unique_to_a_request_do_not_fill_the_cache():
    """Floats, ints past 16 bits and long texts are written each time; short texts, bools and small ints, which
    repeat, are kept."""
    encoder = SpanEncoder()
    spans = attribute_spans(*({"gateway.cost_usd": index / 7, "gateway.bytes": BOUND + index, "gen_ai.input.messages":
                               "m" * 300 + str(index), "gateway.tenant": "acme", "gateway.sla.met": True,
                               "http.response.status_code": 200, "server.port": 8080} for index in range(50)))
    assert_bytes_equal_the_sdk_encoders(encoder, spans)
    assert encoder.cached_pairs == 4


def test_the_attribute_cache_never_holds_more_pairs_than_its_entries():
    """The cache is bounded: past `cache_entries` distinct pairs it starts over, so tenants or models without end
    never grow it; the bytes stay exact."""
    encoder = SpanEncoder(cache_entries=3)
    for index in range(10):
        spans = attribute_spans({f"gateway.key.{index}": f"value-{index}", "gateway.tenant": f"t-{index % 4}"})
        assert_bytes_equal_the_sdk_encoders(encoder, spans)
        assert 1 <= encoder.cached_pairs <= 3


def test_a_text_of_the_kept_length_is_kept_and_one_char_longer_is_not():
    """Texts of up to CACHED_TEXT_CHARS characters are kept; one character more is written each time."""
    limit = encoding.CACHED_TEXT_CHARS
    kept, longer = SpanEncoder(), SpanEncoder()
    assert_bytes_equal_the_sdk_encoders(kept, attribute_spans({"gen_ai.prompt.id": "p" * limit}))
    assert_bytes_equal_the_sdk_encoders(longer, attribute_spans({"gen_ai.prompt.id": "p" * (limit + 1)}))
    assert (kept.cached_pairs, longer.cached_pairs) == (1, 0)
