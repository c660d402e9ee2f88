"""OTLP span batches serialised several times faster than the exporter's own encoder, same message.

The OTLP exporters' `encode_spans` builds a protobuf message for every
attribute of every span, about 55 µs a span for the gateway's spans, on a
thread that holds the GIL the event loop needs. A gateway's attribute pairs
repeat (tenant, route, model, server address, operation), so this encoder
serialises each (key, value) pair once and reuses its bytes. Protobuf's wire
format makes that exact: a message is the concatenation of its fields, and a
repeated field may be written one element at a time. Everything else in a
span (ids, name, kind, times, status, events, links, flags), the resource and
the scope are still built by the exporter's own helpers. The decoded message
equals `encode_spans`' (tests/test_span_encoding.py).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from opentelemetry.exporter.otlp.proto.common._internal import (
    _encode_instrumentation_scope,
    _encode_resource,
    _encode_value,
)
from opentelemetry.exporter.otlp.proto.common._internal.trace_encoder import (
    _SPAN_KIND_MAP,
    _encode_events,
    _encode_links,
    _encode_parent_id,
    _encode_status,
    _encode_trace_state,
    _span_flags,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span
from opentelemetry.sdk.trace import ReadableSpan

logger = logging.getLogger(__name__)

#: attribute pairs kept serialised; the cache starts over when full (per-request values churn it)
CACHE_ENTRIES = 8192


def _tag(message: Any, field: str) -> bytes:
    """The wire tag of a length-delimited field: (number << 3) | 2."""
    return _varint(message.DESCRIPTOR.fields_by_name[field].number << 3 | 2)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_REQUEST_RESOURCE_SPANS = _tag(ExportTraceServiceRequest, "resource_spans")
_RESOURCE_SCOPE_SPANS = _tag(ResourceSpans, "scope_spans")
_SCOPE_SPANS = _tag(ScopeSpans, "spans")
_SPAN_ATTRIBUTES = _tag(Span, "attributes")


class SpanEncoder:
    """Serialises span batches to ExportTraceServiceRequest bytes, reusing each attribute pair's bytes.

    Used by one exporter thread at a time (the batch processor's worker).
    """

    def __init__(self, cache_entries: int = CACHE_ENTRIES) -> None:
        self._attributes: dict[tuple[str, type, Any], bytes] = {}
        self._cache_entries = cache_entries

    def encode(self, spans: Sequence[ReadableSpan]) -> bytes:
        """The serialised ExportTraceServiceRequest of `spans`, grouped by resource, then scope."""
        groups: dict[int, tuple[Any, dict[int, tuple[Any, list[bytes]]]]] = {}
        for span in spans:
            resource, scope = span.resource, span.instrumentation_scope or None
            scopes = groups.setdefault(id(resource), (resource, {}))[1]
            scopes.setdefault(id(scope), (scope, []))[1].append(self._span(span))
        out = []
        for resource, scopes in groups.values():
            body = [ResourceSpans(resource=_encode_resource(resource),
                                  schema_url=resource.schema_url).SerializeToString()]
            for scope, encoded in scopes.values():
                scope_body = b"".join([ScopeSpans(scope=_encode_instrumentation_scope(scope),
                                                  schema_url=scope.schema_url if scope else None).SerializeToString(),
                                       *encoded])
                body.append(_field(_RESOURCE_SCOPE_SPANS, scope_body))
            out.append(_field(_REQUEST_RESOURCE_SPANS, b"".join(body)))
        return b"".join(out)

    def _span(self, span: ReadableSpan) -> bytes:
        """One span as a ScopeSpans.spans field: its own fields, then its attributes one by one."""
        context = span.get_span_context()
        head = Span(trace_id=context.trace_id.to_bytes(16, "big"), span_id=context.span_id.to_bytes(8, "big"),
                    trace_state=_encode_trace_state(context.trace_state), parent_span_id=_encode_parent_id(span.parent),
                    name=span.name, kind=_SPAN_KIND_MAP[span.kind], start_time_unix_nano=span.start_time,
                    end_time_unix_nano=span.end_time, events=_encode_events(span.events),
                    links=_encode_links(span.links), status=_encode_status(span.status),
                    dropped_attributes_count=span.dropped_attributes, dropped_events_count=span.dropped_events,
                    dropped_links_count=span.dropped_links, flags=_span_flags(span.parent)).SerializeToString()
        attributes = span.attributes or {}
        return _field(_SCOPE_SPANS, b"".join([head, *(self._attribute(k, v) for k, v in attributes.items())]))

    def _attribute(self, key: str, value: Any) -> bytes:
        """A Span.attributes field for one pair, from the cache when the pair was seen before."""
        try:
            cache_key = (key, value.__class__, value)
            return self._attributes[cache_key]
        except KeyError:
            encoded = self._encode_attribute(key, value)
            if len(self._attributes) >= self._cache_entries:
                self._attributes.clear()
            self._attributes[cache_key] = encoded
            return encoded
        except TypeError:                    # an unhashable value (a mapping): encoded every time
            return self._encode_attribute(key, value)

    @staticmethod
    def _encode_attribute(key: str, value: Any) -> bytes:
        try:
            return _field(_SPAN_ATTRIBUTES, KeyValue(key=key, value=_encode_value(value)).SerializeToString())
        except Exception as error:            # as the exporter's encoder does: the pair is left out, logged
            logger.exception("Failed to encode key %s: %s", key, error)
            return b""


def _field(tag: bytes, payload: bytes) -> bytes:
    return tag + _varint(len(payload)) + payload
