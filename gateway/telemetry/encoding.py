"""OTLP span batches serialised several times faster than the exporter's own encoder, same message.

The OTLP exporters' `encode_spans` builds a protobuf message for every
attribute of every span, about 47 µs a span for the gateway's spans, on a
thread that holds the GIL the event loop needs. A gateway's attribute pairs
repeat (tenant, route, model, server address, operation, status code), so
this encoder serialises each such (key, value) pair once and reuses its
bytes. Protobuf's wire format makes that exact: a message is the
concatenation of its fields, and a repeated field may be written one element
at a time.

Values that seldom repeat (floats, ints past 16 bits, long texts) are not
kept. They, and kept pairs the first time, are written in wire format
(gateway.telemetry.wire) when they are a str, bool, int64 or float: 0.3-0.5 µs a pair, against 1.9 µs
through a `KeyValue`. Any other value (tuples, bytes, mappings, subclasses,
ints past int64) still goes through protobuf. As protobuf does, a oneof
member is written even at its default (`int_value: 0`); a pair protobuf
cannot encode (a lone surrogate, an int past int64) is left out and logged,
as the exporter does.

The rest of a span (ids, trace state, name, kind, times, dropped counts,
status, flags) is written here in wire format too, field by field, with tags
taken from the generated descriptors: building a `Span` message for them
took twice as long, most of it in protobuf's Python glue. Proto3 leaves a
field at its default out, and so does this encoder. Events and links, which
the gateway's spans do not have, are still built by the exporter's helpers,
as are the resource and the scope (once a batch). The decoded message equals
`encode_spans`' (tests/test_span_encoding.py); the bytes are in field-number
order, as protobuf writes them.

A batch of 512 spans still takes milliseconds, and CPython lets a thread
keep the GIL for its switch interval (5 ms) before another may take it: the
event loop stalled for that long, which set the gateway's p99 latency at low
concurrency (8 ms). The encoder offers the GIL after each `TURN_S` of work,
so the loop waits about 1 ms at most.
"""

from __future__ import annotations

import logging
from time import perf_counter, sleep
from collections.abc import Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common._internal import (
    _encode_instrumentation_scope,
    _encode_resource,
    _encode_value,
)
from opentelemetry.exporter.otlp.proto.common._internal.trace_encoder import (
    _SPAN_KIND_MAP,
    _encode_events,
    _encode_links,
    _encode_trace_state,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, SpanFlags, Status
from opentelemetry.sdk.trace import ReadableSpan

from gateway.telemetry.wire import ANY_VALUES, field, tag, varint

logger = logging.getLogger(__name__)

#: attribute pairs kept serialised; the cache starts over when full
CACHE_ENTRIES = 8192
#: longer strings (captured messages, user agents, ids) are encoded each time, never kept
CACHED_TEXT_CHARS = 256
#: ints of 16 bits or less are kept (status codes, ports, limits, most token counts); larger ones (sizes,
#: ids, times) seldom repeat and are written each time, as are all floats
CACHED_INT_BOUND = 1 << 16
#: the longest stretch of encoding before the GIL is offered to the event loop
TURN_S = 0.001


_REQUEST_RESOURCE_SPANS = tag(ExportTraceServiceRequest, "resource_spans")
_RESOURCE_SCOPE_SPANS = tag(ResourceSpans, "scope_spans")
_SCOPE_SPANS = tag(ScopeSpans, "spans")
_SPAN_ATTRIBUTES = tag(Span, "attributes")
_SPAN_TRACE_ID = tag(Span, "trace_id") + varint(16)          # ids have fixed lengths: 16 and 8 bytes
_SPAN_SPAN_ID = tag(Span, "span_id") + varint(8)
_SPAN_PARENT_SPAN_ID = tag(Span, "parent_span_id") + varint(8)
_SPAN_TRACE_STATE = tag(Span, "trace_state")
_SPAN_NAME = tag(Span, "name")
_SPAN_START = tag(Span, "start_time_unix_nano")               # fixed64: 8 bytes, little-endian
_SPAN_END = tag(Span, "end_time_unix_nano")
_SPAN_DROPPED_ATTRIBUTES = tag(Span, "dropped_attributes_count")
_SPAN_DROPPED_EVENTS = tag(Span, "dropped_events_count")
_SPAN_DROPPED_LINKS = tag(Span, "dropped_links_count")
_SPAN_STATUS = tag(Span, "status")
_STATUS_MESSAGE = tag(Status, "message")
_KEY_VALUE_KEY = tag(KeyValue, "key")
_KEY_VALUE_VALUE = tag(KeyValue, "value")
#: the kind field of each SDK kind (none maps to 0, SPAN_KIND_UNSPECIFIED, which proto3 would leave out)
_SPAN_KINDS = {kind: tag(Span, "kind") + varint(value) for kind, value in _SPAN_KIND_MAP.items()}
#: the code field of each status code, empty for UNSET (0)
_STATUS_CODES = {code: tag(Status, "code") + varint(code.value) if code.value else b""
                 for code in trace.StatusCode}
#: the status field of each status without a description
_SPAN_STATUSES = {code: field(_SPAN_STATUS, encoded) for code, encoded in _STATUS_CODES.items()}
#: the flags field (fixed32) as the exporter's _span_flags sets it: the parent's is_remote is always known
_SPAN_FLAGS_LOCAL = tag(Span, "flags") + SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK.to_bytes(4, "little")
_SPAN_FLAGS_REMOTE = tag(Span, "flags") + (SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK
                                            | SpanFlags.SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK).to_bytes(4, "little")


class SpanEncoder:
    """Serialises span batches to ExportTraceServiceRequest bytes, reusing each attribute pair's bytes.

    Used by one exporter thread at a time (the batch processor's worker).
    """

    def __init__(self, cache_entries: int = CACHE_ENTRIES) -> None:
        self._attributes: dict[tuple[str, type, Any], bytes] = {}
        self._pair_heads: dict[tuple[str, int], bytes] = {}
        self._cache_entries = cache_entries

    @property
    def cached_pairs(self) -> int:
        """Attribute pairs held serialised right now."""
        return len(self._attributes)

    def encode(self, spans: Sequence[ReadableSpan]) -> bytes:
        """The serialised ExportTraceServiceRequest of `spans`, grouped by equal resource, then equal scope."""
        groups: dict[int, tuple[Any, dict[int, tuple[Any, list[bytes]]]]] = {}
        resources, scopes_seen = _Canonical(), _Canonical()
        last: tuple[Any, Any] | None = None
        encoded: list[bytes] = []
        turn_ends_s = perf_counter() + TURN_S
        for span in spans:
            if perf_counter() > turn_ends_s:
                sleep(0)                    # offer the GIL: the event loop may be waiting for it
                turn_ends_s = perf_counter() + TURN_S
            pair = (span.resource, span.instrumentation_scope or None)
            if last is None or pair[0] is not last[0] or pair[1] is not last[1]:     # usually one pair a batch
                resource, scope = resources.of(pair[0]), scopes_seen.of(pair[1])
                scopes = groups.setdefault(id(resource), (resource, {}))[1]
                encoded = scopes.setdefault(id(scope), (scope, []))[1]
                last = pair
            encoded.append(self._span(span))
        out = []
        for resource, scopes in groups.values():
            body = [ResourceSpans(resource=_encode_resource(resource),
                                  schema_url=resource.schema_url).SerializeToString()]
            for scope, encoded in scopes.values():
                scope_body = b"".join([ScopeSpans(scope=_encode_instrumentation_scope(scope),
                                                  schema_url=scope.schema_url if scope else None).SerializeToString(),
                                       *encoded])
                body.append(field(_RESOURCE_SCOPE_SPANS, scope_body))
            out.append(field(_REQUEST_RESOURCE_SPANS, b"".join(body)))
        return b"".join(out)

    def _span(self, span: ReadableSpan) -> bytes:
        """One span as a ScopeSpans.spans field: its fields in number order, its attributes from the cache."""
        fields = _head(span)
        fields += [self._attribute(key, value) for key, value in (span.attributes or {}).items()]
        fields += _tail(span)
        return field(_SCOPE_SPANS, b"".join(fields))

    def _attribute(self, key: str, value: Any) -> bytes:
        """A Span.attributes field for one pair, from the cache when the pair is of a kind that repeats."""
        kind = value.__class__
        if kind is str:                     # most values: the common case first, inline
            if len(value) > CACHED_TEXT_CHARS:
                return self._encode_attribute(key, value)
            cache_key: tuple | None = (key, value)
        elif kind is int:
            if not -CACHED_INT_BOUND < value < CACHED_INT_BOUND:
                return self._encode_attribute(key, value)
            cache_key = (key, kind, value)
        elif kind is bool:
            cache_key = (key, kind, value)
        elif kind is float:                 # costs, durations, scores: seldom twice the same, and quick to write
            return self._encode_attribute(key, value)
        else:
            cache_key = _cache_key(key, kind, value)
            if cache_key is None:
                return self._encode_attribute(key, value)
        encoded = self._attributes.get(cache_key)
        if encoded is None:
            encoded = self._encode_attribute(key, value)
            if len(self._attributes) >= self._cache_entries:
                self._attributes.clear()
            self._attributes[cache_key] = encoded
        return encoded

    def _encode_attribute(self, key: str, value: Any) -> bytes:
        """A Span.attributes field for one pair: a str, bool, int64 or float written here, in wire format;
        anything else (subclasses, ints past int64, bytes, sequences, mappings, None) by protobuf."""
        write = ANY_VALUES.get(value.__class__)
        if write is not None:
            try:
                any_value = write(value)
                if any_value is not None:
                    size = len(any_value)
                    return (self._pair_heads.get((key, size)) or self._pair_head(key, size)) + any_value
            except (UnicodeEncodeError, AttributeError):   # a lone surrogate, a key that is not a str:
                pass                                       # protobuf decides (and raises for the surrogate)
        try:
            return field(_SPAN_ATTRIBUTES, KeyValue(key=key, value=_encode_value(value)).SerializeToString())
        except Exception as error:            # as the exporter's encoder does: the pair is left out, logged
            logger.exception("Failed to encode key %s: %s", key, error)
            return b""

    def _pair_head(self, key: str, size: int) -> bytes:
        """What comes before an AnyValue of `size` bytes in a Span.attributes field: its tag and length, the
        key field (none for an empty key: proto3 leaves it out), the value field's tag and length.
        Kept for values short enough to repeat their size (numbers, short texts)."""
        encoded = key.encode()
        key_value = (field(_KEY_VALUE_KEY, encoded) if encoded else b"") + _KEY_VALUE_VALUE + varint(size)
        head = _SPAN_ATTRIBUTES + varint(len(key_value) + size) + key_value
        if size < 0x80:
            if len(self._pair_heads) >= self._cache_entries:
                self._pair_heads.clear()
            self._pair_heads[key, size] = head
        return head


def _head(span: ReadableSpan) -> list[bytes]:
    """The span's fields before its attributes: ids, trace state, parent id, name, kind, start and end times."""
    context, parent, name = span.get_span_context(), span.parent, span.name
    head = [_SPAN_TRACE_ID, context.trace_id.to_bytes(16, "big"), _SPAN_SPAN_ID, context.span_id.to_bytes(8, "big")]
    if context.trace_state:                  # the W3C tracestate header; an empty one is left out
        head.append(field(_SPAN_TRACE_STATE, _encode_trace_state(context.trace_state).encode()))
    if parent:
        head += _SPAN_PARENT_SPAN_ID, parent.span_id.to_bytes(8, "big")
    if name:
        head.append(field(_SPAN_NAME, name.encode()))
    head.append(_SPAN_KINDS[span.kind])
    start_ns, end_ns = span.start_time, span.end_time
    if start_ns:
        head += _SPAN_START, start_ns.to_bytes(8, "little")
    if end_ns:
        head += _SPAN_END, end_ns.to_bytes(8, "little")
    return head


def _tail(span: ReadableSpan) -> list[bytes]:
    """The span's fields after its attributes: dropped counts, events, links, status and flags."""
    tail = []
    if span.dropped_attributes:
        tail += _SPAN_DROPPED_ATTRIBUTES, varint(span.dropped_attributes)
    if span.events:                          # rare: the exporter's own helper builds them
        tail.append(Span(events=_encode_events(span.events)).SerializeToString())
    if span.dropped_events:
        tail += _SPAN_DROPPED_EVENTS, varint(span.dropped_events)
    if span.links:
        tail.append(Span(links=_encode_links(span.links)).SerializeToString())
    if span.dropped_links:
        tail += _SPAN_DROPPED_LINKS, varint(span.dropped_links)
    status, parent = span.status, span.parent
    if status is not None:                   # written even when empty (UNSET), as the exporter writes it
        tail.append(_status(status))
    tail.append(_SPAN_FLAGS_REMOTE if parent and parent.is_remote else _SPAN_FLAGS_LOCAL)
    return tail


def _status(status: trace.Status) -> bytes:
    """The status field: its code (left out when UNSET) and, when there is one, its description."""
    if not status.description:
        return _SPAN_STATUSES[status.status_code]
    return field(_SPAN_STATUS, field(_STATUS_MESSAGE, status.description.encode())
                  + _STATUS_CODES[status.status_code])


#: tuple elements whose pairs are cached (floats in tuples are rare, and their signed zero would need care)
_TUPLE_ITEMS = (str, bool, int)


def _cache_key(key: str, kind: type, value: Any) -> tuple | None:
    """The cache key of a tuple of short strings, bools and ints, with every element's type in the key (True,
    1 and 1.0 are equal in Python, not in OTLP). None: encode each time (bytes, mappings, long texts)."""
    if kind is tuple and len(value) <= 16:
        kinds = tuple(item.__class__ for item in value)
        if all(item in _TUPLE_ITEMS for item in kinds) and \
                sum(len(item) for item in value if item.__class__ is str) <= CACHED_TEXT_CHARS:
            return key, kinds, value
    return None


class _Canonical:
    """The first-seen equal object for each object: spans group by equal resource and scope, as the SDK
    groups them, while each distinct object is compared only once per batch (Resource hashes slowly)."""

    def __init__(self) -> None:
        self._by_id: dict[int, Any] = {}
        self._seen: list[Any] = []

    def of(self, item: Any) -> Any:
        if item is None:
            return None
        found = self._by_id.get(id(item))
        if found is None:
            found = next((seen for seen in self._seen if seen == item), None)
            if found is None:
                found = item
                self._seen.append(item)
            self._by_id[id(item)] = found
        return found
