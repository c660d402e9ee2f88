"""A request's spans, drafted as plain data and handed to the span processor whole when it ends.

The SDK's live `Span` validates each attribute and takes a lock on every call,
and its `Tracer.start_span` re-reads the context each time: four spans cost a
request about 140 µs of event-loop time. A request's spans are seen by nothing
but the gateway until the request ends, so they are drafted here as plain
records and turned into the SDK's `ReadableSpan` once, at the end. Everything
that makes them OpenTelemetry spans stays the SDK's: the configured sampler
decides, the provider's id generator names them, the provider's resource and
the gateway's instrumentation scope describe them, and the batch processor
queues, exports and counts them.

Attribute values are the gateway's own (str, bool, int, float, tuples of
str), built by `genai`, so they are not validated again; the SDK's span
limits (attribute count, value length) are applied when a span exceeds them.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import Sampler
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway.telemetry.exporters import CountingBatchSpanProcessor

_UNSET = Status(StatusCode.UNSET)
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_NOT_SAMPLED = TraceFlags(TraceFlags.DEFAULT)
_TRACEPARENT = "traceparent"
_TRACESTATE = "tracestate"
_NO_PARENT = Context()


class SpanDraft:
    """One span of a request while it is open: what `ReadableSpan` will hold, in plain fields."""

    __slots__ = ("name", "kind", "context", "parent", "attributes", "start_ns", "end_ns", "status", "recording",
                 "children")

    def __init__(self, name: str, kind: SpanKind, context: SpanContext, parent: SpanContext | None,
                 attributes: dict[str, Any], recording: bool) -> None:
        self.name = name
        self.kind = kind
        self.context = context
        self.parent = parent
        self.attributes = attributes
        self.start_ns = time.time_ns()
        self.end_ns: int | None = None
        self.status = _UNSET
        self.recording = recording
        self.children: list[SpanDraft] = []     # a SERVER span's route, cache and CLIENT spans

    def is_recording(self) -> bool:
        """Whether this span records (the sampler said RECORD_ONLY or RECORD_AND_SAMPLE)."""
        return self.recording

    def get_span_context(self) -> SpanContext:
        return self.context

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        self.attributes.update(attributes)

    def set_attribute(self, key: str, value: Any) -> None:
        self.attributes[key] = value

    def fail(self, description: str | None = None) -> None:
        """Mark the span failed (status Error)."""
        self.status = Status(StatusCode.ERROR, description)

    def end(self, end_ns: int | None = None) -> None:
        """Close the span (once; a later call keeps the first end time)."""
        if self.end_ns is None:
            self.end_ns = end_ns if end_ns is not None else time.time_ns()


class RequestSpans:
    """Drafts a request's SERVER span and its children, and hands them on when the request ends."""

    def __init__(self, *, sampler: Sampler, ids: IdGenerator, resource: Resource, scope: InstrumentationScope,
                 processor: CountingBatchSpanProcessor | None) -> None:
        self._sampler = sampler
        self._ids = ids
        self._resource = resource
        self._scope = scope
        self._processor = processor
        self._propagator = TraceContextTextMapPropagator()
        limits = SpanLimits()                # OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT, OTEL_(SPAN_)ATTRIBUTE_VALUE_LENGTH_LIMIT
        self._max_attributes = limits.max_span_attributes
        self._max_length = limits.max_span_attribute_length

    def server(self, name: str, headers: Mapping[str, str], attributes: dict[str, Any]) -> SpanDraft:
        """The SERVER span: a child of the caller's valid traceparent, else the root of a new trace."""
        if _TRACEPARENT in headers:
            parent_context = self._propagator.extract(headers, context=Context())
            parent: SpanContext | None = trace.get_current_span(parent_context).get_span_context()
            if not parent.is_valid:
                parent = None
        else:                               # nothing to extract: the propagator would find no parent either
            parent_context, parent = _NO_PARENT, None
        trace_id = parent.trace_id if parent is not None else self._ids.generate_trace_id()
        sampled = self._sampler.should_sample(parent_context, trace_id, name, SpanKind.SERVER, attributes)
        if sampled.attributes:
            attributes = {**attributes, **sampled.attributes}
        flags = _SAMPLED if sampled.decision.is_sampled() else _NOT_SAMPLED
        context = SpanContext(trace_id, self._ids.generate_span_id(), is_remote=False, trace_flags=flags,
                              trace_state=sampled.trace_state)
        return SpanDraft(name, SpanKind.SERVER, context, parent, attributes, sampled.decision.is_recording())

    def child(self, server: SpanDraft, name: str, kind: SpanKind, attributes: dict[str, Any]) -> SpanDraft:
        """A child of the SERVER span, in its trace and sampled as it was; exported with it."""
        parent = server.context
        context = SpanContext(parent.trace_id, self._ids.generate_span_id(), is_remote=False,
                              trace_flags=parent.trace_flags, trace_state=parent.trace_state)
        child = SpanDraft(name, kind, context, parent, attributes, server.recording)
        if server.recording:
            server.children.append(child)
        return child

    @staticmethod
    def trace_headers(span: SpanDraft) -> dict[str, str]:
        """The W3C traceparent (and tracestate) that make `span` the parent of an upstream call.

        Written as the SDK's TraceContextTextMapPropagator.inject writes them (version 00, lower-case hex),
        without the context object it would build for each call."""
        context = span.context
        headers = {_TRACEPARENT: f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"}
        if context.trace_state:
            headers[_TRACESTATE] = context.trace_state.to_header()
        return headers

    def export(self, server: SpanDraft) -> None:
        """Hand a recorded request's spans to the processor, children before their parent, as the SDK ends them
        (the batch processor exports the sampled ones)."""
        if self._processor is None or not server.recording:
            return
        self._processor.on_end_all([self._readable(draft) for draft in (*server.children, server)])

    def _readable(self, draft: SpanDraft) -> ReadableSpan:
        attributes: Mapping[str, Any] = draft.attributes
        if self._max_length is not None or (self._max_attributes is not None
                                            and len(attributes) > self._max_attributes):
            # the SDK's own bounds, as its live spans apply them (values cut, extras dropped and counted)
            attributes = BoundedAttributes(self._max_attributes, attributes, immutable=True,
                                           max_value_len=self._max_length)
        end_ns = draft.end_ns if draft.end_ns is not None else time.time_ns()
        return ReadableSpan(name=draft.name, context=draft.context, parent=draft.parent, resource=self._resource,
                            attributes=attributes, kind=draft.kind, status=draft.status,
                            start_time=draft.start_ns, end_time=end_ns, instrumentation_scope=self._scope)
