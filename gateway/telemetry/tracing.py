"""The hooks the request pipeline calls: the span tree of a request, and its metrics.

SERVER span `{method} {http.route}` (continuing the caller's traceparent)
├── INTERNAL gateway.route
├── INTERNAL gateway.cache.lookup
└── CLIENT `{gen_ai.operation.name} {gen_ai.request.model}`, one per upstream attempt

A call that generates nothing (a stored response retrieved, listed, deleted or cancelled: `PlainCall`) has its
SERVER span and, when it reaches a model server, one CLIENT span `{method}` for that call.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

from opentelemetry.semconv._incubating.attributes.gen_ai_attributes import (
    GEN_AI_INPUT_MESSAGES,
    GEN_AI_OUTPUT_MESSAGES,
)
from opentelemetry.semconv.attributes.error_attributes import ERROR_TYPE
from opentelemetry.semconv.attributes.http_attributes import (
    HTTP_REQUEST_METHOD,
    HTTP_RESPONSE_STATUS_CODE,
    HTTP_ROUTE,
)
from opentelemetry.trace import SpanKind

from gateway.telemetry import content, genai
from gateway.telemetry.labels import TenantLabels
from gateway.telemetry.spans import RequestSpans, SpanDraft

if TYPE_CHECKING:
    from gateway.context import Attempt, RequestContext
    from gateway.policy.model import Model
    from gateway.telemetry.metrics import Instruments

#: ctx.extra key set once finish_request has run
FINISHED = "telemetry.finished"


#: distinct workflow names kept as metric labels, per tenant; a tenant's later ones are "other"
WORKFLOW_LABEL_TOP_N = 100


class Hooks:
    """Spans and metrics of requests, recorded from the RequestContext at stage boundaries."""

    def __init__(self, spans: RequestSpans, instruments: Instruments, tenant_labels: TenantLabels,
                 capture_content: bool = False) -> None:
        self._spans = spans
        self._instruments = instruments
        self._tenants = tenant_labels
        # workflows are named by a client header: bounded like tenants, each tenant's first N keep their name (one
        # tenant's names never use up another's); per tenant *label*, so the tenants kept apart are bounded too
        self._workflows: dict[str, TenantLabels] = {}
        self._capture_content = capture_content

    def start_request(self, ctx: RequestContext, headers: Mapping[str, str]) -> None:
        """Start the SERVER span, as a child of the caller's traceparent when it is valid."""
        attributes = genai.server_span_attributes(ctx)
        name = f"{ctx.http.method} {attributes[HTTP_ROUTE]}"
        ctx.span = self._spans.server(name, headers, attributes)

    @contextmanager
    def route_span(self, ctx: RequestContext) -> Iterator[SpanDraft | None]:
        """The gateway.route span around routing; times it for gateway.routing.duration."""
        started_s = time.perf_counter()
        with self._child_span(ctx, "gateway.route") as span:
            try:
                yield span
            finally:
                if span is not None:
                    span.set_attributes(genai.route_attributes(ctx))
                ctx.routing_s = time.perf_counter() - started_s

    @contextmanager
    def cache_span(self, ctx: RequestContext) -> Iterator[SpanDraft | None]:
        """The gateway.cache.lookup span around a cache lookup, with the resulting status."""
        with self._child_span(ctx, "gateway.cache.lookup") as span:
            try:
                yield span
            finally:
                if span is not None:
                    span.set_attribute(genai.CACHE_STATUS, ctx.cache_status)

    @contextmanager
    def _child_span(self, ctx: RequestContext, name: str) -> Iterator[SpanDraft | None]:
        """An INTERNAL child of the SERVER span, ended on exit, marked failed on an exception.

        A request whose trace is not sampled gets no child span at all (None): it would record nothing.
        """
        if ctx.span is None or not ctx.span.recording:
            yield None
            return
        span = self._spans.child(ctx.span, name, SpanKind.INTERNAL, genai.child_attributes(ctx))
        try:
            yield span
        except BaseException as exc:
            span.fail(str(exc) or type(exc).__qualname__)
            span.set_attribute(ERROR_TYPE, genai.error_type(exc))
            raise
        finally:
            span.end()

    def start_attempt(self, ctx: RequestContext, attempt: Attempt) -> dict[str, str]:
        """Start the CLIENT span of an upstream attempt; return the headers to send upstream."""
        self._instruments.in_flight.add(1, {genai.MODEL_SELECTED: attempt.model.name})
        if ctx.span is None:
            return {}
        attributes = {**genai.child_attributes(ctx), genai.MODEL_SELECTED: attempt.model.name,
                      **genai.attempt_attributes(ctx, attempt)} if ctx.span.recording else {}
        if self._capture_content and ctx.span.recording:
            ctx.extra[content.CAPTURE_OUTPUT] = True       # a stream keeps its whole answer for the output messages
            messages = content.input_messages(ctx)
            if messages:
                attributes[GEN_AI_INPUT_MESSAGES] = json.dumps(messages, ensure_ascii=False)
        span = self._spans.child(ctx.span, genai.span_name(ctx, attempt), SpanKind.CLIENT, attributes)
        attempt.span = span
        headers = self._spans.trace_headers(span)
        attempt.traceparent = headers.get("traceparent")
        return headers

    def end_attempt(self, ctx: RequestContext, attempt: Attempt, chunk_gaps_s: Sequence[float] = ()) -> None:
        """End the CLIENT span (status Error + error.type on failure); its metrics are recorded with the request's."""
        self._instruments.in_flight.add(-1, {genai.MODEL_SELECTED: attempt.model.name})
        attempt.chunk_gaps_s = chunk_gaps_s
        span = attempt.span
        if span is None or not span.recording:
            return
        span.set_attributes(genai.attempt_end_attributes(ctx, attempt))
        if self._capture_content:
            messages = content.output_messages(ctx, attempt)
            if messages:
                span.set_attribute(GEN_AI_OUTPUT_MESSAGES, json.dumps(messages, ensure_ascii=False))
        if attempt.error_type:
            span.fail(attempt.error_type)
        span.end()

    def finish_request(self, ctx: RequestContext) -> None:
        """Finish the SERVER span with the gateway attributes and status code; record the request's metrics
        (routing, each attempt, the request), all off the response path."""
        if ctx.extra.get(FINISHED):
            return
        ctx.extra[FINISHED] = True
        span = ctx.span
        if ctx.settling is not None:        # a background response's CLIENT span: what its end said, not its start
            attempt = ctx.attempts[-1]
            if attempt.span is not None and attempt.span.recording:
                attempt.span.set_attributes(genai.attempt_end_attributes(ctx, attempt))
        if span is not None and span.recording:
            span.set_attributes(genai.gateway_attributes(ctx))
            response = genai.http_response_attributes(ctx)
            span.set_attributes(response)
            if ERROR_TYPE in response:          # a 5xx, or a stream that broke after its first byte
                span.fail()
            span.end(end_ns=_ended_ns(ctx))
            self._spans.export(span)
        tenant_label = self._tenants.label(ctx.tenant_name)
        self._instruments.record_routing(ctx, tenant_label)
        labels = None                               # the last attempt's, when recorded: its token usage's too
        for attempt in ctx.attempts:
            observed = attempt.span is not None     # its start was observed (telemetry was on)
            labels = self._instruments.record_attempt(ctx, attempt, tenant_label, attempt.chunk_gaps_s) \
                if observed else None
            self._instruments.record_queue(attempt, tenant_label)
        self._instruments.record_request(ctx, tenant_label, labels)

    def plain_call(self, request, request_id: str) -> PlainCall:
        """The spans of a call that generates nothing, its SERVER span started now."""
        attributes = genai.http_server_attributes(request, request_id, None)
        return PlainCall(self._spans, self._spans.server(f"{request.method} {attributes[HTTP_ROUTE]}",
                                                         request.headers, attributes))

    def record_task(self, task) -> None:
        """A reported task outcome (POST /v1/outcomes)."""
        tenant_label = self._tenants.label(task.tenant)
        workflows = self._workflows.get(tenant_label) or \
            self._workflows.setdefault(tenant_label, TenantLabels(top_n=WORKFLOW_LABEL_TOP_N))
        workflow = workflows.label(task.workflow) if task.workflow is not None else None
        self._instruments.record_task(task, tenant_label, workflow)


def _ended_ns(ctx: RequestContext) -> int | None:
    """When the request ended, as the span clock reads it (it may be recorded a little later)."""
    if ctx.ended_s is None:
        return None
    return time.time_ns() - max(0, int((time.perf_counter() - ctx.ended_s) * 1e9))


class PlainCall:
    """The spans of a call that generates nothing (a stored response retrieved, listed, deleted or cancelled): its
    SERVER span, and a CLIENT span for its call to a model server, when it makes one. Without telemetry (`server`
    None) each method does nothing."""

    __slots__ = ("_spans", "server", "client")

    def __init__(self, spans: RequestSpans | None, server: SpanDraft | None) -> None:
        self._spans = spans
        self.server = server
        self.client: SpanDraft | None = None

    def identified(self, tenant_name: str | None) -> None:
        """The caller's tenant, once known."""
        if self.server is not None and tenant_name is not None:
            self.server.set_attribute(genai.TENANT, tenant_name)

    def upstream(self, model: Model, method: str) -> dict[str, str]:
        """Start the CLIENT span of the call to `model`'s server; the trace headers that make it the server's
        parent (none without telemetry)."""
        if self.server is None:
            return {}
        self.server.set_attribute(genai.MODEL_SELECTED, model.name)
        self.client = self._spans.child(self.server, method, SpanKind.CLIENT, {
            HTTP_REQUEST_METHOD: method, **genai.server_address(model.endpoint), genai.MODEL_SELECTED: model.name})
        return self._spans.trace_headers(self.client)

    def answered(self, upstream_status: int) -> None:
        """The model server answered with `upstream_status`."""
        if self.client is not None:
            self.client.set_attribute(HTTP_RESPONSE_STATUS_CODE, upstream_status)
            if upstream_status >= 400:
                self.client.set_attribute(ERROR_TYPE, str(upstream_status))
                self.client.fail()

    def failed(self, error_type: str, upstream_status: int | None = None) -> None:
        """The call to the model server failed (`error_type`: a timeout, a dropped connection, an error status)."""
        if self.client is not None:
            if upstream_status is not None:
                self.client.set_attribute(HTTP_RESPONSE_STATUS_CODE, upstream_status)
            self.client.set_attribute(ERROR_TYPE, error_type)
            self.client.fail(error_type)

    def end(self, status: int) -> None:
        """End the spans, the client answered `status`, and hand them to the exporter."""
        server = self.server
        if server is None:
            return
        if self.client is not None:
            self.client.end()
        server.set_attribute(HTTP_RESPONSE_STATUS_CODE, status)
        if status >= 500:
            server.set_attribute(ERROR_TYPE, str(status))
            server.fail()
        server.end()
        self._spans.export(server)


class NoopHooks:
    """The hooks when telemetry is disabled: each returns at once."""

    def plain_call(self, request, request_id: str) -> PlainCall:
        return PlainCall(None, None)

    def start_request(self, ctx: RequestContext, headers: Mapping[str, str]) -> None:
        return None

    def route_span(self, ctx: RequestContext) -> AbstractContextManager[Any]:
        return nullcontext()

    def cache_span(self, ctx: RequestContext) -> AbstractContextManager[Any]:
        return nullcontext()

    def start_attempt(self, ctx: RequestContext, attempt: Attempt) -> dict[str, str]:
        return {}

    def end_attempt(self, ctx: RequestContext, attempt: Attempt, chunk_gaps_s: Sequence[float] = ()) -> None:
        return None

    def finish_request(self, ctx: RequestContext) -> None:
        return None

    def record_task(self, task) -> None:
        return None
